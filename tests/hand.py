"""Pieces the hand-computation tests share: a float64 tiny model, plain text encodings, and a
soft-prompt adversary that records what each attack was and found."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from conceptedit.attacks import registry
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.toolkit import SoftPromptPGD


def double_tiny_sd() -> Any:
    """tiny-sd in float64: its sums round off at ~1e-16, so a comparison no longer depends on how
    BLAS batches, blocks or threads them; what is left is the plugin's float32 element-wise rounding."""
    return build_tiny_sd().to(torch.float64)


def encode_plainly(pipe: Any, prompts: list[str]) -> Tensor:
    """Text embeddings computed without the engine (77 tokens, as the engine pads), in float32."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].float()


class RecordedSoftPrompt(SoftPromptPGD):
    """The shared soft-prompt adversary, recording each attack's settings (``made``) and result (``found``)."""

    made: ClassVar[list[SoftPromptPGD]] = []
    found: ClassVar[list[Any]] = []

    def attack(self, prompt: str, objective: Any, **kw: Any) -> Any:
        RecordedSoftPrompt.made.append(self)
        RecordedSoftPrompt.found.append(super().attack(prompt, objective, **kw))
        return RecordedSoftPrompt.found[-1]


def record_soft_prompts(monkeypatch: pytest.MonkeyPatch) -> type[RecordedSoftPrompt]:
    """Put :class:`RecordedSoftPrompt` in the adversary registry for one test, its records empty."""
    monkeypatch.setitem(registry.ADVERSARIES, "soft_prompt", RecordedSoftPrompt)
    RecordedSoftPrompt.made.clear()
    RecordedSoftPrompt.found.clear()
    return RecordedSoftPrompt
