"""Turning a recipe's concept sets into prompt pairs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from conceptedit.api.concepts import ConceptSource
from conceptedit.api.edits import PromptPair
from conceptedit.api.paths import shown
from conceptedit.api.recipe import ConceptSet, GenerateSpec
from conceptedit.errors import ConceptEditError, did_you_mean


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
    if concept_set.generate is not None:
        message = "a `generate:` set needs its concept source: define it under the recipe's `concepts:`"
        raise GenerateError([GenerateProblem("generate", message)])
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
    return template_pairs(entries, concept_set.templates, concept_set.target)


def template_pairs(
    entries: Sequence[tuple[str, str | None]], templates: Sequence[str], target: str
) -> list[PromptPair]:
    """Every (entry × template) prompt pair, entries first, templates inner; an entry without a
    target of its own maps to ``target``. Each template holds ``{}`` where the concept goes."""
    pairs = []
    for concept, own in entries:
        goal = target if own is None else own
        for template in templates:
            pairs.append(PromptPair(template.replace("{}", concept), template.replace("{}", goal), concept, goal))
    return pairs


# --------------------------------------------------------------------------- generate:


@dataclass
class GenerateProblem:
    """One thing wrong with a ``generate:`` block: the option it is about ("" = the block)."""

    field: str
    message: str
    suggestion: str | None = None


class GenerateError(ConceptEditError):
    """A ``generate:`` block names no known source, gives invalid options, or its source failed."""

    def __init__(self, problems: list[GenerateProblem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def generate_concepts(
    concept_set: ConceptSet, sources: Mapping[str, type[ConceptSource[Any]]]
) -> tuple[list[PromptPair], GenerateSpec]:
    """A generated set's prompt pairs (its first ``limit``) and its resolved ``generate:`` block
    (the source and every option, defaults included), which reproduces them."""
    spec = concept_set.generate
    assert spec is not None
    cls = sources.get(spec.source)
    if cls is None:
        hint = did_you_mean(spec.source, sorted(sources))
        raise GenerateError([GenerateProblem("source", f"unknown concept source {shown(spec.source)}", hint)])
    try:
        options = cls.Options.model_validate(spec.options)
    except ValidationError as exc:
        raise GenerateError([_option_problem(error, cls) for error in exc.errors()]) from None
    pairs = _run_source(cls, options)
    if concept_set.limit is not None:
        pairs = pairs[: concept_set.limit]
    return pairs, GenerateSpec(source=cls.name, **options.model_dump(mode="json"))


def _run_source(cls: type[ConceptSource[Any]], options: Any) -> list[PromptPair]:
    """``cls(options).pairs()``, checked; any failure is a :class:`GenerateError` on the block."""
    try:
        pairs = cls(options).pairs()
    except ValueError as exc:
        raise GenerateError([GenerateProblem("", f"concept source {cls.name!r}: {exc}")]) from None
    except Exception as exc:  # a source's bug is reported like a recipe problem, never as a traceback
        message = f"concept source {cls.name!r} failed: {type(exc).__name__}: {exc}"
        raise GenerateError([GenerateProblem("", message, "report it to the plugin that provides it")]) from None
    if not isinstance(pairs, list) or not all(isinstance(p, PromptPair) for p in pairs):
        message = f"concept source {cls.name!r} returned {type(pairs).__name__}, not a list of PromptPair"
        raise GenerateError([GenerateProblem("", message, "report it to the plugin that provides it")])
    if not pairs:
        raise GenerateError([GenerateProblem("", f"concept source {cls.name!r} generated no prompt pairs")])
    return pairs


def _option_problem(error: Any, cls: type[ConceptSource[Any]]) -> GenerateProblem:
    """A pydantic error of a source's options, worded for a recipe."""
    loc = [str(part) for part in error["loc"]]
    key = loc[-1] if loc else ""
    allowed = list(cls.Options.model_fields)
    listing = f"options of {cls.name}: " + (", ".join(["source", *allowed]))
    if error["type"] == "extra_forbidden":
        close = get_close_matches(key, allowed, n=1, cutoff=0.5)
        return GenerateProblem(
            ".".join(loc), f"unknown option {key!r}", f"did you mean {close[0]!r}?" if close else listing
        )
    if error["type"] == "missing":
        return GenerateProblem(".".join(loc), f"required option {key!r} is missing", listing)
    message = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, (str, int, float, bool)) and error["type"] not in ("value_error", "assertion_error"):
        message += f", got {shown(given)}"
    return GenerateProblem(".".join(loc), message, listing)
