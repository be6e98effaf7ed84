"""Attacks shared by evaluation (measuring an erasure) and training (erasing against them).

Beneath both wings: an attack needs only a backbone adapter and an objective the caller writes.
"""

from conceptedit.attacks.embedding_pgd import EmbeddingPGD
from conceptedit.attacks.inversion import ConceptInversion, encode_with_rows, placeholder_slots
from conceptedit.attacks.objectives import denoising_objective, embedding_target_objective
from conceptedit.attacks.registry import ADVERSARIES, make_adversary
from conceptedit.attacks.ring_a_bell import RingABell, concept_vector, ring_a_bell_target
from conceptedit.attacks.soft_prompt import SoftPromptPGD, adversarial_slots, prompt_text

__all__ = [
    "ADVERSARIES",
    "ConceptInversion",
    "EmbeddingPGD",
    "RingABell",
    "SoftPromptPGD",
    "adversarial_slots",
    "concept_vector",
    "denoising_objective",
    "embedding_target_objective",
    "encode_with_rows",
    "make_adversary",
    "placeholder_slots",
    "prompt_text",
    "ring_a_bell_target",
]
