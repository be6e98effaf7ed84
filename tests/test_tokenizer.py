"""The offline SD-1.x CLIP tokenizer gives the real ids, and prompt cleaning is applied."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from conceptedit.models.tokenizer import clean_prompt, load_clip_tokenizer, tokenize

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return load_clip_tokenizer()


@pytest.mark.parametrize(
    ("prompt", "ids"),
    [
        ("a photo of a cat", [BOS, 320, 1125, 539, 320, 2368, EOS]),
        ("Hello, world!", [BOS, 3306, 267, 1002, 256, EOS]),
        ("a photo of a nude woman", [BOS, 320, 1125, 539, 320, 16630, 2308, EOS]),
        ("Nudity", [BOS, 1156, 16436, EOS]),  # two word pieces, "nu" + "dity</w>": first EoT at index 3
    ],
)
def test_known_ids(tok: CLIPTokenizer, prompt: str, ids: list[int]) -> None:
    assert tok(prompt).input_ids == ids
    padded = tokenize(tok, [prompt])
    assert padded.shape == (1, 77)
    assert padded[0, : len(ids)].tolist() == ids
    assert padded[0, len(ids) :].eq(EOS).all()


def test_special_tokens_and_sizes(tok: CLIPTokenizer) -> None:
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    assert tok.convert_ids_to_tokens([1156, 16436]) == ["nu", "dity</w>"]


def test_curly_quotes_are_cleaned(tok: CLIPTokenizer) -> None:
    curly, straight = tokenize(tok, ["\u201chello\u201d"]), tokenize(tok, ['"hello"'])
    assert curly.tolist() == straight.tolist()
    assert straight[0, :5].tolist() == [BOS, 257, 3306, 257, EOS]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("\u201ca\u201d  b\n\tc ", '"a" b c'),
        ("fish &amp;amp; chips", "fish & chips"),
        ("caf\u00c3\u00a9", "caf\u00e9"),  # mojibake repaired by ftfy
        ("   ", ""),
    ],
)
def test_clean_prompt(raw: str, clean: str) -> None:
    assert clean_prompt(raw) == clean


def test_tokenize_truncates_and_honours_max_length(tok: CLIPTokenizer) -> None:
    long_ids = tokenize(tok, ["cat " * 200, "a cat"])
    assert long_ids.shape == (2, 77)
    assert long_ids[0, 0] == BOS and long_ids[0, -1] == EOS
    short = tokenize(tok, ["a photo of a cat"], max_length=10)
    assert short.tolist() == [[BOS, 320, 1125, 539, 320, 2368, EOS, EOS, EOS, EOS]]
