"""The base model's evaluation images, kept between runs.

A recipe's evaluation renders every suite twice: with the edited model and, on the same prompts
and seeds, with the base model. The base model's images depend only on the base weights, the
prompts, seeds and guidance, the sampler and its steps, the batch, the dtype, the device, the
thread count and the library versions, so running another recipe on the same base (a new edit, a
tuning sweep, the quickstart again) would render the same base images again. They are stored the
first time (safetensors: images as uint8, final latents as float32) under a key of all of these,
and read back bit for bit; anything that could change a pixel changes the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save
from torch import Tensor

from conceptedit.api.recipe import EvaluateSpec
from conceptedit.api.suite import SuitePrompt
from conceptedit.io.atomic import atomic_write_bytes

#: One arm's images and final latents, in prompt order.
Rendered = tuple[list[Image.Image], list[Tensor]]


@dataclass(frozen=True)
class BaseRenderCache:
    """Where the base arm's renders live and which base weights they belong to.

    Attributes:
        folder: The cache folder (``<cache>/evaluation``).
        model: Identifies the base model's weights (a run's base fingerprint: file hashes or a digest
            of the in-memory weights).
    """

    folder: Path
    model: str

    def key(
        self, pipeline: Any, adapter: Any, prompts: Sequence[SuitePrompt], guidance: Sequence[float], spec: EvaluateSpec
    ) -> str:
        """The cache key of rendering ``prompts`` (at ``guidance`` each) as ``spec`` says with ``pipeline``."""
        payload = {
            "model": self.model,
            "family": adapter.family,
            "dtype": str(adapter.dtype),
            "device": str(pipeline.device.type),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "scheduler": {k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")},
            "prompts": [[p.text, int(p.seed), float(g)] for p, g in zip(prompts, guidance, strict=True)],
            "steps": spec.steps,
            "batch_size": spec.batch_size,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> Rendered | None:
        """The stored renders for ``key``, or None when there are none (or the file is unreadable)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = load_file(str(path))
        except Exception:  # a damaged cache file is re-rendered, never trusted
            return None
        images = [Image.fromarray(row.numpy()) for row in data["images"]]
        return images, list(data["latents"].unbind(0))

    def store(self, key: str, rendered: Rendered) -> None:
        """Keep ``rendered`` under ``key`` (atomically: a reader never sees half a file)."""
        images, latents = rendered
        if not images:
            return
        pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
        tensors = {"images": pixels, "latents": torch.stack([latent.float().cpu() for latent in latents])}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path(key), save(tensors, metadata={"images": str(len(images))}))
