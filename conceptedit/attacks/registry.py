"""The adversaries by kind, and the one way callers build them (clear errors on bad options)."""

from __future__ import annotations

import inspect
from typing import Any

from conceptedit.api.adversary import Adversary
from conceptedit.api.backbone import BackboneAdapter
from conceptedit.attacks.embedding_pgd import EmbeddingPGD
from conceptedit.attacks.inversion import ConceptInversion
from conceptedit.attacks.ring_a_bell import RingABell
from conceptedit.attacks.soft_prompt import SoftPromptPGD
from conceptedit.errors import AttackError

#: Attack kinds ``ctx.adversary`` and the attack suites accept.
ADVERSARIES: dict[str, type[Any]] = {
    SoftPromptPGD.kind: SoftPromptPGD,
    EmbeddingPGD.kind: EmbeddingPGD,
    ConceptInversion.kind: ConceptInversion,
    RingABell.kind: RingABell,
}


def make_adversary(kind: str, adapter: BackboneAdapter, **options: Any) -> Adversary:
    """The adversary ``kind`` on ``adapter``'s model, with ``options`` (each checked by name)."""
    if kind not in ADVERSARIES:
        raise AttackError(f"unknown attack kind {kind!r}; known: {', '.join(sorted(ADVERSARIES))}")
    cls = ADVERSARIES[kind]
    accepted = [name for name in inspect.signature(cls).parameters if name != "adapter"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise AttackError(f"attack {kind!r} has no option {', '.join(unknown)}; its options: {', '.join(accepted)}")
    adversary: Adversary = cls(adapter, **options)
    return adversary
