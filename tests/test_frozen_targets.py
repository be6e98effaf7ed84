"""Frozen targets stored with the trajectory cache (``training.frozen_targets: cached``), on TRCE stage 2.

The targets a trajectory-loss method reads from a frozen model at its cached latents are computed
once, stored in float16 next to the latents, and read back every step. These tests check that
training on them is today's recomputing path up to that float16 rounding, that a second run does
not run the frozen model at all, and that the cache file changes with everything the targets
depend on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import conceptedit
from conceptedit.engine import trajectories
from conceptedit.engine.context import EditContext
from conceptedit.engine.trajectories import FrozenTarget, TrajectoryRequest, _cache_key
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import edit_context, isolated_host, tiny_recipe

PAIRS = [["nudity", "a person wearing clothes"], ["a naked body", "a person dressed for work"]]
STAGE1 = {"method": "trce_eot", "params": {"concepts": "nsfw", "prior": None, "ridge": 0.1}}
#: One float16 rounding: relative error at most 2^-11 of each stored target entry.
FP16 = 2.0**-11


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _stage2(steps: int = 6, **training: Any) -> dict[str, Any]:
    return {
        "method": "trce_steer",
        "params": {
            "concepts": "nsfw",
            "prompt_template": "a photo of {}",
            "trajectories_per_concept": 2,
            "sampling_steps": 10,
            "unconditional_trajectories": 6,
            "regularization_batch": 2,
        },
        "training": {"steps": steps, "lr": 1e-3, **training},
    }


def _recipe(*edits: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return tiny_recipe(*edits, concepts={"nsfw": {"pairs": PAIRS, "templates": ["{}"]}}, **fields)


def _log(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "logs" / "trce_steer.jsonl").read_text().splitlines()]


def _count_frozen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the frozen model's forward passes (``predict_noise(..., frozen=True)``), in samples."""
    calls: list[int] = []
    real = EditContext.predict_noise

    def counting(self: EditContext, latents: torch.Tensor, *args: Any, frozen: bool = False, **kw: Any) -> Any:
        if frozen:
            calls.append(latents.shape[0])
        return real(self, latents, *args, frozen=frozen, **kw)

    monkeypatch.setattr(EditContext, "predict_noise", counting)
    return calls


def test_cached_targets_train_as_the_recomputing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same losses and weights as recomputing the frozen model every step, to float16 rounding.

    A float64 model leaves float16 storage as the only difference (every other rounding is ~1e-16),
    so what the bounds allow for is the same on every machine. Each stored target is off by at most
    2^-11 of itself (the walk's by-products also by the rounding of the latent they were taken at).
    TRCE's f = (1+g) e − g e_0 with g = 15 carries up to 31·2^-11 ≈ 1.5e-2 of e's size into each MSE
    of the hinge, and the hinge is the *difference* of two such MSEs plus the margin: its error is a
    fraction of those MSEs, not of its own (small) value. So: 5e-2 relative on the hinge and the total
    (measured at most 1.2e-2), and an absolute λ·(2^-11)² ≈ 2.4e-5 on the regulariser, which is 0 at
    step 1 when recomputed (θ is the stage-1 model) and only the targets' rounding when cached
    (measured 4e-7). SGD passes gradient differences to the weights linearly, so the trained weights'
    change differs by the same order, 1e-2 of it (measured 5.5e-4); Adam would normalise each gradient
    element and turn the rounding of a near-zero one into a whole step's difference.
    """
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    runs = {}
    for mode in ("recompute", "cached"):
        stage2 = _stage2(optimizer="sgd", frozen_targets=mode)
        conceptedit.apply(
            _recipe(STAGE1, stage2), pipeline=build_tiny_sd(dtype=torch.float64), out=tmp_path / mode, quiet=True
        )
        runs[mode] = _log(tmp_path / mode)
    lam = 100.0
    for slow, fast in zip(runs["recompute"], runs["cached"], strict=True):
        for key in ("erase", "preserve", "total"):
            assert fast[key] == pytest.approx(slow[key], rel=5e-2, abs=lam * FP16**2), (fast["step"], key)
    start = {f"unet.{n}": p.detach() for n, p in build_tiny_sd(dtype=torch.float64).unet.named_parameters()}
    slow_w, fast_w = (load_file(str(tmp_path / mode / "edit.safetensors")) for mode in ("recompute", "cached"))
    assert sorted(slow_w) == sorted(fast_w)
    trained = [n for n in slow_w if "attn1." in n]  # stage 2's; the stage-1 K/V are the same in both runs
    moved = torch.cat([(slow_w[n] - start[n]).flatten() for n in trained]).norm()
    apart = torch.cat([(fast_w[n] - slow_w[n]).flatten() for n in trained]).norm()
    assert moved > 0
    assert apart <= 1e-2 * moved, float(apart / moved)


def test_targets_are_stored_and_a_second_run_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    calls = _count_frozen(monkeypatch)
    conceptedit.apply(_recipe(STAGE1, _stage2()), out=tmp_path / "a", quiet=True)
    assert calls  # sampling and the targets' pass ran the frozen model
    files = sorted((tmp_path / "cache" / "trajectories").glob("*.safetensors"))
    assert len(files) == 2  # malicious and unconditional runs
    names = {}
    for path in files:
        with safe_open(str(path), "pt") as fh:
            label = fh.metadata()["label"]
            names[label] = {k for k in fh.keys() if k.startswith("target.")}  # noqa: SIM118
            latents = fh.get_tensor("latents")
            for key in names[label]:
                value = fh.get_tensor(key)
                assert value.dtype == torch.float16 and value.shape == latents.shape, key
    assert names == {
        "malicious": {"target.malicious", "target.safe", "target.empty"},
        "unconditional": {"target.stage1"},
    }
    calls.clear()
    conceptedit.apply(_recipe(STAGE1, _stage2()), out=tmp_path / "b", quiet=True)
    assert calls == []  # neither sampling nor training ran the frozen model
    losses = [{k: v for k, v in row.items() if k != "time"} for run in ("a", "b") for row in _log(tmp_path / run)]
    assert losses[: len(losses) // 2] == losses[len(losses) // 2 :]  # the same targets, the same training
    assert (tmp_path / "a" / "edit.safetensors").read_bytes() == (tmp_path / "b" / "edit.safetensors").read_bytes()


def test_recompute_runs_the_frozen_model_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    calls = _count_frozen(monkeypatch)
    conceptedit.apply(_recipe(STAGE1, _stage2(steps=2, frozen_targets="recompute")), out=tmp_path / "r", quiet=True)
    # Each step: the original model on (c_m, c_s, ∅) at one latent, the stage-1 model on 2 regulariser latents.
    assert calls[-4:] == [3, 2, 3, 2]


def test_the_stored_targets_are_the_frozen_predictions(tmp_path: Path) -> None:
    """A by-product of the walk and a batched-pass target, checked against the frozen model by hand."""
    pipe = build_tiny_sd()
    loaded = conceptedit.load_recipe(_recipe(STAGE1))
    ctx = edit_context(loaded, pipe, tmp_path)
    request = TrajectoryRequest(
        prompts=["a cat", "a dog"],
        seeds=[3, 4],
        needed={0: [0, 4], 1: [2, 6]},  # 6 = the finished latent: no walk prediction there
        guidance=3.0,
        steps=6,
        targets={
            "own": FrozenTarget("base"),
            "empty": FrozenTarget("base", ""),
            "other": FrozenTarget("base", ["x", "y"]),
        },
    )
    kept = trajectories.sample_trajectories(ctx, request, "test")
    hidden = {p: ctx.encode_prompts([p]).hidden for p in ("a cat", "a dog", "", "x", "y")}
    for i, (j, _) in enumerate(kept.index.tolist()):
        x, t = kept.latents[i : i + 1].float(), kept.timesteps[i : i + 1]
        for name, prompt in {"own": request.prompts[j], "empty": "", "other": ["x", "y"][j]}.items():
            with torch.no_grad():
                want = pipe.unet(x, t, encoder_hidden_states=hidden[prompt]).sample[0]
            got = kept.targets[name][i].float()
            # float16 rounding of the target, and for the walk's by-products that of the latent too
            torch.testing.assert_close(got, want, rtol=8 * FP16, atol=8 * FP16 * float(want.abs().max()))


def test_the_key_changes_with_everything_the_targets_depend_on(tmp_path: Path) -> None:
    loaded = conceptedit.load_recipe(_recipe(STAGE1))
    ctx = edit_context(loaded, build_tiny_sd(), tmp_path)
    shape = (4, 8, 8)
    base = TrajectoryRequest(
        prompts=["a cat"], seeds=[1], needed={0: [2]}, targets={"stage1": FrozenTarget("edit_start", "")}
    )

    def key(request: TrajectoryRequest = base) -> str:
        return _cache_key(ctx, request, shape)

    first = key()
    variants = {
        "prompts": TrajectoryRequest(**{**base.__dict__, "prompts": ["a dog"]}),
        "seeds": TrajectoryRequest(**{**base.__dict__, "seeds": [2]}),
        "guidance": TrajectoryRequest(**{**base.__dict__, "guidance": 5.0}),
        "steps": TrajectoryRequest(**{**base.__dict__, "steps": 40}),
        "targets": TrajectoryRequest(**{**base.__dict__, "targets": {"stage1": FrozenTarget("base", "")}}),
        "target prompt": TrajectoryRequest(**{**base.__dict__, "targets": {"stage1": FrozenTarget("edit_start")}}),
        "no targets": TrajectoryRequest(**{**base.__dict__, "targets": {}}),
    }
    keys = {name: key(request) for name, request in variants.items()}
    assert len({first, *keys.values()}) == len(keys) + 1, keys
    # The base model.
    ctx.run.base_fingerprint = "another model"
    assert key() != first
    ctx.run.base_fingerprint = "test"
    assert key() == first
    # A different stage-1 edit (an earlier edit changed a weight) changes edit_start targets only.
    base_only = key(variants["targets"])
    name = next(n for n, _ in ctx.adapter.unet.named_parameters() if "attn2.to_k" in n)
    weight = ctx.adapter.get_parameter(f"unet.{name}")
    ctx.run.ledger.set(f"unet.{name}", weight.detach() * 1.01)
    ctx.run.ledger.begin_edit()
    assert key() != first
    assert key(variants["targets"]) == base_only  # the original model's targets do not depend on it
    # The sampler's noise schedule.
    ctx.run.ledger.base.clear()
    assert key() == first
    ctx.pipeline.scheduler.register_to_config(beta_end=0.02)
    assert key() != first


def test_another_stage1_edit_gives_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The malicious file (original model only) is reused; the unconditional one (stage-1 targets) is not."""
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "trajectories"
    conceptedit.apply(_recipe(STAGE1, _stage2(steps=1)), out=tmp_path / "a", quiet=True)
    first = set(folder.glob("*.safetensors"))
    other = {**STAGE1, "params": {**STAGE1["params"], "ridge": 0.5}}
    conceptedit.apply(_recipe(other, _stage2(steps=1)), out=tmp_path / "b", quiet=True)
    second = set(folder.glob("*.safetensors"))
    assert len(first) == 2 and len(second) == 3
    (new,) = second - first
    with safe_open(str(new), "pt") as fh:
        assert fh.metadata()["label"] == "unconditional"


def test_tiny_sdxl_trains_on_cached_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL's UNet needs each text row's pooled embedding: the targets' batched pass finds them too."""
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    runs = {}
    for mode in ("recompute", "cached"):
        recipe = _recipe(_stage2(steps=2, optimizer="sgd", frozen_targets=mode), model="builtin:tiny-sdxl")
        conceptedit.apply(recipe, out=tmp_path / mode, quiet=True)
        runs[mode] = _log(tmp_path / mode)
    for slow, fast in zip(runs["recompute"], runs["cached"], strict=True):
        assert fast["total"] == pytest.approx(slow["total"], rel=1e-2, abs=100.0 * FP16**2)


# --------------------------------------------------------------------------- ESD (the shared NegativeGuidance)


def _esd(steps: int = 4, **params: Any) -> dict[str, Any]:
    return {
        "method": "esd",
        "params": {"concept": "nudity", "sampling_steps": 6, "sample_with": "base", "trajectories": 3, **params},
        "training": {"steps": steps, "lr": 1e-3, "optimizer": "sgd"},
    }


def _frozen_calls_per_step(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The frozen passes (batch sizes) each ESD training step runs."""
    from conceptedit_builtin.esd import Esd

    calls = _count_frozen(monkeypatch)
    steps: list[list[int]] = []
    real = Esd.trajectory_loss

    def loss(self: Any, ctx: Any, step: int) -> Any:
        before = len(calls)
        out = real(self, ctx, step)
        steps.append(calls[before:])
        return out

    monkeypatch.setattr(Esd, "trajectory_loss", loss)
    return steps


def test_esd_stores_its_targets_and_trains_as_the_recomputing_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ESD on latents from the frozen original (``sample_with: base``, exact pairing): ε*(c) and ε*(∅) are
    the walk's own predictions, stored in float16; training reads them and runs no frozen pass.

    The target (1 + η) ε*(∅) − η ε*(c) carries at most (1 + 2η)·2^-11 of the predictions' size per
    element, a small fraction of the loss (measured 2e-4 relative); 1e-2 leaves room on any machine.
    """
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    per_step = _frozen_calls_per_step(monkeypatch)
    logs = {}
    for mode in ("recompute", "cached"):
        recipe = tiny_recipe({**_esd(), "training": {**_esd()["training"], "frozen_targets": mode}})
        per_step.clear()
        conceptedit.apply(recipe, pipeline=build_tiny_sd(dtype=torch.float64), out=tmp_path / mode, quiet=True)
        logs[mode] = [json.loads(line) for line in (tmp_path / mode / "logs" / "esd.jsonl").read_text().splitlines()]
        # recompute: ε*(c) and ε*(∅) at every step's latent, one batch of two; cached: nothing frozen
        assert per_step == ([[2]] * 4 if mode == "recompute" else [[]] * 4), (mode, per_step)
    for slow, fast in zip(logs["recompute"], logs["cached"], strict=True):
        assert fast["erase"] == pytest.approx(slow["erase"], rel=1e-2), fast["step"]
    names = set()
    for path in (tmp_path / "cache" / "trajectories").glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            names |= {k for k in fh.keys() if k.startswith("target.")}  # noqa: SIM118
    assert names == {"target.concept", "target.empty"}


@pytest.mark.parametrize("params", [{"timestep_pairing": "compvis"}, {"sample_with": "current"}])
def test_esd_recomputes_where_the_targets_are_not_fixed(
    params: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CompVis pairing feeds another timestep than the latent's own, and ``current`` resamples with the
    model being trained: no stored target fits, so ε* runs at every step."""
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    per_step = _frozen_calls_per_step(monkeypatch)
    conceptedit.apply(tiny_recipe(_esd(steps=2, **params)), out=tmp_path / "r", quiet=True)
    assert len(per_step) == 2
    assert all(calls and calls[-1] == 2 for calls in per_step)  # each step ends with ε*(c), ε*(∅) at its latent
    for path in (tmp_path / "cache" / "trajectories").glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            assert not [k for k in fh.keys() if k.startswith("target.")]  # noqa: SIM118
