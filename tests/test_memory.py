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


def test_parked_tensors_of_every_dtype_and_shape_come_back_bit_for_bit() -> None:
    """The parked file is read back tensor by tensor with plain file reads (no memory map)."""
    module = torch.nn.Module()
    values = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2, 2).bfloat16(),
        "f64": torch.randn(4, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.randint(0, 256, (9,), dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    for name, value in values.items():
        module.register_buffer(name, value.clone())
    module.weight = torch.nn.Parameter(torch.randn(3, 3))
    weight = module.weight.detach().clone()
    with ParkedModules({"m": module}):
        assert module.f32.numel() == 0 and module.weight.numel() == 0
    for name, value in values.items():
        got = getattr(module, name)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), name
    assert torch.equal(module.weight, weight) and isinstance(module.weight, torch.nn.Parameter)


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


def test_micro_batches_rebuild_a_coupled_loss_exactly(tmp_path: Path) -> None:
    """A loss that couples its samples (not a sum over them) cannot be back-propagated sample by sample:
    ``predict_noise`` runs each micro-batch without a graph and again with one in backward. The gradient
    is the whole batch's: float64, so only summation order differs (~1e-16; 1e-10 catches any real
    difference, which shows at 1e-6 or above)."""
    with isolated_host(FakeMethodsPlugin()):
        edits = {}
        for label, training in {"whole": {}, "micro": {"micro_batch": 1}}.items():
            recipe = tiny_recipe(
                {"method": "test_q_steer", "params": {"samples": 3}, "training": {"steps": 3, **training}}
            )
            result = conceptedit.apply(
                recipe, pipeline=build_tiny_sd(dtype=torch.float64), out=tmp_path / label, quiet=True
            )
            edits[label] = {
                name: result.pipeline.unet.get_parameter(name.removeprefix("unet.")).detach().clone()
                for name in result.changed
            }
    base = dict(build_tiny_sd(dtype=torch.float64).unet.named_parameters())
    assert edits["whole"].keys() == edits["micro"].keys() and edits["whole"]
    assert max(float((w - base[n.removeprefix("unet.")]).abs().max()) for n, w in edits["whole"].items()) > 1e-6
    for name, weight in edits["whole"].items():
        torch.testing.assert_close(edits["micro"][name], weight, rtol=0, atol=1e-10)


def test_training_state_is_gone_before_the_parked_modules_come_back(
    watch: _ParkingWatch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Un-parking the text encoder and VAE while the optimiser's state and the gradients are still held
    would add their bytes to the training's peak: both must be dropped first."""
    import gc

    seen: list[tuple[int, int]] = []
    real_exit = ParkedModules.__exit__
    pipe = build_tiny_sd()

    def exit_(self: ParkedModules, *args: Any) -> None:
        optimisers = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer) and o.state]
        grads = sum(p.grad is not None for p in pipe.unet.parameters())
        seen.append((len(optimisers), grads))
        real_exit(self, *args)

    monkeypatch.setattr(ParkedModules, "__exit__", exit_)
    conceptedit.apply(_steer(zero_grad=False), pipeline=pipe, out=tmp_path / "run", quiet=True)
    assert seen == [(0, 0)]
