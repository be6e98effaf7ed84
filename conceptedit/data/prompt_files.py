"""Prompt files (CSV or text) read from a local path or downloaded once from their source.

Public prompt sets (COCO captions, I2P, ...) are never copied into this repository: a
:class:`~conceptedit.data.sources.PromptSource` names the file's canonical download URL and
sha256, and a user (or a test) can point at a local copy instead. Downloads land in the cache
and are checked before use.
"""

from __future__ import annotations

import csv
import hashlib
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

from conceptedit.data.sources import COCO_30K, PromptSource
from conceptedit.errors import ConceptEditError
from conceptedit.io.atomic import atomic_write_bytes
from conceptedit.io.hashing import file_sha256


class PromptFileError(ConceptEditError):
    """A prompt file is missing, corrupt, or lacks the column asked for."""


SOURCES = {"coco-30k": COCO_30K}


def fetch(source: PromptSource, cache_dir: Path) -> Path:
    """The cached copy of ``source``, downloading and checking it on first use."""
    target = cache_dir / "prompts" / source.name
    if target.is_file() and file_sha256(target) == source.sha256:
        return target
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        raise PromptFileError(
            f"could not download {source.name} from {source.url} ({exc}); download it yourself and "
            "pass its local path instead"
        ) from exc
    if hashlib.sha256(data).hexdigest() != source.sha256:
        raise PromptFileError(f"{source.url} did not have the expected sha256; refusing to use it")
    atomic_write_bytes(target, data)
    return target


def local_copy(
    source: PromptSource, cache_dir: Path, *, path: Path | None = None, root: Path | None = None, verify: bool = True
) -> Path:
    """A checked local copy of ``source``: ``path``, else its place under a mirror ``root`` (laid out
    like the cache), else the cached download.

    A local file whose sha256 differs from the source's is refused unless ``verify`` is False, and
    then only warned about: it may be a newer version or an edit, and its numbers would not be
    comparable with the published set's.
    """
    if path is not None:
        local = path.expanduser()
    elif root is not None:
        local = root.expanduser() / source.name
    else:
        return fetch(source, cache_dir)
    if not local.is_file():
        raise PromptFileError(f"{local} does not exist (it should be a copy of {source.url})")
    digest = file_sha256(local)
    if digest != source.sha256:
        problem = f"{local} has sha256 {digest}, but {source.url} has {source.sha256}"
        if verify:
            raise PromptFileError(f"{problem}: it is another version of the file or was modified")
        warnings.warn(f"{problem}; using it as asked, its numbers are not those of the published set", stacklevel=2)
    return local


def read_rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Every row of a CSV file as a dictionary, in file order, once its ``columns`` are known to exist."""
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise PromptFileError(
                f"prompt file {path} has no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(reader.fieldnames or [])})"
            )
        rows = list(reader)
    if not rows:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return rows


def read_prompts(path: Path, column: str = "prompt", limit: int | None = None) -> list[str]:
    """Prompts from a CSV (``column``) or a text file (one per line), in file order."""
    if path.suffix == ".txt" and path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise PromptFileError(f"prompt file {path} holds no prompts")
    else:
        prompts = [row[column] for row in read_rows(path, [column])]
    return prompts[:limit] if limit is not None else prompts


def resolve_prompt_file(spec: str, cache_dir: Path, base_dir: Path | None = None) -> tuple[Path, str]:
    """A local path for ``spec`` (a path, or a known source name like ``coco-30k``) and its column."""
    if spec in SOURCES:
        source = SOURCES[spec]
        return fetch(source, cache_dir), source.column
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise PromptFileError(
            f"prompt file {spec!r} not found (looked for {path}); give a path or one of: {', '.join(SOURCES)}"
        )
    return path, "prompt"
