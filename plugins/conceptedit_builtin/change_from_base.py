"""How far each image moved from the base model's image of the same prompt and seed.

Erasure should leave unrelated prompts alone; with seeds fixed per image, the base and edited
images differ by the edit alone, so their distance measures collateral change directly (no
reference data or weights needed). Pixel distance is what a person sees; latent distance is
what the denoiser produced before the decoder, free of the VAE's own smoothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from conceptedit import Evaluator, PluginError, Sample, hookimpl


class ChangeFromBase(Evaluator):
    """Per image: mean absolute pixel difference (0-1), latent RMS difference and its size relative
    to the base latent."""

    name = "change-from-base"
    summary = "Distance from the base model's image at the same prompt and seed (pixels and latents)"
    version = "1"
    needs_base = True

    def score(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        rows = []
        for sample in samples:
            if sample.base_image is None or sample.latent is None or sample.base_latent is None:
                raise PluginError("change-from-base needs each prompt's base image and latents (run with a base model)")
            edited = np.asarray(sample.image.convert("RGB"), dtype=np.float64) / 255
            base = np.asarray(sample.base_image.convert("RGB"), dtype=np.float64) / 255
            if edited.shape != base.shape:
                raise PluginError(f"image sizes differ from the base model's ({edited.shape} vs {base.shape})")
            delta = (sample.latent - sample.base_latent).double()
            rows.append(
                {
                    "pixel_mae": float(np.abs(edited - base).mean()),
                    "latent_rmse": float(delta.pow(2).mean().sqrt()),
                    "latent_relative": float(delta.norm() / sample.base_latent.double().norm().clamp_min(1e-12)),
                }
            )
        return rows

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "pixel_mae": "mean |edited - base| over RGB in [0, 1]",
            "latent_rmse": "root mean square of the final latents' difference",
            "latent_relative": "||edited - base|| / ||base|| of the final latents",
        }


@hookimpl
def conceptedit_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    register(ChangeFromBase)
