"""ESD (``esd``): erase a concept by training against negative guidance of the original model.

Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023 (arXiv 2303.07345). On a
latent ``x_t`` from a partial DDIM run on the concept prompt ``c``, the model being trained is
taught to predict, for ``c``, what the frozen original would predict with guidance *away* from
``c``:

    target = ε*(x_t, t, ∅) − η (ε*(x_t, t, c) − ε*(x_t, t, ∅))       ε*: the frozen original
    L      = ‖ε_θ(x_t, t, c) − target‖²

so that conditioning on ``c`` afterwards steers generations away from the concept. The frozen
original is the one resident UNet with the changed tensors swapped back in
(``ctx.reference_weights``), never a second copy.

Choices the two reference implementations disagree on are parameters, not silent picks:
``sample_with`` (the paper's code samples ``x_t`` with the model being trained, the later
diffusers code with the frozen one, which here lets the latents be cached),
``timestep_pairing`` (``exact``: the latent after ``k`` DDIM steps with its own timestep, as the
diffusers code does; ``compvis``: the paper's code, which draws ``t`` from ``[1000k/S,
1000(k+1)/S)`` and, because its sampler counts ``k`` as the steps left, feeds it a latent at
about that noise level; see :func:`compvis_latent_steps`), and η's convention (here the paper's:
η = 1 is the diffusers code's 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator, model_validator
from torch import Tensor

from conceptedit import EditContext, EditMethod, MethodParams, TrainingConfig, hookimpl
from conceptedit.toolkit import (
    DrawCounter,
    PlannedLatents,
    compvis_latent_steps,
    ddim_timesteps,
    draw_pairs,
    legacy_compvis_timesteps,
    partial_ddim,
    sample_planned,
    seeded_noise,
    select_parameter_set,
)

#: ESD's parameter sets, by the names the papers and code use, as engine parameter sets.
ESD_PARAMETER_SETS = {
    "x": "cross_attention",  # ESD-x: everything in the cross-attention blocks
    "x-strict": "cross_attention_kv",  # ESD-x-strict: cross-attention keys and values only
    "u": "non_cross_attention",  # ESD-u: all but cross-attention, time embedding and output head
    "full": "full",
}


class EsdParams(MethodParams):
    concept: str = Field(description="Prompt of the concept to erase; ESD trains on the bare word, e.g. 'nudity'.")
    parameters: Literal["x", "x-strict", "u", "full"] = Field(
        "x",
        description="What trains: x = cross-attention (attn2) only (styles, artists); x-strict = attn2 keys and "
        "values only; u = everything except cross-attention, time embedding and output head (objects, nudity); "
        "full = the whole UNet.",
    )
    eta: NonNegativeFloat = Field(
        1.0, description="Negative guidance η (paper convention; the diffusers rewrite's 2.0 equals 1.0 here)."
    )
    sampling_guidance: NonNegativeFloat = Field(3.0, description="CFG scale of the partial DDIM run making x_t.")
    sampling_steps: PositiveInt = Field(50, description="DDIM steps of a full run; x_t is after k ~ U{0..steps-1}.")
    sample_with: Literal["current", "base", "edit_start"] = Field(
        "current",
        description="Model that samples x_t: current = the model being trained, resampled every step (paper); "
        "base / edit_start = the frozen model, sampled once and cached (diffusers rewrite).",
    )
    trajectories: PositiveInt | None = Field(
        None, description="Distinct starting noises to draw from (None: a fresh one for every draw)."
    )
    timestep_pairing: Literal["exact", "compvis"] = Field(
        "exact",
        description="How x_t and the UNet's timestep pair up: exact = the latent after k ~ U{0..S-1} DDIM steps at "
        "its own timestep (diffusers rewrite); compvis = the paper's CompVis script: t ~ U[1000k/S, 1000(k+1)/S) "
        "on the latent its sampler leaves at that noise level (S+1-k steps; the finished latent for k <= 1).",
    )
    reference: Literal["base", "edit_start"] = Field(
        "base", description="Frozen model ε* of the target: base = before the run, edit_start = before this edit."
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_timestep_key(cls, data: Any) -> Any:
        """``legacy_timestep_mapping`` asked for a mirrored pairing; only its harmless ``false`` is still read."""
        if not isinstance(data, dict) or "legacy_timestep_mapping" not in data:
            return data
        data = dict(data)
        old = data.pop("legacy_timestep_mapping")
        if old is False:
            if data.setdefault("timestep_pairing", "exact") != "exact":
                raise ValueError(
                    "legacy_timestep_mapping: false contradicts timestep_pairing; drop legacy_timestep_mapping, "
                    "timestep_pairing replaced it"
                )
            return data
        raise ValueError(
            "legacy_timestep_mapping was replaced by timestep_pairing: its `true` fed the latent after k steps "
            "from noise a timestep from [1000k/S, 1000(k+1)/S), a mirrored pairing the CompVis code never used. "
            "Use timestep_pairing: compvis for that code's real pairing, or exact (the default)"
        )

    @field_validator("concept")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name the concept to erase, e.g. concept: nudity")
        return value


class EsdTraining(TrainingConfig):
    steps: int = Field(1000, gt=0, description="Optimiser steps (ESD paper: 1000 iterations, batch 1).")
    lr: float = Field(1e-5, gt=0, description="Learning rate (ESD paper: 1e-5).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adam", description="Optimiser (ESD paper: Adam).")


@dataclass
class EsdSample:
    """One training latent: ``x`` after ``steps`` DDIM steps from seed ``seed``, fed to the UNet at ``t``.

    ``k`` is the drawn step index; ``steps == k`` for the exact pairing, ``S + 1 − k`` (capped)
    for the CompVis one.
    """

    x: Tensor
    t: Tensor
    k: int
    steps: int
    seed: int


class Esd(EditMethod[EsdParams]):
    """ESD: MSE to the frozen model's negatively guided prediction, on the model's own trajectories."""

    name = "esd"
    summary = "ESD: train the concept's prediction toward the original's negatively guided one (trajectory loss)"
    kind = "training"
    paper = "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023, arXiv:2303.07345"
    Params = EsdParams
    Training = EsdTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        p = self.params
        return select_parameter_set(ctx.adapter, ESD_PARAMETER_SETS[p.parameters])

    def prepare_training(self, ctx: EditContext) -> None:
        p = self.params
        enc = ctx.encode_prompts([p.concept, ""]).hidden
        self.concept, self.empty = enc[:1], enc[1:]
        self.timesteps = ddim_timesteps(ctx, p.sampling_steps)
        self._draw = DrawCounter(ctx.training.grad_accum)
        draws = ctx.training.steps * self._draw.grad_accum
        g = ctx.generator
        self.plan = draw_pairs(g, draws, p.trajectories or 1, p.sampling_steps)
        if p.trajectories is None:
            self.plan[:, 0] = torch.arange(draws)
        runs = p.trajectories or draws
        self.seeds = [ctx.seed_for("esd", "noise", j) for j in range(runs)]
        # Which latent each draw reads: (trajectory, DDIM steps from noise).
        self.latent_plan = self.plan.clone()
        self.compvis_t: Tensor | None = None
        if p.timestep_pairing == "compvis":
            train_steps = int(ctx.pipeline.scheduler.config.num_train_timesteps)
            self.compvis_t = legacy_compvis_timesteps(self.plan[:, 1], p.sampling_steps, g, train_steps)
            self.latent_plan[:, 1] = compvis_latent_steps(self.plan[:, 1], p.sampling_steps)
        self.cached: PlannedLatents | None = None
        if p.sample_with != "current":
            self.cached = sample_planned(
                ctx,
                self.latent_plan,
                [p.concept] * runs,
                self.seeds,
                guidance=p.sampling_guidance,
                steps=p.sampling_steps,
                weights=p.sample_with,
                label="concept",
            )
        self._shape = ctx.adapter.latent_shape(1)[1:]

    def sample(self, ctx: EditContext, draw: int) -> EsdSample:
        """The latent and UNet timestep of one draw (from the cache, or sampled by the current model)."""
        p = self.params
        j, k = (int(v) for v in self.plan[draw])
        steps = int(self.latent_plan[draw, 1])
        if self.cached is not None:
            x, t, _ = self.cached.take(draw, ctx.device)
        else:
            noise = seeded_noise(self._shape, [self.seeds[j]]).to(ctx.device)
            x = partial_ddim(ctx, noise, self.concept, self.empty, p.sampling_guidance, p.sampling_steps, steps)
            x = x.float()
            t = self.timesteps[k : k + 1].to(ctx.device)  # its own timestep when steps == k (exact pairing)
        if self.compvis_t is not None:
            t = self.compvis_t[draw : draw + 1].to(ctx.device)
        return EsdSample(x=x, t=t, k=k, steps=steps, seed=self.seeds[j])

    def esd_target(self, ctx: EditContext, x: Tensor, t: Tensor) -> Tensor:
        """ε*(∅) − η (ε*(c) − ε*(∅)) of the frozen reference, without gradients."""
        p = self.params
        with torch.no_grad(), ctx.reference_weights(p.reference):
            hidden = torch.cat([self.concept, self.empty])
            both = ctx.predict_noise(x.expand(2, -1, -1, -1), t.expand(2), hidden, frozen=True)
            e_c, e_0 = both.float().chunk(2)
        return e_0 - p.eta * (e_c - e_0)

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        s = self.sample(ctx, self._draw(step))
        target = self.esd_target(ctx, s.x, s.t)
        pred = ctx.predict_noise(s.x, s.t, self.concept).float()
        return {"erase": F.mse_loss(pred, target)}


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Esd)
