"""The erasure benchmark's prompt splits on the shapes world, generated from a seed and kept apart.

An erasure rate on the edit's own prompts says little: the last benchmark called red "erased"
while ", on the right" brought it back in every image. So the prompts a result is reported on
are built from words the edit never saw:

* **held-out phrasings**: the concept's :data:`~conceptedit.shapes.world.IMPLICIT_EVAL`
  phrasings, bare ("a scarlet circle");
* **held-out contexts**: the explicit name and those phrasings inside captions of the caption
  grammar whose context words (size, position, background, prefix) come only from
  :data:`HELD_OUT_CONTEXT_WORDS`, a vocabulary no edit prompt may use;
* **neighbours**: every other concept of the same kind, by name, in the same held-out contexts;
* **tuning** and **tuning neighbours**: the same construction over :data:`TUNING_CONTEXT_WORDS`
  (the rest of the context vocabulary) with its own seed: settings are chosen there, never on
  the reported splits.

:func:`overlap_problems` is the check a benchmark runs on a recipe's concept set before it
reports anything: an edit prompt that names a held-out phrasing or a held-out context word is
refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from conceptedit.shapes.contexts import CONTEXT_WORDS, Context, Kind, caption, mentions
from conceptedit.shapes.world import COLOUR_NAMES, CONCEPTS, IMPLICIT_EVAL, SHAPE_NAMES, Prompt

#: Context words only the reported held-out-context split uses (one or two per slot, so every
#: slot of the grammar is exercised on words the edit never saw).
HELD_OUT_CONTEXT_WORDS: dict[str, tuple[str, ...]] = {
    "size": ("tiny", "big"),
    "position": ("on the right", "at the top"),
    "background": ("on a dark background",),
    "prefix": ("a drawing of",),
}
#: The rest of the context vocabulary: what edit prompts and the tuning split may use.
TUNING_CONTEXT_WORDS: dict[str, tuple[str, ...]] = {
    slot: tuple(w for w in CONTEXT_WORDS[slot] if w not in HELD_OUT_CONTEXT_WORDS[slot])
    for slot in HELD_OUT_CONTEXT_WORDS
}
#: Every held-out phrasing of every concept (no edit prompt may name one).
HELD_OUT_PHRASINGS: tuple[str, ...] = tuple(p for phrasings in IMPLICIT_EVAL.values() for p in phrasings)


@dataclass(frozen=True)
class Split:
    """One named set of benchmark prompts (each with the colour and shape a correct image shows)."""

    name: str
    prompts: tuple[Prompt, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.prompts)


def held_out_phrasings(target: str) -> Split:
    """The target's held-out phrasings, bare: with every shape (or, for a shape, every colour)."""
    kind = _kind(target)
    prompts = [
        _prompt(phrasing, target, kind, Context(other=other), implicit=True)
        for phrasing in IMPLICIT_EVAL[target]
        for other in _others(kind)
    ]
    return Split("held-out phrasings", tuple(prompts))


def in_contexts(
    target: str, *, vocabulary: dict[str, tuple[str, ...]], per_phrasing: int, seed: int, name: str
) -> Split:
    """The target's explicit name and held-out phrasings in ``per_phrasing`` contexts each (for
    every shape, or every colour), drawn from ``vocabulary`` with ``seed``; every context states
    at least two of its slots, so no prompt is bare."""
    kind = _kind(target)
    rng = np.random.default_rng(seed)
    prompts = []
    for phrasing in (target, *IMPLICIT_EVAL[target]):
        for other in _others(kind):
            for _ in range(per_phrasing):
                context = _context(rng, vocabulary, other)
                prompts.append(_prompt(phrasing, target, kind, context, implicit=phrasing != target))
    return Split(name, tuple(prompts))


def neighbours(target: str, contexts: Split, name: str = "neighbours") -> Split:
    """Every other concept of the target's kind, by its explicit name, in the contexts of ``contexts``
    (the prompts naming the target explicitly are rewritten with the neighbour's name)."""
    kind = _kind(target)
    names = COLOUR_NAMES if kind == "colour" else SHAPE_NAMES
    prompts = []
    for prompt in contexts.prompts:
        if prompt.implicit is not None:
            continue
        for other in names:
            if other == target:
                continue
            text = _replace_word(prompt.text, target, other)
            colour, shape = (other, prompt.shape) if kind == "colour" else (prompt.colour, other)
            prompts.append(Prompt(text, colour, shape))
    return Split(name, tuple(prompts))


def benchmark_splits(target: str, *, per_phrasing: int = 2, seed: int = 0) -> dict[str, Split]:
    """The reported splits (held-out phrasings, held-out contexts, neighbours) and the tuning splits
    (the target and its neighbours in tuning contexts)."""
    held_out = in_contexts(
        target, vocabulary=HELD_OUT_CONTEXT_WORDS, per_phrasing=per_phrasing, seed=seed, name="held-out contexts"
    )
    tuning = in_contexts(
        target, vocabulary=TUNING_CONTEXT_WORDS, per_phrasing=per_phrasing, seed=seed + 1, name="tuning"
    )
    splits = {
        "held-out phrasings": held_out_phrasings(target),
        "held-out contexts": held_out,
        "neighbours": neighbours(target, held_out),
        "tuning": tuning,
        "tuning neighbours": neighbours(target, tuning, name="tuning neighbours"),
    }
    problems = split_overlaps(splits.values())
    if problems:  # a construction error, not a user's: the vocabularies above must stay apart
        raise AssertionError("benchmark splits overlap: " + "; ".join(problems))
    return splits


def overlap_problems(edit_prompts: Iterable[str]) -> list[str]:
    """Why a recipe's edit prompts may not be evaluated on the reported splits: each prompt that
    names a held-out phrasing or uses a held-out context word, with what it names."""
    held_out_words = [w for words in HELD_OUT_CONTEXT_WORDS.values() for w in words]
    problems = []
    for text in dict.fromkeys(edit_prompts):
        named = [p for p in HELD_OUT_PHRASINGS if mentions(text, p)]
        used = [w for w in held_out_words if mentions(text, w)]
        if named or used:
            what = ", ".join([*(f"held-out phrasing {p!r}" for p in named), *(f"held-out context {w!r}" for w in used)])
            problems.append(f"{text!r} names {what}")
    return problems


def split_overlaps(splits: Iterable[Split]) -> list[str]:
    """Prompt texts that occur in more than one split (there must be none)."""
    seen: dict[str, str] = {}
    problems = []
    for split in splits:
        for text in split.texts:
            if text in seen and seen[text] != split.name:
                problems.append(f"{text!r} is in both {seen[text]!r} and {split.name!r}")
            seen.setdefault(text, split.name)
    return problems


def _kind(target: str) -> Kind:
    if target not in CONCEPTS:
        raise ValueError(f"unknown concept {target!r}; the shapes world has {', '.join(CONCEPTS)}")
    return CONCEPTS[target].kind


def _others(kind: Kind) -> Sequence[str]:
    return SHAPE_NAMES if kind == "colour" else COLOUR_NAMES


def _context(rng: np.random.Generator, vocabulary: dict[str, tuple[str, ...]], other: str) -> Context:
    """A context stating two to four of the vocabulary's slots, each with one of its words."""
    slots = list(vocabulary)
    chosen = set(rng.choice(len(slots), size=int(rng.integers(2, len(slots) + 1)), replace=False).tolist())
    words = {slot: _pick(rng, vocabulary[slot]) if i in chosen else None for i, slot in enumerate(slots)}
    return Context(other=other, **words)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _prompt(phrasing: str, target: str, kind: Kind, context: Context, *, implicit: bool) -> Prompt:
    text = caption(phrasing, kind, context)
    colour, shape = (target, context.other) if kind == "colour" else (context.other, target)
    assert colour is not None and shape is not None  # every benchmark context names the other attribute
    return Prompt(text, colour, shape, kind if implicit else None)


def _replace_word(text: str, old: str, new: str) -> str:
    """``text`` with the whole word ``old`` replaced by ``new``, and every article fitted to its next word."""
    replaced = re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new, text, count=1)
    return re.sub(r"\ban? (?=(\w))", lambda m: "an " if m.group(1) in "aeiou" else "a ", replaced)
