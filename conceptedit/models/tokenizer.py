"""The SD-1.x CLIP tokenizer (and SD-2.x's, the same files padding with ``!``), a T5-style tokenizer
for FLUX, both shipped as package data, and the prompt cleaning pinned to CLIP.

The files under ``assets/clip_tokenizer/`` are byte-identical to ``openai/clip-vit-large-patch14``'s
``vocab.json``/``merges.txt`` (built by ``scripts/build_clip_tokenizer.py``), so no model hub is needed.
``assets/t5_tokenizer/`` follows T5's conventions with pieces derived from that CLIP vocabulary
(``scripts/build_t5_tokenizer.py``; its README says what is and is not T5's).

Why cleaning is pinned here: OpenAI CLIP cleans every prompt with ``ftfy.fix_text``, a double
``html.unescape`` and whitespace collapsing before BPE; transformers 4's slow ``CLIPTokenizer``
(what diffusers' SD pipelines used) also ran ftfy. transformers 5's ``CLIPTokenizer`` runs none of
it, so prompts with curly quotes, HTML entities or mojibake (about 2% of I2P) tokenize differently
depending on the installed version. Cleaning prompts ourselves makes token ids, and with them every
edit and evaluation, match how SD-1.x was trained and evaluated, whatever transformers is installed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import ftfy

if TYPE_CHECKING:  # transformers is imported on first load only: importing this module must stay cheap
    import torch
    from transformers import CLIPTokenizer, T5Tokenizer

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
T5_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "t5_tokenizer"
_WHITESPACE = re.compile(r"\s+")


def load_clip_tokenizer() -> CLIPTokenizer:
    """The SD-1.x CLIP tokenizer from package data (pad = eos, 77 tokens); never touches the network."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), local_files_only=True)


#: SD-2.x's tokenizer pads with this token (id 0 of the CLIP vocabulary), not with [EoT].
OPENCLIP_PAD_TOKEN = "!"


def load_openclip_tokenizer() -> CLIPTokenizer:
    """SD-2.x's tokenizer from the same package data: OpenCLIP ViT-H/14 uses CLIP's vocabulary and
    merges, and ``stabilityai/stable-diffusion-2*`` ship them with ``pad_token: "!"`` (id 0), so
    padding is ``!`` rather than [EoT]. Never touches the network."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), local_files_only=True, pad_token=OPENCLIP_PAD_TOKEN)


def load_t5_tokenizer() -> T5Tokenizer:
    """FLUX's second tokenizer, T5-style, from package data: ``<pad>`` 0, ``</s>`` 1 (appended, no start
    token), ``<unk>`` 2, 512 tokens; pieces derived from CLIP's vocabulary, not T5's (see the asset's
    README). Never touches the network. transformers 5's ``T5Tokenizer`` is ``T5TokenizerFast``."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(T5_TOKENIZER_DIR), local_files_only=True)


def clean_prompt(text: str) -> str:
    """Clean a prompt exactly as OpenAI CLIP does before BPE (lower-casing is left to the tokenizer)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()


def tokenize(
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    max_length: int | None = None,
    pad_to: Literal["max_length", "longest"] = "max_length",
) -> torch.LongTensor:
    """Token ids of cleaned prompts, truncated to ``max_length`` (default: the model's 77) and padded
    to it (``max_length``) or only to the longest prompt (``longest``)."""
    length = tokenizer.model_max_length if max_length is None else max_length
    encoded = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding=pad_to,
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )
    return encoded.input_ids
