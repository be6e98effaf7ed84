"""Prompt files: read from a local path, or downloaded once from their source and checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import COCO_30K

from conceptedit.data.prompt_files import (
    COCO_30K as COCO_SOURCE,
)
from conceptedit.data.prompt_files import (
    PromptFileError,
    PromptSource,
    fetch,
    read_prompts,
    resolve_prompt_file,
)


def test_download_is_checked_cached_and_reused(tmp_path: Path) -> None:
    source = PromptSource("coco.csv", COCO_30K.as_uri(), COCO_SOURCE.sha256)
    path = fetch(source, tmp_path)
    assert path == tmp_path / "prompts" / "coco.csv"
    assert path.read_bytes() == COCO_30K.read_bytes()
    stamp = path.stat().st_mtime_ns
    assert fetch(source, tmp_path).stat().st_mtime_ns == stamp  # reused, not downloaded again


def test_a_download_with_the_wrong_checksum_is_refused(tmp_path: Path) -> None:
    source = PromptSource("coco.csv", COCO_30K.as_uri(), "0" * 64)
    with pytest.raises(PromptFileError, match="expected sha256"):
        fetch(source, tmp_path)
    assert not (tmp_path / "prompts" / "coco.csv").exists()


def test_an_unreachable_source_says_how_to_use_a_local_copy(tmp_path: Path) -> None:
    source = PromptSource("gone.csv", (tmp_path / "missing.csv").as_uri(), "0" * 64)
    with pytest.raises(PromptFileError, match="local path"):
        fetch(source, tmp_path)


def test_reading_csv_and_text_files(tmp_path: Path) -> None:
    prompts = read_prompts(COCO_30K, limit=5)
    assert len(prompts) == 5 and all(isinstance(p, str) and p for p in prompts)
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n a dog \n")
    assert read_prompts(text) == ["a cat", "a dog"]
    with pytest.raises(PromptFileError, match="no column 'caption'"):
        read_prompts(COCO_30K, column="caption")
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "nope.csv")


def test_resolving_a_path_relative_to_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "caps.txt").write_text("a cat\n")
    assert resolve_prompt_file("caps.txt", tmp_path / "cache", tmp_path) == (tmp_path / "caps.txt", "prompt")
    with pytest.raises(PromptFileError, match="coco-30k"):
        resolve_prompt_file("nope.txt", tmp_path / "cache", tmp_path)
