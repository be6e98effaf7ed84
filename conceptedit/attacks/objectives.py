"""Objectives the attacks lower, shared by the attack suites and training methods.

An adversary only changes a prompt; what "the concept is back" means is the caller's. These are
the two measures the published attacks use, written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conceptedit.api.adversary import Objective
from conceptedit.api.backbone import BackboneAdapter
from conceptedit.models.prediction import add_noise, training_target


def denoising_objective(
    adapter: BackboneAdapter, clean: Tensor, alphas: Tensor, generator: torch.Generator
) -> Objective:
    """The diffusion loss of images of the concept under the attacked prompt (UnlearnDiffAtk, textual
    inversion, CCE): each call draws one of ``clean``'s latents ``[N, C, H, W]``, a timestep and a
    noise from ``generator``, noises the latent by the model's forward process (``√ᾱ_t x₀ + √(1−ᾱ_t) ε``,
    ``alphas`` = ᾱ; ``(1 − σ_t) x₀ + σ_t ε`` for a flow model) and returns ``‖ε_θ(x_t, t, hidden) − ε‖²``
    (mean), in the model's prediction type (``‖v_θ − v‖²`` for a v-prediction or flow model). Lower
    when the prompt makes the model draw them."""
    steps = alphas.shape[0]
    prediction = adapter.prediction_type

    def objective(hidden: Tensor) -> Tensor:
        pick = int(torch.randint(0, clean.shape[0], (1,), generator=generator)) if clean.shape[0] > 1 else 0
        t = torch.randint(0, steps, (1,), generator=generator)
        x0 = clean[pick : pick + 1].float()
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        noisy = add_noise(alphas, x0, noise, t, prediction=prediction)
        predicted = adapter.predict_noise(noisy, t.to(x0.device), hidden)
        target = training_target(alphas, x0, noise, t, prediction=prediction)
        return torch.nn.functional.mse_loss(predicted.float(), target)

    return objective


def embedding_target_objective(target: Tensor) -> Objective:
    """Ring-A-Bell's fitness: ``Σ (hidden − target)²`` over every token row and channel."""

    def objective(hidden: Tensor) -> Tensor:
        return (hidden.float() - target.to(hidden.device).float()).pow(2).sum()

    return objective
