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
diffusers code with the frozen one, which here lets the latents be cached, and with
``timestep_pairing: exact`` the frozen predictions at them too, ``training.frozen_targets``),
``timestep_pairing`` (``exact``: the latent after ``k`` DDIM steps with its own timestep, as the
diffusers code does; ``compvis``: the paper's code, which draws ``t`` from ``[1000k/S,
1000(k+1)/S)`` and, because its sampler counts ``k`` as the steps left, feeds it a latent at
about that noise level; see :func:`compvis_latent_steps`), and η's convention (here the paper's:
η = 1 is the diffusers code's 2).

The latents, their plan and the target live in the engine (``NegativeGuidance`` in
:mod:`conceptedit.toolkit`), shared with the methods built on ESD (``race``).

On FLUX (a flow-matching model) ``ε`` is the predicted velocity ``ε − x₀`` and the target is the
same combination of velocities (negative guidance in velocity space: its weights sum to one, so
it is exactly the velocity of the ε-space target); ``x_t`` comes from FLUX's own Euler flow
sampler at its timesteps ``1000 σ``, and the parameter sets are FLUX's (``x-strict``: the
double-stream blocks' text keys and values; docs/backbones.md, "FLUX"). ``timestep_pairing:
compvis`` needs DDIM's schedule and is refused there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from conceptedit import EditContext, EditMethod, TrainingConfig, hookimpl
from conceptedit.toolkit import (
    ESD_PARAMETER_SETS,
    EsdSample,
    EsdUnetParams,
    NegativeGuidance,
    select_parameter_set,
)

__all__ = ["ESD_PARAMETER_SETS", "Esd", "EsdParams", "EsdSample", "EsdTraining"]


# ESD's parameters are the engine's negative-guidance fields with their defaults, plus the old timestep
# key it still reads. (No docstring: it would become the recipe schema's description of these params.)
class EsdParams(EsdUnetParams):
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


class EsdTraining(TrainingConfig):
    steps: int = Field(1000, gt=0, description="Optimiser steps (ESD paper: 1000 iterations, batch 1).")
    lr: float = Field(1e-5, gt=0, description="Learning rate (ESD paper: 1e-5).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adam", description="Optimiser (ESD paper: Adam).")


class Esd(EditMethod[EsdParams]):
    """ESD: MSE to the frozen model's negatively guided prediction, on the model's own trajectories."""

    name = "esd"
    summary = "ESD: train the concept's prediction toward the original's negatively guided one (trajectory loss)"
    kind = "training"
    paper = "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023, arXiv:2303.07345"
    Params = EsdParams
    backbones = frozenset({"sd1", "sd2", "sdxl", "flux"})
    Training = EsdTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        p = self.params
        return select_parameter_set(ctx.adapter, ESD_PARAMETER_SETS[p.parameters])

    def prepare_training(self, ctx: EditContext) -> None:
        self.guidance = NegativeGuidance(ctx, self.params, purpose="esd")

    def sample(self, ctx: EditContext, draw: int) -> EsdSample:
        """The latent and UNet timestep of one draw (from the cache, or sampled by the current model)."""
        return self.guidance.sample(ctx, draw)

    def esd_target(self, ctx: EditContext, s: EsdSample) -> Tensor:
        """ε*(∅) − η (ε*(c) − ε*(∅)) of the frozen reference at a sample, without gradients."""
        return self.guidance.target(ctx, s)

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        s = self.sample(ctx, self.guidance.draws(step))
        target = self.esd_target(ctx, s)
        pred = ctx.predict_noise(s.x, s.t, self.guidance.concept).float()
        return {"erase": F.mse_loss(pred, target)}


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Esd)
