"""Concept sources: plugins that generate a concept set's prompt pairs.

A recipe's concept set can list its prompts (``pairs``, ``concepts``, ``file``) or ask a source
to make them::

    concepts:
      red:
        generate: {source: shapes-captions, concept: red, anchor: gray, count: 200, seed: 0}

``source`` names a :class:`ConceptSource` subclass registered through
``conceptedit_register_concept_sources``; every other key is one of its ``Options``. The
recipe loader validates the options (errors name ``concepts.<set>.generate.<option>``),
writes the resolved options, defaults included, back into the recipe, and calls
:meth:`ConceptSource.pairs` once. A source must be deterministic given its options (seed
its random draws from an option), so the resolved recipe alone reproduces the pairs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from conceptedit.api.edits import PromptPair


class ConceptSourceOptions(BaseModel):
    """Base class of a concept source's options; a misspelt key is an error."""

    model_config = ConfigDict(extra="forbid")


#: The options class of one source (``class Counting(ConceptSource[CountingOptions])``).
OptionsT = TypeVar("OptionsT", bound=ConceptSourceOptions)


class ConceptSource(ABC, Generic[OptionsT]):
    """Makes the prompt pairs of one ``generate:`` concept set from its options.

    Generic in its options, as :class:`~conceptedit.EditMethod` is in its parameters: set
    ``Options`` too (that is what the loader validates against).

    Class attributes a subclass sets: ``name`` (what a recipe writes after ``source:``),
    ``summary`` (one line for listings) and ``Options`` (its pydantic options model, a
    :class:`ConceptSourceOptions` subclass). ``source`` is not an option: the recipe key
    selects the class.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[ConceptSourceOptions]] = ConceptSourceOptions

    def __init__(self, options: OptionsT) -> None:
        self.options: OptionsT = options

    @abstractmethod
    def pairs(self) -> list[PromptPair]:
        """The concept set's prompt pairs, in a fixed order; the same options give the same list.

        Raise ``ValueError`` when the options cannot be satisfied (too few distinct prompts,
        say); the loader reports its message as a recipe error on the ``generate`` block.
        """
