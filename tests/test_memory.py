"""Keeping training memory low: parked idle modules, one micro-batch graph at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_methods import FakeMethodsPlugin

import conceptedit
from conceptedit import hookimpl
from conceptedit.engine.memory import ParkedModules
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_parked_modules_free_their_weights_and_restore_them_bit_for_bit() -> None:
    pipe = build_tiny_sd()
    before = {name: _state(getattr(pipe, name)) for name in ("text_encoder", "vae")}
    with ParkedModules({"text_encoder": pipe.text_encoder, "vae": pipe.vae}) as parked:
        assert parked.parked
        assert all(p.numel() == 0 for p in pipe.text_encoder.parameters())
        assert all(p.numel() == 0 for p in pipe.vae.parameters())
        assert sum(p.numel() for p in pipe.unet.parameters()) > 0  # not parked
    assert not parked.parked
    for name, state in before.items():
        after = getattr(pipe, name).state_dict()
        assert state.keys() == after.keys()
        assert all(torch.equal(state[k], after[k]) for k in state), name


class _ParkingWatch:
    """Records, at every training step, whether the text encoder's weights were parked."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @hookimpl
    def conceptedit_on_train_step(self, ctx: Any, step: int) -> None:
        self.sizes.append(sum(p.numel() for p in ctx.run.pipeline.text_encoder.parameters()))


@pytest.fixture
def watch() -> Iterator[_ParkingWatch]:
    rec = _ParkingWatch()
    with isolated_host(FakeMethodsPlugin(), rec):
        yield rec


def _steer(**training: Any) -> dict[str, Any]:
    return tiny_recipe({"method": "test_q_steer", "training": {"steps": 3, **training}})


def test_training_parks_the_text_encoder_and_gives_it_back(watch: _ParkingWatch, tmp_path: Path) -> None:
    pipe = build_tiny_sd()
    encoder = _state(pipe.text_encoder)
    conceptedit.apply(_steer(), pipeline=pipe, out=tmp_path / "a", quiet=True)
    assert watch.sizes == [0, 0, 0]
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in encoder.items())
    watch.sizes.clear()
    conceptedit.apply(_steer(park_idle_modules=False), out=tmp_path / "b", quiet=True)
    assert min(watch.sizes) > 0


def test_parking_does_not_change_the_edit(watch: _ParkingWatch, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    conceptedit.apply(_steer(), out=tmp_path / "a", quiet=True)
    conceptedit.apply(_steer(park_idle_modules=False), out=tmp_path / "b", quiet=True)
    a, b = (load_file(str(tmp_path / x / "edit.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
