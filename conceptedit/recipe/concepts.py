"""Turning a recipe's concept sets into prompt pairs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conceptedit.api.edits import PromptPair
from conceptedit.api.recipe import ConceptSet
from conceptedit.errors import ConceptEditError


class ConceptFileError(ConceptEditError):
    """A concept file is missing or does not hold a list of concepts or pairs."""


def read_concept_file(path: Path) -> list[tuple[str, str | None]]:
    """Entries of a concept file: JSON/YAML list of strings or pairs, or ``.txt`` one per line."""
    if not path.is_file():
        raise ConceptFileError(f"concept file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        data: object = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConceptFileError(f"concept file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    elif path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConceptFileError(f"concept file {path}: invalid YAML: {exc}") from exc
    else:
        raise ConceptFileError(f"concept file {path}: use .json, .yaml/.yml or .txt")
    if not isinstance(data, list) or not data:
        raise ConceptFileError(f"concept file {path} must hold a non-empty list")
    entries: list[tuple[str, str | None]] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            entries.append((item, None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            entries.append((item[0], item[1]))
        else:
            raise ConceptFileError(f"concept file {path}: entry {i} must be a string or a [concept, target] pair")
    return entries


def expand_concepts(concept_set: ConceptSet, base_dir: Path | None) -> list[PromptPair]:
    """Every (entry × template) prompt pair of a concept set, entries first, templates inner."""
    if concept_set.pairs is not None:
        entries: list[tuple[str, str | None]] = [(a, b) for a, b in concept_set.pairs]
    elif concept_set.concepts is not None:
        entries = [(c, None) for c in concept_set.concepts]
    else:
        assert concept_set.file is not None
        path = Path(concept_set.file).expanduser()
        entries = read_concept_file(path if path.is_absolute() or base_dir is None else base_dir / path)
    if concept_set.limit is not None:
        entries = entries[: concept_set.limit]
    pairs = []
    for concept, target in entries:
        goal = concept_set.target if target is None else target
        for template in concept_set.templates:
            pairs.append(PromptPair(template.replace("{}", concept), template.replace("{}", goal), concept, goal))
    return pairs
