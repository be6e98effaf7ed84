"""The adversary contract: an attack that finds a prompt bringing an erased concept back.

One implementation serves two callers. An evaluator attacks the edited model to measure how
often the concept returns; a training method asks its context (``ctx.adversary(kind, ...)``)
for the same attack on the model being trained, and trains against what it finds. The caller
says what "bringing the concept back" means through ``objective``: a loss of the attacked
prompt's text-encoder output, lower when the concept is more present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

#: A loss of the attacked prompt's hidden states ``[1, 77, D]``; the adversary lowers it.
Objective = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AdversarialPrompt:
    """What an attack found.

    Attributes:
        ids: Token ids ``[1, 77]``, the adversarial positions filled with the nearest vocabulary tokens.
        embeddings: Token embeddings ``[1, 77, D]``; the adversarial rows are continuous.
        hidden: The text encoder's output for ``embeddings`` ``[1, 77, D]`` (what the denoiser sees).
        slots: Indices of the adversarial positions.
        text: ``ids`` decoded: the nearest discrete prompt, for reports (not what ``hidden`` encodes).
        losses: The objective at every step.
        steps: Steps taken (fewer than asked when the caller's check stopped the attack).
    """

    ids: Tensor
    embeddings: Tensor
    hidden: Tensor
    slots: tuple[int, ...]
    text: str
    losses: list[float] = field(default_factory=list)
    steps: int = 0


#: Called every ``check_every`` steps with the attack so far; ``True`` stops the attack.
Check = Callable[[AdversarialPrompt], bool]


class Adversary(Protocol):
    """An attack bound to one model (its adapter), with its settings."""

    kind: str

    def attack(
        self, prompt: str, objective: Objective, *, check: Check | None = None, check_every: int | None = None
    ) -> AdversarialPrompt:
        """Lower ``objective`` by changing only the adversarial positions of ``prompt``."""
        ...

    def protocol(self) -> dict[str, object]:
        """The settings, as recorded next to the numbers the attack produced."""
        ...
