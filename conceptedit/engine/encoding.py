"""Prompt encoding: text-encoder embeddings plus the token positions edit methods read.

Closed-form methods pick particular token rows of a prompt's encoding: the start token
(SoT), the first end token ([EoT]), the last padding token, the last word token, or the
tokens of a keyword. Those positions come from token ids, never from counting words: a word
like "Nudity" is two BPE pieces, so a word count lands on the wrong row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from conceptedit.errors import EditError

TokenRow = Literal["sot", "eot", "last_pad", "last_word"]


@dataclass
class PromptEncoding:
    """Encoded prompts.

    Attributes:
        prompts: The prompts as given.
        input_ids: Token ids, ``[batch, length]``.
        hidden: Text-encoder output (the embeddings cross-attention reads), ``[batch, length, dim]``.
        eot_index: Position of the first end token in each prompt, ``[batch]``.
        eos_token_id: The tokenizer's end-of-text id.
    """

    prompts: list[str]
    input_ids: Tensor
    hidden: Tensor
    eot_index: Tensor
    eos_token_id: int

    def __len__(self) -> int:
        return len(self.prompts)

    def positions(self, row: TokenRow) -> Tensor:
        """Index of the named token row in each prompt, ``[batch]``."""
        batch = len(self)
        if row == "sot":
            return torch.zeros(batch, dtype=torch.long)
        if row == "eot":
            return self.eot_index.clone()
        if row == "last_word":
            return (self.eot_index - 1).clamp(min=0)
        if row == "last_pad":
            return torch.full((batch,), self.input_ids.shape[1] - 1, dtype=torch.long)
        raise EditError(f"unknown token row {row!r}; use one of sot, eot, last_pad, last_word")

    def rows(self, positions: Tensor) -> Tensor:
        """Gather one embedding per prompt at ``positions``: ``[batch, dim]``."""
        if positions.shape != (len(self),):
            raise EditError(f"expected {len(self)} positions, got shape {tuple(positions.shape)}")
        index = positions.to(self.hidden.device).view(-1, 1, 1).expand(-1, 1, self.hidden.shape[-1])
        return self.hidden.gather(1, index).squeeze(1)

    def row(self, row: TokenRow) -> Tensor:
        """Shortcut for ``rows(positions(row))``."""
        return self.rows(self.positions(row))

    def keyword_positions(self, keyword_ids: Sequence[Sequence[int]]) -> Tensor:
        """Position of the first token of each prompt's keyword, ``[batch]``; -1 where absent.

        Args:
            keyword_ids: Per prompt, the token ids of its keyword (without SoT/EoT).
        """
        if len(keyword_ids) != len(self):
            raise EditError(f"expected {len(self)} keywords, got {len(keyword_ids)}")
        found = []
        for ids, key in zip(self.input_ids.tolist(), keyword_ids, strict=True):
            key = list(key)
            hit = next((i for i in range(len(ids) - len(key) + 1) if key and ids[i : i + len(key)] == key), -1)
            found.append(hit)
        return torch.tensor(found, dtype=torch.long)


def first_eot_index(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """The first position holding ``eos_token_id`` in each row; the last position if none."""
    is_eos = input_ids == eos_token_id
    first = is_eos.int().argmax(dim=1)
    missing = ~is_eos.any(dim=1)
    first[missing] = input_ids.shape[1] - 1
    return first
