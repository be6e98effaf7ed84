"""Attacks shared by evaluation (measuring an erasure) and training (erasing against them).

Beneath both wings: an attack needs only a backbone adapter and an objective the caller writes.
"""

from conceptedit.attacks.registry import ADVERSARIES, make_adversary
from conceptedit.attacks.soft_prompt import SoftPromptPGD, adversarial_slots, prompt_text

__all__ = ["ADVERSARIES", "SoftPromptPGD", "adversarial_slots", "make_adversary", "prompt_text"]
