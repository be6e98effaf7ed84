"""Generating images from a base model or a run folder, and before/after grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from conceptedit.engine.reload import load, read_manifest
from conceptedit.models.backbone import resolve_backbone
from conceptedit.models.loading import load_model
from conceptedit.plugins import get_host


@dataclass
class Sampling:
    """How to sample: the same settings give the same image for the same model and seed."""

    steps: int = 30
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None


def is_run_dir(target: str | Path) -> bool:
    return (Path(target) / "manifest.json").is_file()


def load_target(target: str, *, device: torch.device, dtype: str = "float32") -> tuple[Any, Any | None]:
    """``(pipeline, base_pipeline_or_None)`` for a model id/path/built-in or a run folder.

    For a run folder the base model named in its manifest is loaded, and the edit applied to
    a second copy, so before/after images come from one load of the files.
    """
    if not is_run_dir(target):
        return load_model(target, dtype=dtype, device=device).pipeline, None
    base = read_manifest(target)["base_model"]
    if base.get("kind") == "in_memory":
        raise ValueError(f"{target} was made from an in-memory pipeline; load it with conceptedit.load in Python")
    edited = load_model(base["id"], revision=base.get("revision"), dtype=dtype, device=device).pipeline
    original = load_model(base["id"], revision=base.get("revision"), dtype=dtype, device=device).pipeline
    load(edited, target)
    return edited, original


@torch.no_grad()
def generate(pipeline: Any, prompt: str, seed: int, sampling: Sampling, count: int = 1) -> list[Image.Image]:
    """``count`` images for ``prompt``; image ``i`` uses seed ``seed + i`` on a CPU generator.

    Prompts are encoded through the backbone adapter, so they get the same pinned text cleaning
    as every edit (the pipeline's own tokenizer call would skip it).
    """
    adapter = resolve_backbone(pipeline, get_host().registry.backbones)
    dtype = pipeline.unet.dtype
    positive = adapter.encode_prompts([prompt]).hidden.to(dtype)
    negative = adapter.encode_prompts([sampling.negative_prompt or ""]).hidden.to(dtype)
    images = []
    for i in range(count):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        out = pipeline(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance,
            height=sampling.height,
            width=sampling.width,
            generator=generator,
            output_type="pil",
        )
        images.extend(out.images)
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
            canvas.paste(image.resize((cell_w, cell_h), Image.NEAREST), (label_w + c * cell_w, r * cell_h))
    return canvas
