"""What the denoiser predicts, and the regression target of every loss that compares to the true noise.

A diffusers scheduler's ``prediction_type`` says what the UNet outputs: ``epsilon`` (SD-1.x,
SD-2.x base at 512 px), ``v_prediction`` (SD-2.x at 768 px) or ``sample`` (the clean latent).
With ``α_t = √ᾱ_t``, ``σ_t = √(1−ᾱ_t)`` and ``x_t = α_t x₀ + σ_t ε``:

    epsilon        target ε
    v_prediction   target v  = α_t ε − σ_t x₀
    sample         target x₀

This is the one place that maps (clean latent, noise) to the target in the scheduler's terms:
a denoising loss ``‖ε_θ(x_t) − ε‖²`` becomes ``‖out_θ(x_t) − training_target(...)‖²``. It lives
beside the adapter (not in the engine) because the attacks' denoising objective needs it too,
and they sit to the engine's left; the engine and the toolkit re-export it.

Targets built from the model's own outputs at the same ``x_t`` need no conversion: at a fixed
``x_t`` every output is an affine function of the ε it implies, ``out = k_t ε + b_t x_t``
(:func:`output_per_noise` gives ``k_t``), so a combination of outputs whose weights sum to one
(ESD's ``ε(∅) − η(ε(c) − ε(∅))``, TRCE's ``f_safe``/``f_unsafe``, CFG) is the same combination
in any prediction type, and its squared distance is ``k_t²`` times the one in ε.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import Tensor

from conceptedit.api.backbone import PredictionType
from conceptedit.errors import BackboneError

PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "v_prediction", "sample")


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


def training_target(
    alphas: Tensor, clean: Tensor, noise: Tensor, timesteps: Tensor, *, prediction: PredictionType
) -> Tensor:
    """What the denoiser should output for ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` (``alphas`` = ᾱ per timestep):
    ``ε``, ``v = α_t ε − σ_t x₀`` or ``x₀`` (see the module). The ε target is ``noise`` itself."""
    if prediction == "epsilon":
        return noise.float()
    if prediction == "sample":
        return clean.float()
    if prediction == "v_prediction":
        alpha, sigma = _coefficients(alphas, timesteps, clean)
        return alpha * noise.float() - sigma * clean.float()
    raise BackboneError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTION_TYPES)}")


def output_from_noise(
    alphas: Tensor, noisy: Tensor, noise: Tensor, timesteps: Tensor, *, prediction: PredictionType
) -> Tensor:
    """The output a perfect denoiser gives at ``x_t`` if ``noise`` is its noise: the same as
    :func:`training_target` with ``x₀ = (x_t − σ_t ε)/α_t``, for latents known only by ``x_t``
    (a DDIM trajectory and its starting noise): ε, ``(ε − σ_t x_t)/α_t`` or ``(x_t − σ_t ε)/α_t``."""
    if prediction == "epsilon":
        return noise.float()
    alpha, sigma = _coefficients(alphas, timesteps, noisy)
    if prediction == "v_prediction":
        return (noise.float() - sigma * noisy.float()) / alpha
    if prediction == "sample":
        return (noisy.float() - sigma * noise.float()) / alpha
    raise BackboneError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTION_TYPES)}")


def output_per_noise(alphas: Tensor, timesteps: Tensor, *, prediction: PredictionType) -> Tensor:
    """``k_t``: how far the output moves per unit of the ε it implies, at a fixed ``x_t`` (one per
    timestep, float32): 1 (ε), ``1/α_t`` (v) or ``−σ_t/α_t`` (x₀). A difference of two outputs at the
    same ``x_t`` divided by ``k_t`` is the difference of their ε (for thresholds set in ε units)."""
    a = alphas.to(timesteps.device)[timesteps.long()].float()
    if prediction == "epsilon":
        return a.new_ones(a.shape)
    if prediction == "v_prediction":
        return 1 / a.sqrt()
    if prediction == "sample":
        return -(1 - a).sqrt() / a.sqrt()
    raise BackboneError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTION_TYPES)}")
