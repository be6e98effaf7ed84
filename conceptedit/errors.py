"""The exceptions conceptedit raises, one tree rooted at :class:`ConceptEditError`.

Every error a user can cause (a bad recipe, a missing model, a plugin that will not load,
a loss that turns NaN) is one of these, with a message that says what went wrong, where,
and how to fix it. The CLI prints them without a traceback and exits with code 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches


def did_you_mean(name: str, known: Sequence[str], *, label: str = "known", cutoff: float = 0.6) -> str:
    """The fix for an unknown name: ``did you mean 'x'? known: a, b, c`` (the guess only when one is close)."""
    close = get_close_matches(name, list(known), n=1, cutoff=cutoff)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}{label}: " + (", ".join(known) or "none")


class ConceptEditError(Exception):
    """Base class of every error conceptedit raises on purpose."""


@dataclass
class RecipeIssue:
    """One problem found in a recipe.

    Attributes:
        path: Dotted YAML path of the offending field, e.g. ``edits.0.params.lr``.
        message: What is wrong.
        line: 1-based line in the recipe file, when known.
        suggestion: How to fix it (a did-you-mean or an allowed range), when known.
    """

    path: str
    message: str
    line: int | None = None
    suggestion: str | None = None

    def render(self, source: str | None) -> str:
        where = source or "<recipe>"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: {self.path or '<root>'}: {self.message}"
        if self.suggestion:
            text += f" ({self.suggestion})"
        return text


@dataclass
class RecipeError(ConceptEditError):
    """A recipe failed to parse or validate; carries every issue found, not just the first."""

    source: str | None
    issues: list[RecipeIssue] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{len(self.issues)} problem(s) in recipe {self.source or '<recipe>'}:"
        return "\n".join([head, *("  " + issue.render(self.source) for issue in self.issues)])


class PluginError(ConceptEditError):
    """A plugin the run needs failed to load, or a plugin broke the plugin API."""


class UnknownMethodError(PluginError):
    """A recipe or command named an edit method no installed plugin provides."""


class UnknownSuiteError(PluginError):
    """A recipe or command named a prompt suite no installed plugin provides."""


class ModelLoadError(ConceptEditError):
    """A base model could not be found or loaded (bad id, missing folder, unsupported layout)."""


class BackboneError(ConceptEditError):
    """The pipeline's architecture is not supported, or a method does not support it."""


class EditError(ConceptEditError):
    """An edit could not be computed (wrong shapes, a singular system, bad inputs)."""


class SingularSystemError(EditError):
    """A closed-form solve met a singular (or numerically singular) system."""


class TrainingError(ConceptEditError):
    """A training loop failed: non-finite loss, no trainable parameters, a bad checkpoint."""


class RunDirError(ConceptEditError):
    """A run folder is missing, incomplete, or does not match the pipeline it is loaded into."""


class AttackError(ConceptEditError):
    """An attack cannot run as asked (unknown kind or option, no room in the prompt for its tokens)."""


class ExportError(ConceptEditError):
    """A run cannot be written in the asked format (unknown format or option, base model not found,
    a part of the edit the format cannot hold)."""
