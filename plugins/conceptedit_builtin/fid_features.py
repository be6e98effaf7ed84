"""Inception features for FID, through clean-fid's TorchScript port of the original FID network.

FID is a number about two sets, not about one image: this evaluator only gives each image its
2048-d pool features, and a suite compares them with a reference set (real images, or the base
model's images of the same prompts) through :func:`conceptedit.evaluation.metrics.fid_from_features`.

The network is ``inception-2015-12-05.pt``, NVIDIA's TorchScript conversion of the TensorFlow
Inception graph the original FID used; images are resized to 299 x 299 as clean-fid's default
``clean`` mode does (PIL bicubic on float channels, no quantisation). Of clean-fid we import only
modules that need torch, numpy and Pillow, so a torchvision that does not match the installed
torch (which clean-fid declares but this path never imports) cannot break it.
Optional extra: ``pip install "conceptedit[fid]"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from conceptedit import Evaluator, PluginError, Sample, hookimpl
from conceptedit.toolkit import default_cache_dir

WEIGHTS_FILE = "inception-2015-12-05.pt"
WEIGHTS_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{WEIGHTS_FILE}"
WEIGHTS_ENV = "CONCEPTEDIT_FID_WEIGHTS"
BATCH = 16


class FIDFeatures(Evaluator):
    """Per image: ``inception``, the 2048-d pool features FID is computed from."""

    name = "fid-features"
    summary = "2048-d Inception pool features per image (clean-fid), for FID against a reference set"
    version = "clean-fid inception-2015-12-05, clean resize"

    def __init__(self, weights: str | None = None) -> None:
        """``weights``: a folder holding ``inception-2015-12-05.pt`` (else ``$CONCEPTEDIT_FID_WEIGHTS``,
        else the conceptedit cache, downloaded there on first use)."""
        try:
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer
        except ImportError as exc:
            raise PluginError('the fid-features evaluator needs clean-fid: pip install "conceptedit[fid]"') from exc
        folder = Path(weights or os.environ.get(WEIGHTS_ENV) or default_cache_dir() / "fid")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            model = InceptionV3W(str(folder), download=True)
        except OSError as exc:
            raise PluginError(
                f"fid-features could not get the FID Inception weights {WEIGHTS_URL} into {folder} ({exc}). "
                f"Without internet, copy {WEIGHTS_FILE} from a machine with it into a folder and point the "
                f"evaluator option weights=DIR or ${WEIGHTS_ENV}=DIR at it"
            ) from exc
        self.device = PartialState().device
        self.network = model.to(self.device).eval()
        self.resize = build_resizer("clean")

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(samples), BATCH):
            # float HWC in [0, 255] at 299 x 299 -> NCHW, as clean-fid feeds its network
            batch = np.stack([self.resize(np.asarray(s.image.convert("RGB"))) for s in samples[start : start + BATCH]])
            features = self.network(torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device, torch.float32))
            rows.extend({"inception": f} for f in features.cpu().tolist())
        return rows

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "weights": WEIGHTS_FILE,
            "resize": "clean-fid 'clean': PIL bicubic to 299 x 299 on float channels",
            "features": "2048-d pool3",
        }


@hookimpl
def conceptedit_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    register(FIDFeatures)
