"""Which token rows of a prompt's encoding a closed-form edit reads, shared by every K/V method.

UCE's two reference scripts disagree on the rows, and released checkpoints depend on it:

* ``last_word`` -- one row per prompt, the last word token (the newer script; for an empty
  prompt that is the start token);
* ``last_word_to_end`` -- from the last word token to the end of the 77-token context, erase
  and guide rows aligned one to one and both cut to the shorter run (the older script, which
  RECE starts from);
* ``eot`` -- the first end token (TRCE's choice);
* ``all`` -- every one of the 77 rows (the older script's preserve rows, RECE's rounds);
* ``after_sot`` -- every row but the start token, aligned position by position (SPEED's rows
  for nudity and for the empty retain prompt: the start row is the same for every prompt).

Positions come from token ids (:class:`~conceptedit.api.edits.PromptEncoding`), never
from word counts.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import EditError

RowSelection = Literal["last_word", "last_word_to_end", "eot", "all", "after_sot"]

_CHOICES = "last_word, last_word_to_end, eot, all, after_sot"


def encoding_length(selection: RowSelection) -> Literal["full", "longest"]:
    """How far prompts must be padded for ``selection``: rows past the first [EoT] need ``full``."""
    return "full" if selection in ("last_word_to_end", "all", "after_sot") else "longest"


def select_rows(encoding: PromptEncoding, selection: RowSelection) -> Tensor:
    """The selected rows of every prompt, stacked: ``[rows, dim]``."""
    if selection in ("last_word", "eot"):
        return encoding.row(selection)
    if selection == "all":
        return encoding.hidden.reshape(-1, encoding.hidden.shape[-1])
    if selection == "after_sot":
        return encoding.hidden[:, 1:].reshape(-1, encoding.hidden.shape[-1])
    if selection == "last_word_to_end":
        start = encoding.positions("last_word").tolist()
        return torch.cat([encoding.hidden[i, s:] for i, s in enumerate(start)])
    raise EditError(f"unknown token rows {selection!r}; use one of {_CHOICES}")


def aligned_rows(source: PromptEncoding, target: PromptEncoding, selection: RowSelection) -> tuple[Tensor, Tensor]:
    """Selected rows of source/target prompt pairs, row ``i`` of one matched with row ``i`` of the other.

    For ``last_word_to_end`` each pair keeps the same number of rows from both prompts' last
    word onwards (the longer run is cut at the end of the context), so the pairs line up
    position by position after the concept.
    """
    if len(source) != len(target):
        raise EditError(f"{len(source)} source prompts but {len(target)} targets; they must pair up")
    if selection in ("last_word", "eot"):
        return source.row(selection), target.row(selection)
    if source.hidden.shape[1] != target.hidden.shape[1]:
        raise EditError(f"rows {selection!r} need both encodings padded to the same length (use length='full')")
    if selection in ("all", "after_sot"):
        return select_rows(source, selection), select_rows(target, selection)
    if selection == "last_word_to_end":
        length = source.hidden.shape[1]
        keys, goals = [], []
        for i, (a, b) in enumerate(
            zip(source.positions("last_word").tolist(), target.positions("last_word").tolist(), strict=True)
        ):
            n = length - max(a, b)
            keys.append(source.hidden[i, a : a + n])
            goals.append(target.hidden[i, b : b + n])
        return torch.cat(keys), torch.cat(goals)
    raise EditError(f"unknown token rows {selection!r}; use one of {_CHOICES}")
