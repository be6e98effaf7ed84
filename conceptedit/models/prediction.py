"""What the denoiser predicts, the forward process, and the regression target of every loss that
compares to the true noise.

A diffusers scheduler's ``prediction_type`` says what the UNet outputs: ``epsilon`` (SD-1.x,
SD-2.x base at 512 px), ``v_prediction`` (SD-2.x at 768 px) or ``sample`` (the clean latent).
With ``α_t = √ᾱ_t``, ``σ_t = √(1−ᾱ_t)`` and ``x_t = α_t x₀ + σ_t ε``:

    epsilon        target ε
    v_prediction   target v  = α_t ε − σ_t x₀
    sample         target x₀

A model trained by flow matching (FLUX; ``flow``) has another forward process: with
``σ_t = t / T`` (``T`` training timesteps, 1000; a flow sampler's timesteps are ``1000 σ``),
``x_t = (1 − σ_t) x₀ + σ_t ε`` and the model predicts the velocity ``v = dx_t/dσ = ε − x₀``:

    flow           target v  = ε − x₀

For flow models the ``alphas`` argument below is read only for its length ``T`` (the ᾱ values of a
diffusion schedule do not apply); :func:`add_noise` noises by the matching process.

This is the one place that maps (clean latent, noise) to the noisy latent and the target in the
model's terms: a denoising loss ``‖ε_θ(x_t) − ε‖²`` becomes ``‖out_θ(x_t) − training_target(...)‖²``
on ``x_t = add_noise(...)``. It lives beside the adapter (not in the engine) because the attacks'
denoising objective needs it too, and they sit to the engine's left; the engine and the toolkit
re-export it.

Targets built from the model's own outputs at the same ``x_t`` need no conversion: at a fixed
``x_t`` every output is an affine function of the ε it implies, ``out = k_t ε + b_t x_t``
(:func:`output_per_noise` gives ``k_t``; for flow ``v = (ε − x_t)/(1 − σ_t)``), so a combination of
outputs whose weights sum to one (ESD's ``ε(∅) − η(ε(c) − ε(∅))``, TRCE's ``f_safe``/``f_unsafe``,
CFG) is the same combination in any prediction type, and its squared distance is ``k_t²`` times
the one in ε.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import Tensor

from conceptedit.api.backbone import PredictionType
from conceptedit.errors import BackboneError

PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "v_prediction", "sample", "flow")


def prediction_type(scheduler_config: Mapping[str, Any]) -> PredictionType:
    """The scheduler's ``prediction_type`` (``epsilon`` when the config has none, as diffusers defaults)."""
    value = scheduler_config.get("prediction_type") or "epsilon"
    if value not in PREDICTION_TYPES:
        raise BackboneError(
            f"the scheduler predicts {value!r}; conceptedit's losses handle {', '.join(PREDICTION_TYPES)}"
        )
    return cast(PredictionType, value)


def _coefficients(alphas: Tensor, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(α_t, σ_t)`` per sample, shaped to broadcast against ``like`` (float32)."""
    a = alphas.to(like.device)[timesteps.to(like.device)].float().reshape(-1, *([1] * (like.ndim - 1)))
    return a.sqrt(), (1 - a).sqrt()


def _flow_sigma(alphas: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """``σ_t = t / T`` per sample (``T = len(alphas)``), shaped to broadcast against ``like`` (float32)."""
    sigma = timesteps.to(like.device).float() / alphas.shape[0]
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(
    alphas: Tensor, clean: Tensor, noise: Tensor, timesteps: Tensor, *, prediction: PredictionType = "epsilon"
) -> Tensor:
    """The forward process at ``timesteps``: ``√ᾱ_t x₀ + √(1−ᾱ_t) ε`` (``alphas`` = ᾱ per timestep), or
    ``(1 − σ_t) x₀ + σ_t ε`` for a ``flow`` model. Compare the output there with :func:`training_target`."""
    if prediction == "flow":
        sigma = _flow_sigma(alphas, timesteps, clean)
        return (1 - sigma) * clean.float() + sigma * noise.float()
    alpha, sigma = _coefficients(alphas, timesteps, clean)
    return alpha * clean.float() + sigma * noise.float()


def training_target(
    alphas: Tensor, clean: Tensor, noise: Tensor, timesteps: Tensor, *, prediction: PredictionType
) -> Tensor:
    """What the denoiser should output for :func:`add_noise`'s ``x_t`` (``alphas`` = ᾱ per timestep):
    ``ε``, ``v = α_t ε − σ_t x₀``, ``x₀`` or the flow velocity ``ε − x₀`` (see the module). The ε target
    is ``noise`` itself."""
    if prediction == "epsilon":
        return noise.float()
    if prediction == "sample":
        return clean.float()
    if prediction == "flow":
        return noise.float() - clean.float()
    if prediction == "v_prediction":
        alpha, sigma = _coefficients(alphas, timesteps, clean)
        return alpha * noise.float() - sigma * clean.float()
    raise BackboneError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTION_TYPES)}")


def output_from_noise(
    alphas: Tensor, noisy: Tensor, noise: Tensor, timesteps: Tensor, *, prediction: PredictionType
) -> Tensor:
    """The output a perfect denoiser gives at ``x_t`` if ``noise`` is its noise: the same as
    :func:`training_target` with ``x₀ = (x_t − σ_t ε)/α_t``, for latents known only by ``x_t``
    (a DDIM trajectory and its starting noise): ε, ``(ε − σ_t x_t)/α_t`` or ``(x_t − σ_t ε)/α_t``;
    for flow, ``x₀ = (x_t − σ_t ε)/(1 − σ_t)`` gives ``(ε − x_t)/(1 − σ_t)``."""
    if prediction == "epsilon":
        return noise.float()
    if prediction == "flow":
        return (noise.float() - noisy.float()) / (1 - _flow_sigma(alphas, timesteps, noisy))
    alpha, sigma = _coefficients(alphas, timesteps, noisy)
    if prediction == "v_prediction":
        return (noise.float() - sigma * noisy.float()) / alpha
    if prediction == "sample":
        return (noisy.float() - sigma * noise.float()) / alpha
    raise BackboneError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTION_TYPES)}")


def output_per_noise(alphas: Tensor, timesteps: Tensor, *, prediction: PredictionType) -> Tensor:
    """``k_t``: how far the output moves per unit of the ε it implies, at a fixed ``x_t`` (one per
    timestep, float32): 1 (ε), ``1/α_t`` (v), ``−σ_t/α_t`` (x₀) or ``1/(1 − σ_t)`` (flow). A difference
    of two outputs at the same ``x_t`` divided by ``k_t`` is the difference of their ε (for thresholds
    set in ε units)."""
    if prediction == "flow":
        return 1 / (1 - timesteps.float() / alphas.shape[0])
    a = alphas.to(timesteps.device)[timesteps.long()].float()
    if prediction == "epsilon":
        return a.new_ones(a.shape)
    if prediction == "v_prediction":
        return 1 / a.sqrt()
    if prediction == "sample":
        return -(1 - a).sqrt() / a.sqrt()
    raise BackboneError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTION_TYPES)}")
