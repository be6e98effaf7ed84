"""The one seeded sampler behind evaluation, ``conceptedit generate`` and reports, and image grids.

Prompts go in as text embeddings from the backbone adapter, so they get the same pinned text
cleaning as every edit (the pipeline's own tokenizer call would skip it). Each image has its
own CPU generator: it depends on its prompt, seed and the model alone, never on which other
prompts share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from conceptedit.api.backbone import BackboneAdapter
from conceptedit.models.backbone import resolve_backbone
from conceptedit.plugins import PluginHost, get_host


@dataclass
class Sampling:
    """How to sample: the same settings give the same image for the same model and seed."""

    steps: int = 30
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None


@torch.no_grad()
def sample(
    pipeline: Any,
    adapter: BackboneAdapter,
    hidden: Tensor,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> tuple[list[Image.Image], list[Tensor]]:
    """One image per row of ``hidden`` (text embeddings) and seed, with its final latent (decoded
    here as the pipeline would decode it). The adapter hands the embeddings to the pipeline (SDXL's
    and FLUX's pooled embeddings too), names the guidance and size arguments (FLUX: true CFG at its
    native size), turns the returned latents into its own layout and decodes as the pipeline does."""
    negative = adapter.encode_prompts([negative_prompt or ""]).hidden.to(hidden.dtype)
    arguments = adapter.pipeline_arguments(guidance, height, width)
    latents = pipeline(
        **adapter.pipeline_embeds(hidden, negative.expand(len(seeds), -1, -1)),
        **arguments,
        num_inference_steps=steps,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        output_type="latent",
    ).images
    latents = adapter.sampled_latents(latents, arguments.get("height"), arguments.get("width"))
    decoded = adapter.decode_latents(latents)
    images = pipeline.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(seeds))
    return list(images), [latent.float().cpu() for latent in latents]


def generate(
    pipeline: Any, prompt: str, seed: int, sampling: Sampling, count: int = 1, *, host: PluginHost | None = None
) -> list[Image.Image]:
    """``count`` images for ``prompt``; image ``i`` uses seed ``seed + i``, one pipeline call each."""
    adapter = resolve_backbone(pipeline, (host or get_host()).registry.backbones)
    hidden = adapter.encode_prompts([prompt]).hidden.to(adapter.dtype)
    images = []
    for i in range(count):
        image, _ = sample(
            pipeline,
            adapter,
            hidden,
            [seed + i],
            steps=sampling.steps,
            guidance=sampling.guidance,
            negative_prompt=sampling.negative_prompt,
            height=sampling.height,
            width=sampling.width,
        )
        images.extend(image)
    return images


def grid(rows: list[tuple[str, list[Image.Image]]], min_cell: int = 128) -> Image.Image:
    """A labelled grid: one row per (label, images); small images are scaled up to ``min_cell``."""
    first = rows[0][1][0]
    scale = max(1, -(-min_cell // first.width))
    cell_w, cell_h = first.width * scale, first.height * scale
    label_w = 90
    cols = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_w + cols * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * cell_h + cell_h // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            canvas.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST), (label_w + c * cell_w, r * cell_h))
    return canvas
