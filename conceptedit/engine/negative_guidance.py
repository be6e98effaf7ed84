"""ESD's negative guidance as a building block, for ``esd`` and the methods built on it (``race``, ``receler``).

ESD (Gandikota et al., ICCV 2023) trains the model's prediction for a concept prompt ``c``
toward the frozen model's guidance *away* from it,

    target = ε*(x_t, t, ∅) − η (ε*(x_t, t, c) − ε*(x_t, t, ∅))

on latents ``x_t`` taken from partial DDIM runs on ``c``. RACE (Kim et al., ECCV 2024) keeps
that target and those latents and attacks the concept's embedding first. Plugins do not import
each other, so what both need lives here:

* :class:`NegativeGuidanceParams`: the fields (concept, η, how ``x_t`` is sampled and paired with
  its timestep, which frozen model is ``ε*``), with ESD's defaults and texts, and
  :class:`EsdUnetParams`, the same with ESD's choice of UNet weights (``parameters``);
* :class:`NegativeGuidance`: made once before training; it encodes ``c`` and ∅, draws the whole
  plan of (trajectory, step) pairs from ``ctx.generator``, samples or reads the cached latents
  (:meth:`~NegativeGuidance.sample`) and computes the target (:meth:`~NegativeGuidance.target`);
* :data:`ESD_PARAMETER_SETS`: ESD's names for the engine's parameter sets.

**Prediction types.** ``ε`` here is whatever the denoiser outputs: ε for SD-1.x, v for SD-2.x at
768 px, the flow velocity ``ε − x₀`` for FLUX. The target needs no conversion: at a fixed ``x_t`` an
output is an affine function of the noise it implies (``v = ε/α_t − (σ_t/α_t) x_t``; for flow,
``v = (ε − x_t)/(1 − σ_t)``), and the target's weights on the outputs, ``(1 + η)`` on ∅ and ``−η``
on ``c``, sum to one, so the v-target is exactly the v of the ε-target and the loss is the ε-space
loss times ``k_t²`` (``1/ᾱ_t``, or ``1/(1 − σ_t)²`` for flow): the same minimiser, a per-timestep
weight. The latents come from the adapter's sampler (DDIM reading the prediction type from the
pipeline's scheduler config, or FLUX's flow Euler), at the sampler's own timesteps.

**Frozen targets.** When the latents come from a frozen model (``sample_with: base`` or
``edit_start``) and each is fed at its own timestep (``timestep_pairing: exact``), ``ε*(x_t, t, c)`` and
``ε*(x_t, t, ∅)`` are fixed per stored latent, so with ``training.frozen_targets: cached`` (the default)
they are computed once with the latents and stored beside them in float16 (sampled by the reference
with guidance, both are by-products of the walk); a step then runs only the model being trained. The
paper's setting (``sample_with: current``) resamples every step and the CompVis pairing feeds a
timestep other than the latent's own, so both compute ``ε*`` every step, as does
``frozen_targets: recompute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator
from torch import Tensor

from conceptedit.api.context import EditContext
from conceptedit.api.params import MethodParams
from conceptedit.engine.schedules import DrawCounter, compvis_latent_steps, draw_pairs, legacy_compvis_timesteps
from conceptedit.engine.trajectories import (
    FrozenTarget,
    PlannedLatents,
    ddim_timesteps,
    partial_ddim,
    sample_planned,
    seeded_noise,
)
from conceptedit.errors import EditError

#: ESD's parameter sets, by the names the papers and code use, as engine parameter sets.
ESD_PARAMETER_SETS = {
    "x": "cross_attention",  # ESD-x: everything in the cross-attention blocks
    "x-strict": "cross_attention_kv",  # ESD-x-strict: cross-attention keys and values only
    "u": "non_cross_attention",  # ESD-u: all but cross-attention, time embedding and output head
    "full": "full",
}


class NegativeGuidanceParams(MethodParams):
    """The parameters of ESD's latents and target, what :class:`NegativeGuidance` reads. A method
    subclasses it; redeclaring a field changes its default or description and keeps its place in
    the schema."""

    concept: str = Field(description="Prompt of the concept to erase; ESD trains on the bare word, e.g. 'nudity'.")
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

    @field_validator("concept")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name the concept to erase, e.g. concept: nudity")
        return value


class EsdUnetParams(NegativeGuidanceParams):
    """:class:`NegativeGuidanceParams` and which UNet weights train, by ESD's names
    (:data:`ESD_PARAMETER_SETS`): the methods that fine-tune the UNet on this objective."""

    parameters: Literal["x", "x-strict", "u", "full"] = Field(
        "x",
        description="What trains: x = cross-attention (attn2) only (styles, artists); x-strict = attn2 keys and "
        "values only; u = everything except cross-attention, time embedding and output head (objects, nudity); "
        "full = the whole UNet.",
    )


@dataclass
class EsdSample:
    """One training latent: ``x`` after ``steps`` DDIM steps from seed ``seed``, fed to the UNet at ``t``,
    for draw ``draw`` of the plan.

    ``k`` is the drawn step index; ``steps == k`` for the exact pairing, ``S + 1 − k`` (capped)
    for the CompVis one.
    """

    x: Tensor
    t: Tensor
    k: int
    steps: int
    seed: int
    draw: int


class NegativeGuidance:
    """ESD's latents and target for one training edit; build it in ``prepare_training``.

    ``purpose`` names the starting noises' seeds (``ctx.seed_for(purpose, "noise", j)``), so two
    methods on the same edit index draw different noises. ``draws`` turns the loop's step number
    into the draw index :meth:`sample` reads.
    """

    def __init__(self, ctx: EditContext, params: NegativeGuidanceParams, purpose: str) -> None:
        p = self.params = params
        enc = ctx.encode_prompts([p.concept, ""]).hidden
        self.concept, self.empty = enc[:1], enc[1:]
        self.timesteps = ddim_timesteps(ctx, p.sampling_steps)
        self.draws = DrawCounter(ctx.training.grad_accum)
        count = ctx.training.steps * self.draws.grad_accum
        g = ctx.generator
        self.plan = draw_pairs(g, count, p.trajectories or 1, p.sampling_steps)
        if p.trajectories is None:
            self.plan[:, 0] = torch.arange(count)
        runs = p.trajectories or count
        self.seeds = [ctx.seed_for(purpose, "noise", j) for j in range(runs)]
        # Which latent each draw reads: (trajectory, DDIM steps from noise).
        self.latent_plan = self.plan.clone()
        self.compvis_t: Tensor | None = None
        if p.timestep_pairing == "compvis" and ctx.adapter.prediction_type == "flow":
            raise EditError(
                "timestep_pairing: compvis reproduces the CompVis ESD script's DDIM timesteps, which a flow-matching "
                f"model ({ctx.adapter.family}) does not have; use timestep_pairing: exact"
            )
        if p.timestep_pairing == "compvis":
            train_steps = int(ctx.pipeline.scheduler.config.num_train_timesteps)
            self.compvis_t = legacy_compvis_timesteps(self.plan[:, 1], p.sampling_steps, g, train_steps)
            self.latent_plan[:, 1] = compvis_latent_steps(self.plan[:, 1], p.sampling_steps)
        self.cached: PlannedLatents | None = None
        # ε* at each stored latent is fixed when a frozen model made it and it keeps its own timestep.
        self.stored_targets = (
            p.sample_with != "current" and self.compvis_t is None and ctx.training.frozen_targets == "cached"
        )
        if p.sample_with != "current":
            targets = {"concept": FrozenTarget(p.reference), "empty": FrozenTarget(p.reference, "")}
            self.cached = sample_planned(
                ctx,
                self.latent_plan,
                [p.concept] * runs,
                self.seeds,
                guidance=p.sampling_guidance,
                steps=p.sampling_steps,
                weights=p.sample_with,
                label="concept",
                targets=targets if self.stored_targets else None,
            )
        self.shape = ctx.adapter.latent_shape(1)[1:]

    def start_noise(self, ctx: EditContext, seed: int) -> Tensor:
        """The starting noise ``x_T`` ``[1, C, H, W]`` of the trajectory with ``seed``."""
        return seeded_noise(self.shape, [seed]).to(ctx.device)

    def sample(self, ctx: EditContext, draw: int) -> EsdSample:
        """The latent and UNet timestep of one draw (from the cache, or sampled by the current model)."""
        p = self.params
        j, k = (int(v) for v in self.plan[draw])
        steps = int(self.latent_plan[draw, 1])
        if self.cached is not None:
            x, t, _ = self.cached.take(draw, ctx.device)
        else:
            noise = self.start_noise(ctx, self.seeds[j])
            x = partial_ddim(ctx, noise, self.concept, self.empty, p.sampling_guidance, p.sampling_steps, steps)
            x = x.float()
            t = self.timesteps[k : k + 1].to(ctx.device)  # its own timestep when steps == k (exact pairing)
        if self.compvis_t is not None:
            t = self.compvis_t[draw : draw + 1].to(ctx.device)
        return EsdSample(x=x, t=t, k=k, steps=steps, seed=self.seeds[j], draw=draw)

    def predictions(self, ctx: EditContext, s: EsdSample) -> tuple[Tensor, Tensor]:
        """ε*(x, t, c) and ε*(x, t, ∅) of the frozen reference at a sample (float32, no gradients):
        stored with the latents when they are fixed, computed otherwise."""
        if self.stored_targets:
            assert self.cached is not None
            return self.cached.target("concept", s.draw, ctx.device), self.cached.target("empty", s.draw, ctx.device)
        with torch.no_grad(), ctx.reference_weights(self.params.reference):
            hidden = torch.cat([self.concept, self.empty])
            both = ctx.predict_noise(s.x.expand(2, -1, -1, -1), s.t.expand(2), hidden, frozen=True)
        e_c, e_0 = both.float().chunk(2)
        return e_c, e_0

    def target(self, ctx: EditContext, s: EsdSample) -> Tensor:
        """ε*(∅) − η (ε*(c) − ε*(∅)) of the frozen reference at a sample, without gradients."""
        e_c, e_0 = self.predictions(ctx, s)
        return e_0 - self.params.eta * (e_c - e_0)
