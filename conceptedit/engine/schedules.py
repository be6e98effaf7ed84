"""Training schedules shared by trajectory-loss methods: which latent and timestep each draw reads.

A training method draws its whole schedule up front from ``ctx.generator`` (so it knows which
trajectory latents to sample, and a resumed run redraws the same plan), then reads one entry
per micro-batch. The pieces here are that plan, the counter that turns (step, micro-batch)
into a draw index, the timestep samplers, and the forward-diffusion noising of clean latents.

How a clean latent is noised and what the noised latent should be denoised *to* depend on the
prediction type (ε for SD-1.x, v for SD-2.x 768, flow for FLUX): :mod:`conceptedit.models.prediction`
(``add_noise`` and ``training_target``) is the one place that says it; it lives
with the adapter because the attacks' denoising objective, left of the engine, needs it too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def draw_pairs(
    generator: torch.Generator,
    draws: int,
    trajectories: int,
    steps_high: int,
    *,
    per_draw: int | None = None,
    steps_low: int = 0,
) -> Tensor:
    """A plan of (trajectory, DDIM step index) pairs: ``[draws, 2]``, or ``[draws, per_draw, 2]``.

    Trajectories are uniform in ``[0, trajectories)``, steps uniform in ``[steps_low, steps_high)``.
    All trajectory indices are drawn before all step indices; TRCE's schedules depend on that
    order, so keep it.
    """
    if trajectories < 1 or steps_high <= steps_low:
        raise ValueError(f"empty plan: {trajectories} trajectories, steps in [{steps_low}, {steps_high})")
    shape = (draws,) if per_draw is None else (draws, per_draw)
    runs = torch.randint(0, trajectories, shape, generator=generator)
    steps = torch.randint(steps_low, steps_high, shape, generator=generator)
    return torch.stack([runs, steps], dim=-1)


def needed_steps(plan: Tensor) -> dict[int, list[int]]:
    """For each trajectory a plan reads, the sorted DDIM step indices it reads."""
    needed: dict[int, set[int]] = {}
    for j, k in plan.reshape(-1, 2).tolist():
        needed.setdefault(int(j), set()).add(int(k))
    return {j: sorted(v) for j, v in needed.items()}


class DrawCounter:
    """Turns the training loop's step number into a running draw index.

    The loop calls ``trajectory_loss`` ``grad_accum`` times per step with the same step number;
    micro-batch ``m`` of step ``s`` reads draw ``(s - 1) * grad_accum + m``.
    """

    def __init__(self, grad_accum: int) -> None:
        self.grad_accum = int(grad_accum)
        self._last = (0, 0)

    def __call__(self, step: int) -> int:
        last_step, micro = self._last
        micro = micro + 1 if step == last_step else 0
        self._last = (step, micro)
        return (step - 1) * self.grad_accum + micro


def legacy_compvis_timesteps(
    step_index: Tensor, sampling_steps: int, generator: torch.Generator, train_steps: int = 1000
) -> Tensor:
    """The timestep the CompVis ESD script feeds the UNet for its draw ``t_enc = k`` of ``S``.

    Uniform in ``[round(k/S·T), round((k+1)/S·T))``, e.g. ``[20k, 20k+20)`` for S = 50. This is
    only half of that script's pairing: its sampler counts ``k`` as the steps *left*, so the
    latent for ``t_enc = k`` sits near this timestep, not ``k`` steps from noise. ESD's
    ``timestep_pairing: compvis`` supplies the matching latent; feeding this timestep to the
    latent after ``k`` steps from noise would mirror the noise level.
    """
    k = step_index.reshape(-1).tolist()
    low = [round(int(i) / sampling_steps * train_steps) for i in k]
    high = [round((int(i) + 1) / sampling_steps * train_steps) for i in k]
    return torch.stack(
        [torch.randint(a, max(b, a + 1), (1,), generator=generator)[0] for a, b in zip(low, high, strict=True)]
    ).reshape(step_index.shape)


def compvis_latent_steps(step_index: Tensor, sampling_steps: int) -> Tensor:
    """DDIM steps from noise that put the latent where the CompVis ESD script has it for ``t_enc = k``.

    That script's sampler (``ddim.py`` in the ESD repo) drops the last of its ``S`` timesteps,
    runs the other ``S − 1`` from high noise down and stops after the step with index ``k − 1``,
    so the latent sits at DDIM level ``k − 2`` (timestep 20k − 39 for S = 50), or is finished
    for ``k ≤ 1``. In the pipeline's ``S``-step DDIM schedule (SD's leading spacing, offset 1)
    that level is reached after ``S + 1 − k`` steps, capped at ``S``. The script also treats the
    starting noise as level ``S − 2`` (961) and so skips the first step this walk takes; the
    latent's noise level is the same, its path differs by that one step.
    """
    return (sampling_steps + 1 - step_index).clamp(max=sampling_steps)


def uniform_timesteps(generator: torch.Generator, count: int, train_steps: int = 1000) -> Tensor:
    """``count`` training timesteps uniform in ``[0, train_steps)``, as diffusion training draws them."""
    return torch.randint(0, train_steps, (count,), generator=generator)


def alphas_cumprod(scheduler_config: Mapping[str, object]) -> Tensor:
    """ᾱ_t of the pipeline's noise schedule (float32, one per training timestep)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(scheduler_config)).alphas_cumprod.float()
