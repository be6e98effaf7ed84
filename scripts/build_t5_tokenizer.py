"""Build a small T5-style tokenizer offline, for FLUX's second text encoder (``builtin:tiny-flux``).

FLUX.1 reads prompts through T5 v1.1 XXL, whose tokenizer is a SentencePiece Unigram model of
32,000 pieces learnt on C4 (plus 100 sentinels). That model cannot be downloaded here, so this
script makes a stand-in that follows T5's *conventions* exactly while its *vocabulary* is
derived from the CLIP BPE vocabulary shipped in ``conceptedit/models/assets/clip_tokenizer``
(OpenAI, MIT licence):

* ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>``; there is no start token; ``</s>`` ends every
  encoded text; padding is ``<pad>`` (0); 512 tokens at most (``model_max_length``);
* pieces mark a word's *start* with ``▁`` (U+2581) as SentencePiece does, instead of CLIP's
  word-*end* marker ``</w>``; text is split on whitespace and each word gets a leading ``▁``
  (transformers' ``T5Tokenizer``: ``WhitespaceSplit`` + ``Metaspace``), then segmented by the
  Unigram model (highest total score);
* 100 sentinels ``<extra_id_0..99>`` follow the pieces in reverse order, as in T5 (``<extra_id_0>``
  is the last id, 32099), so ``len(tokenizer) == 32100`` like T5's;
* characters no piece covers become ``<unk>`` (T5 has no byte fallback either).

How the 32,000 pieces are chosen: the four fixed ones (``<pad> </s> <unk> ▁``), then, walking
CLIP's vocabulary in id order (single bytes first, then merges in the order CLIP learnt them,
i.e. roughly by frequency), each CLIP token's text in both SentencePiece spellings: a word-final
CLIP token (``cat</w>``) first as a word start (``▁cat``) then as a continuation (``cat``), any
other token the other way round. CLIP's merges are lower case (its single bytes include the
capitals), T5's text is not, so a capitalised copy of the first 2,000 lower-case word starts
(``▁The``, ``▁A``...) is added right after each. Byte symbols that are not whole UTF-8 characters are skipped.
A piece's score is ``−ln(rank + 1)``, a Zipf-like stand-in for SentencePiece's log-probabilities,
so a word is split into as few, as common pieces as possible.

Not reproduced: T5's actual pieces and scores (learnt on C4, so ids and segmentations differ
from T5's for the same text) and SentencePiece's ``nmt_nfkc`` normalisation (its precompiled
character map needs the ``sentencepiece`` library to build; prompts are cleaned before
tokenizing instead, see ``conceptedit.models.tokenizer.clean_prompt``).

    python scripts/build_t5_tokenizer.py    # writes conceptedit/models/assets/t5_tokenizer/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

from tokenizers import decoders

ROOT = Path(__file__).resolve().parents[1]
CLIP_VOCAB = ROOT / "conceptedit" / "models" / "assets" / "clip_tokenizer" / "vocab.json"
DEFAULT_OUT = ROOT / "conceptedit" / "models" / "assets" / "t5_tokenizer"

PIECES = 32_000  # T5's SentencePiece model size, the three special tokens included
SENTINELS = 100
FIXED = ["<pad>", "</s>", "<unk>", "▁"]
CLIP_SPECIAL = {"<|startoftext|>", "<|endoftext|>"}
CAPITALISED = 2_000  # lower-case word starts that also get a capitalised piece
MAX_LENGTH = 512  # FLUX's T5 context (FluxPipeline's max_sequence_length)


def clip_texts(vocab_path: Path) -> list[tuple[str, bool]]:
    """CLIP's tokens in id order as ``(text, word_final)``; byte runs that are not whole UTF-8
    characters, whitespace and the special tokens are left out."""
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    byte_level = decoders.ByteLevel()
    texts = []
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        if token in CLIP_SPECIAL:
            continue
        final = token.endswith("</w>")
        text = byte_level.decode([token.removesuffix("</w>")])
        if text and "\ufffd" not in text and not any(c.isspace() for c in text):
            texts.append((text, final))
    return texts


def pieces(texts: list[tuple[str, bool]]) -> list[str]:
    """The 32,000 pieces in rank order (see the module docstring)."""
    chosen: dict[str, None] = dict.fromkeys(FIXED)
    capitalised = 0

    def add(piece: str) -> None:
        nonlocal capitalised
        if piece in chosen or len(chosen) >= PIECES:
            return
        chosen[piece] = None
        word = piece[1:]
        if piece.startswith("▁") and word[:1].islower() and capitalised < CAPITALISED:
            capitalised += 1
            add("▁" + word[0].upper() + word[1:])

    for text, final in texts:
        spellings = ["▁" + text, text] if final else [text, "▁" + text]
        for piece in spellings:
            add(piece)
    return list(chosen)


def tokenizer_vocab(ordered: list[str]) -> list[tuple[str, float]]:
    """``(piece, score)`` rows: the special tokens score 0, pieces ``−ln(rank + 1)``, then the
    sentinels in T5's reverse order."""
    rows = [(piece, 0.0 if i < 3 else round(-math.log(i + 1), 4)) for i, piece in enumerate(ordered)]
    return rows + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(SENTINELS))]


def build(out: Path) -> None:
    from transformers import T5Tokenizer  # tokenizers-backed in transformers 5 (T5TokenizerFast is the same class)

    ordered = pieces(clip_texts(CLIP_VOCAB))
    if len(ordered) != PIECES:
        raise SystemExit(f"only {len(ordered)} pieces could be derived; expected {PIECES}")
    tokenizer = T5Tokenizer(vocab=tokenizer_vocab(ordered), extra_ids=SENTINELS, model_max_length=MAX_LENGTH)
    checks = {"<pad>": 0, "</s>": 1, "<unk>": 2, "▁": 3, "<extra_id_99>": PIECES, "<extra_id_0>": PIECES + 99}
    for token, expected in checks.items():
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise SystemExit(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {expected}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=False)  # compact: a third of the size
    digest = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    print(f"wrote {out}: {len(tokenizer)} tokens; tokenizer.json sha256 {digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
