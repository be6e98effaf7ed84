"""Prompt files (CSV or text) read from a local path or downloaded once from their source.

Public prompt sets (COCO captions, I2P, ...) are never copied into this repository: a
:class:`PromptSource` names the file's canonical download URL and sha256, and a user (or a
test) can point at a local copy instead. Downloads land in the cache and are checked before use.
"""

from __future__ import annotations

import csv
import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conceptedit.errors import ConceptEditError
from conceptedit.io.atomic import atomic_write_bytes
from conceptedit.io.hashing import file_sha256


class PromptFileError(ConceptEditError):
    """A prompt file is missing, corrupt, or lacks the column asked for."""


@dataclass(frozen=True)
class PromptSource:
    """Where a public prompt file comes from.

    Attributes:
        name: Short name (used for the cache file).
        url: Canonical download URL.
        sha256: Expected sha256 of the file.
        column: CSV column holding the prompt text.
        licence: Licence of the data, for the record.
    """

    name: str
    url: str
    sha256: str
    column: str = "prompt"
    licence: str = ""


#: COCO-30k captions (MS-COCO 2014, CC BY 4.0) as published with ESD (MIT), the set TRCE's prior uses.
COCO_30K = PromptSource(
    name="coco_30k.csv",
    url="https://raw.githubusercontent.com/rohitgandikota/erasing/25613d27892326e0c7770f7f3555bea4be150089/data/coco_30k.csv",
    sha256="42c57b188c8f1f8a77cddfa11cde89e83fcbdd4dcd4fc6c840fb4e046d395383",
    licence="captions CC BY 4.0 (MS-COCO); file MIT (rohitgandikota/erasing)",
)

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


def read_prompts(path: Path, column: str = "prompt", limit: int | None = None) -> list[str]:
    """Prompts from a CSV (``column``) or a text file (one per line), in file order."""
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise PromptFileError(
                    f"prompt file {path} has no column {column!r} (columns: {', '.join(reader.fieldnames or [])})"
                )
            prompts = [row[column] for row in reader]
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts")
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
