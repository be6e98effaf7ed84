"""The shipped ``builtin:shapes`` and ``builtin:shapes-xl`` weights: diffusers folders inside the package."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers loads on first use: importing the model registry must stay cheap
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

SHAPES_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "assets" / "shapes"
SHAPES_XL_MODEL_DIR = SHAPES_MODEL_DIR.with_name("shapes-xl")


def load_shapes() -> StableDiffusionPipeline:
    """The trained shapes-world model (see the folder's README.md), read from package data."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(SHAPES_MODEL_DIR), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


def load_shapes_xl() -> StableDiffusionXLPipeline:
    """The trained shapes-world model in SDXL's layout (see the folder's README.md), from package data."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(SHAPES_XL_MODEL_DIR), local_files_only=True)
