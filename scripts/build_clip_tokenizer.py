"""Build the SD-1.x CLIP tokenizer files offline, byte-identical to openai/clip-vit-large-patch14.

The BPE merge list OpenAI published with CLIP (``bpe_simple_vocab_16e6.txt.gz``, MIT) is
shipped inside the ``open-clip-torch`` wheel on PyPI. This script reads it from that wheel (or
from ``--bpe``), rebuilds ``vocab.json`` and ``merges.txt`` the way CLIP's own tokenizer orders
its vocabulary, and writes the Hugging Face tokenizer configs with SD-1.x settings (pad = eos,
77 tokens). The BPE file, ``vocab.json`` and ``merges.txt`` are checked against their known-good
sha256, so nothing differing from the real tokenizer is ever written.

    python scripts/build_clip_tokenizer.py            # downloads the wheel with pip (no deps)
    python scripts/build_clip_tokenizer.py --bpe bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_SHA256 = "f3494b2b345fa180ca51ec80ab47d1bbb0218d60089264d5ee9bb0619af4a4b7"
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
WHEEL = "open-clip-torch==3.3.0"
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "conceptedit" / "models" / "assets" / "clip_tokenizer"

SPECIAL = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def fetch_bpe(tmp: Path) -> bytes:
    """The gz file out of the open-clip-torch wheel, downloaded with pip (no install)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), WHEEL], check=True)
    wheel = next(tmp.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(WHEEL_MEMBER)


def build(bpe_gz: bytes, out: Path) -> None:
    """Write the four tokenizer files into ``out`` from the gzipped BPE file's bytes."""
    if hashlib.sha256(bpe_gz).hexdigest() != BPE_SHA256:
        raise SystemExit("the BPE file's sha256 is not the published one; refusing to build from it")
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    out.mkdir(parents=True, exist_ok=True)
    vocab_text = json.dumps(encoder, sort_keys=True, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    files = {
        "vocab.json": (vocab_text.encode("utf-8"), VOCAB_SHA256),
        "merges.txt": (merges_text.encode("utf-8"), MERGES_SHA256),
    }
    for name, (data, expected) in files.items():
        if hashlib.sha256(data).hexdigest() != expected:
            raise SystemExit(f"{name}: built file does not match the reference sha256")
    for name, (data, _) in files.items():
        (out / name).write_bytes(data)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        **SPECIAL,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(encoder)} tokens, {len(merges)} merges; vocab.json and merges.txt verified")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz (default: fetch the wheel)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    if args.bpe is not None:
        data = args.bpe.read_bytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data = fetch_bpe(Path(tmp))
    build(data, args.out)


if __name__ == "__main__":
    main()
