"""TRCE stage 2: one training step's logged loss is the reference's formula, recomputed by hand.

The reference (ddgoodgood/TRCE@0da9b71, ``run_trce_stage2.py``) computes, on an early latent x
of a malicious trajectory at its timestep t,

    f_safe   = ε(x,t,c_s) + g (ε(x,t,c_s) − ε(x,t,∅))       ε: the original UNet
    f_unsafe = ε(x,t,c_m) + g (ε(x,t,c_m) − ε(x,t,∅))
    erase    = mean over a ∈ {ε_θ(x,t,c_m), ε_θ(x,t,∅)} of clamp(β (MSE(a, f_safe) − MSE(a, f_unsafe) + m), min=0)
    preserve = λ · mean_j MSE(ε_θ(x_j,t_j,∅), ε_stage1(x_j,t_j,∅))     x_j: unconditional latents

(β = 1; its constant 0.01 in the regulariser sum has no gradient and is left out here too). The
test records which latents the plugin read at step 2 and the trained weights θ at the start of
steps 1 and 2 (θ before step 1 *is* the stage-1 model), then evaluates the formula with plain
diffusers UNets built from those weights and a fresh original model: no engine code, no
reference-weight swapping. Everything runs in float64, so the two agree to rounding. The
frozen predictions are recomputed every step here (``frozen_targets: recompute``): the cached ones
are stored in float16, and tests/test_frozen_targets.py bounds how far training on them strays.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conceptedit_builtin.trce_steer as trce_steer
import pytest
import torch
from torch import Tensor

import conceptedit
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

F64 = torch.float64
PAIRS = [["nudity", "a person wearing clothes"], ["a naked body", "a person dressed for work"]]
TEMPLATE = "a photo of {}"
PARAMS = {
    "concepts": "nsfw",
    "prompt_template": TEMPLATE,
    "trajectories_per_concept": 2,
    "sampling_steps": 10,
    "unconditional_trajectories": 6,
    "regularization_batch": 3,
    "guidance": 15.0,
    "margin": 0.05,
    "preserve_weight": 100.0,
}
STEP = 2  # θ has moved away from the stage-1 model, so the regulariser is not trivially 0


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _record(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Wrap the plugin so each step keeps the latents it read and the weights it started from."""
    seen: dict[str, Any] = {"weights": {}, "reads": {}, "terms": {}}
    real_prepare, real_loss = trce_steer.TrceSteer.prepare_training, trce_steer.TrceSteer.trajectory_loss

    def prepare(self: Any, ctx: Any) -> None:
        real_prepare(self, ctx)
        for source in ("mal", "reg", "kept"):
            planned = getattr(self, source)
            if planned is None:  # no caption regulariser
                continue
            take = planned.take

            def recording(draw: int, device: torch.device, _take: Any = take, _source: str = source) -> Any:
                out = _take(draw, device)
                seen["reads"].setdefault(seen["step"], {})[_source] = out
                return out

            planned.take = recording

    def loss(self: Any, ctx: Any, step: int) -> dict[str, Tensor]:
        seen["step"] = step
        seen["weights"][step] = {n: p.detach().clone() for n, p in ctx.adapter.unet.named_parameters()}
        terms = real_loss(self, ctx, step)
        seen["terms"][step] = {k: float(v.detach()) for k, v in terms.items()}
        return terms

    monkeypatch.setattr(trce_steer.TrceSteer, "prepare_training", prepare)
    monkeypatch.setattr(trce_steer.TrceSteer, "trajectory_loss", loss)
    return seen


def _unet(weights: dict[str, Tensor] | None) -> Any:
    unet = build_tiny_sd(dtype=F64).unet
    if weights is not None:
        unet.load_state_dict(weights)
    return unet.eval()


def _embed(pipe: Any, prompt: str) -> Tensor:
    tokens = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids)[0]
    # conceptedit hands the UNet float32 text embeddings; use the same numbers.
    return hidden.float().to(F64)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).mean()


@pytest.mark.parametrize("anchors", ["both", "conditional"])
def test_one_step_loss_is_the_reference_formula(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anchors: str) -> None:
    """``anchors: both`` is the reference; ``conditional`` (an option) drops the ∅ branch's hinge."""
    seen = _record(monkeypatch)
    stage1 = {"method": "trce_eot", "params": {"concepts": "nsfw", "prior": None, "ridge": 0.1}}
    params = {**PARAMS, "anchors": anchors}
    stage2 = {
        "method": "trce_steer",
        "params": params,
        "training": {"steps": STEP, "lr": 1e-3, "frozen_targets": "recompute"},
    }
    recipe = tiny_recipe(stage1, stage2, concepts={"nsfw": {"pairs": PAIRS, "templates": ["{}"]}})
    conceptedit.apply(recipe, pipeline=build_tiny_sd(dtype=F64), out=tmp_path / "run", quiet=True)
    logged = json.loads((tmp_path / "run" / "logs" / "trce_steer.jsonl").read_text().splitlines()[STEP - 1])
    assert logged["step"] == STEP
    returned = seen["terms"][STEP]

    original, stage1_unet, theta = _unet(None), _unet(seen["weights"][1]), _unet(seen["weights"][STEP])
    assert any(not torch.equal(seen["weights"][1][n], seen["weights"][STEP][n]) for n in seen["weights"][1])
    x, t, (run,) = seen["reads"][STEP]["mal"]
    x_u, t_u, _ = seen["reads"][STEP]["reg"]
    concept, safe = PAIRS[run // PARAMS["trajectories_per_concept"]]  # runs are grouped by concept
    text = build_tiny_sd(dtype=F64)
    c_m, c_s, empty = (_embed(text, p) for p in (TEMPLATE.format(concept), TEMPLATE.format(safe), ""))

    def eps(unet: Any, latents: Tensor, steps: Tensor, hidden: Tensor) -> Tensor:
        with torch.no_grad():
            return unet(latents.to(F64), steps, encoder_hidden_states=hidden.expand(len(latents), -1, -1)).sample

    g, margin, lam = PARAMS["guidance"], PARAMS["margin"], PARAMS["preserve_weight"]
    e_m, e_s, e_0 = (eps(original, x, t, c) for c in (c_m, c_s, empty))
    f_safe, f_unsafe = e_s + g * (e_s - e_0), e_m + g * (e_m - e_0)
    hinges = [
        torch.clamp(1.0 * (_mse(a, f_safe) - _mse(a, f_unsafe) + margin), min=0)
        for a in (eps(theta, x, t, c_m), eps(theta, x, t, empty))[: 2 if anchors == "both" else 1]
    ]
    erase = float(torch.stack(hinges).mean())
    per_latent = [
        _mse(eps(theta, x_u[j : j + 1], t_u[j : j + 1], empty), eps(stage1_unet, x_u[j : j + 1], t_u[j : j + 1], empty))
        for j in range(len(x_u))
    ]
    preserve = lam * float(torch.stack(per_latent).mean())

    assert len(x_u) == PARAMS["regularization_batch"]
    assert all(float(h) > 0 for h in hinges), hinges  # every hinge active, so the clamp passes its value on
    assert preserve > 0
    for key, value in {"erase": erase, "preserve": preserve}.items():
        print(
            f"TRCE stage 2 {key}: plugin {returned[key]:.12g}, by hand {value:.12g}, "
            f"relative difference {abs(returned[key] - value) / value:.1e}"
        )
    # float64 throughout: the plugin's terms equal the hand computation to rounding (measured 2e-14) ...
    assert returned["erase"] == pytest.approx(erase, rel=1e-10)
    assert returned["preserve"] == pytest.approx(preserve, rel=1e-10)
    # ... and the engine logs them, rounded to float32 (relative error at most 2^-24).
    for key, value in {"erase": erase, "preserve": preserve, "total": erase + preserve}.items():
        assert logged[key] == pytest.approx(value, rel=2**-23), key


def test_caption_regulariser_keeps_each_captions_own_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``preserve_captions`` (this project's option): a second regulariser term, λ · mean_j
    MSE(ε_θ(x_j,t_j,c_j), ε_stage1(x_j,t_j,c_j)) on the original model's runs over each caption c_j,
    next to the unconditional one; both recomputed by hand."""
    seen = _record(monkeypatch)
    kept = ["a tree in a field", "a bowl of fruit", "a red bicycle"]
    (tmp_path / "kept.txt").write_text("\n".join(kept) + "\n")
    stage1 = {"method": "trce_eot", "params": {"concepts": "nsfw", "prior": None, "ridge": 0.1}}
    params = {**PARAMS, "preserve_captions": str(tmp_path / "kept.txt"), "caption_trajectories": 2}
    stage2 = {
        "method": "trce_steer",
        "params": params,
        "training": {"steps": STEP, "lr": 1e-3, "frozen_targets": "recompute"},
    }
    recipe = tiny_recipe(stage1, stage2, concepts={"nsfw": {"pairs": PAIRS, "templates": ["{}"]}})
    conceptedit.apply(recipe, pipeline=build_tiny_sd(dtype=F64), out=tmp_path / "run", quiet=True)
    logged = json.loads((tmp_path / "run" / "logs" / "trce_steer.jsonl").read_text().splitlines()[STEP - 1])
    returned = seen["terms"][STEP]

    stage1_unet, theta = _unet(seen["weights"][1]), _unet(seen["weights"][STEP])
    text = build_tiny_sd(dtype=F64)
    x_k, t_k, runs = seen["reads"][STEP]["kept"]
    assert len(x_k) == PARAMS["regularization_batch"] and set(runs) <= {0, 1}  # only the first 2 captions ran
    x_u, t_u, _ = seen["reads"][STEP]["reg"]

    def term(latents: Tensor, steps: Tensor, hidden: list[Tensor]) -> float:
        with torch.no_grad():
            per = [
                _mse(
                    theta(latents[j : j + 1].to(F64), steps[j : j + 1], encoder_hidden_states=h).sample,
                    stage1_unet(latents[j : j + 1].to(F64), steps[j : j + 1], encoder_hidden_states=h).sample,
                )
                for j, h in enumerate(hidden)
            ]
        return PARAMS["preserve_weight"] * float(torch.stack(per).mean())

    by_hand = {
        "preserve_captions": term(x_k, t_k, [_embed(text, kept[j]) for j in runs]),
        "preserve": term(x_u, t_u, [_embed(text, "")] * len(x_u)),
    }
    for key, value in by_hand.items():
        assert value > 0
        assert returned[key] == pytest.approx(value, rel=1e-10), key
    assert logged["total"] == pytest.approx(sum(returned.values()), rel=2**-23)
