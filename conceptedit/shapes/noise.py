"""Caption noise: random vocabulary tokens put into a caption's token ids.

Training adds it to a share of the captions so that the text encoder learns to ignore tokens it
has no meaning for (most of CLIP's 49,408 rows are never trained on the shapes world); the model
card measures the trained model under five random prefix tokens, as a random-token attack's
control would put them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from conceptedit.models.builtin import CLIP_BOS_ID, CLIP_EOS_ID
from conceptedit.shapes.world import caption_phrases

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


class CaptionNoise:
    """Random vocabulary tokens put into token ids: each caption, with probability ``share``, gets one
    to ``max_tokens`` of them, as a prefix (half the time: where a random-token attack puts them)
    or each at a random place among the caption's words.

    The tokens are drawn from the whole vocabulary but the special tokens and every token of a
    phrase the world's captions use (:func:`~conceptedit.shapes.world.caption_phrases`), so noise
    never states an attribute and the probes' labels stay true.
    """

    def __init__(self, tokenizer: CLIPTokenizer, share: float, max_tokens: int) -> None:
        used = {int(i) for ids in tokenizer(list(caption_phrases())).input_ids for i in ids}
        special = {CLIP_BOS_ID, CLIP_EOS_ID}
        self.allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in used | special])
        self.share = share
        self.max_tokens = max_tokens

    def __call__(self, ids: Tensor, rng: np.random.Generator) -> Tensor:
        out = ids.clone()
        for row in np.flatnonzero(rng.random(len(ids)) < self.share):
            noise = self.random_tokens(int(rng.integers(1, self.max_tokens + 1)), rng)
            out[row] = insert_tokens(ids[row], noise, prefix=bool(rng.random() < 0.5), rng=rng)
        return out

    def random_tokens(self, k: int, rng: np.random.Generator) -> Tensor:
        """``k`` token ids drawn uniformly, with replacement, from the allowed ones."""
        return self.allowed[torch.from_numpy(rng.integers(len(self.allowed), size=k))]


def insert_tokens(ids: Tensor, tokens: Tensor, *, prefix: bool, rng: np.random.Generator | None = None) -> Tensor:
    """One caption's ``ids`` (start token, words, end-of-text padding) with ``tokens`` put right after
    the start token (``prefix``) or each before a random word or the end; the padding gives way,
    so the length stays the same and the end-of-text token stays (a caption that would not fit
    is returned unchanged)."""
    length = int((ids == CLIP_EOS_ID).nonzero()[0, 0])  # start token + words
    if length + len(tokens) >= len(ids):
        return ids
    words = ids[1:length].tolist()
    if prefix or rng is None:
        words = tokens.tolist() + words
    else:
        for token in tokens.tolist():
            words.insert(int(rng.integers(len(words) + 1)), token)
    return torch.cat([ids[:1], torch.tensor(words, dtype=ids.dtype), ids[length : len(ids) - len(tokens)]])
