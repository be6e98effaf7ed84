"""Scoring a pipeline on the shapes world: generate with fixed seeds, judge every image.

Each image gets its own seeded generator, so an image depends only on its prompt and seed, never
on which other prompts share its batch: scores are comparable across runs and sample sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from conceptedit.models.tokenizer import clean_prompt
from conceptedit.shapes.judge import Verdict, judge
from conceptedit.shapes.world import COLOUR_NAMES, SHAPE_NAMES, Prompt, explicit_prompts, implicit_prompts

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

#: The sampler the model card's numbers use.
SAMPLER = {"num_inference_steps": 25, "guidance_scale": 5.0}


@dataclass(frozen=True)
class Accuracy:
    """Share of images whose judged colour / shape matches the prompt's, over ``n`` images."""

    colour: float
    shape: float
    n: int

    def describe(self) -> dict[str, Any]:
        return {"colour": round(self.colour, 4), "shape": round(self.shape, 4), "n": self.n}


@dataclass(frozen=True)
class Judged:
    """One generated image, its prompt and seed, and the judge's verdict."""

    prompt: Prompt
    seed: int
    verdict: Verdict

    def describe(self) -> dict[str, Any]:
        return {"prompt": asdict(self.prompt), "seed": self.seed, "verdict": asdict(self.verdict)}


@torch.no_grad()
def generate(
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 64,
    **sampler: Any,
) -> np.ndarray:
    """``(len(prompts), H, W, 3)`` uint8 images, the i-th from ``prompts[i]`` and ``seeds[i]``."""
    settings = {**SAMPLER, **sampler}
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = [clean_prompt(p) for p in prompts[start : start + batch_size]]
        generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
        out = pipeline(chunk, generator=generators, output_type="np", **settings).images
        images.append(np.round(out * 255).astype(np.uint8))
    return np.concatenate(images)


def judge_prompts(
    pipeline: StableDiffusionPipeline, prompts: Sequence[Prompt], seeds: Sequence[int], **sampler: Any
) -> list[Judged]:
    """Generate every prompt with every seed and judge the images."""
    pairs = [(p, s) for p in prompts for s in seeds]
    images = generate(pipeline, [p.text for p, _ in pairs], [s for _, s in pairs], **sampler)
    return [Judged(p, s, judge(image)) for (p, s), image in zip(pairs, images, strict=True)]


def accuracy(judged: Sequence[Judged]) -> Accuracy:
    """Colour and shape accuracy of judged images against their prompts' ground truth."""
    n = len(judged)
    colour = sum(j.verdict.colour == j.prompt.colour for j in judged) / max(n, 1)
    shape = sum(j.verdict.shape == j.prompt.shape for j in judged) / max(n, 1)
    return Accuracy(colour, shape, n)


def benchmark(
    pipeline: StableDiffusionPipeline,
    explicit_seeds: Sequence[int] = range(4),
    implicit_seeds: Sequence[int] = range(2),
    **sampler: Any,
) -> dict[str, Any]:
    """Accuracy on the explicit prompts, and on the held-out implicit colour and shape prompts,
    overall and per concept; with every verdict, so a regression can be traced to its images."""
    explicit = judge_prompts(pipeline, explicit_prompts(), explicit_seeds, **sampler)
    implicit = judge_prompts(pipeline, implicit_prompts(), implicit_seeds, **sampler)
    sets = {
        "explicit": explicit,
        "implicit_colour": [j for j in implicit if j.prompt.implicit == "colour"],
        "implicit_shape": [j for j in implicit if j.prompt.implicit == "shape"],
    }
    return {
        "sampler": {**SAMPLER, **sampler},
        "seeds": {"explicit": list(explicit_seeds), "implicit": list(implicit_seeds)},
        "accuracy": {name: accuracy(judged).describe() for name, judged in sets.items()},
        "explicit_by_concept": {
            name: accuracy([j for j in explicit if name in (j.prompt.colour, j.prompt.shape)]).describe()
            for name in (*COLOUR_NAMES, *SHAPE_NAMES)
        },
        "verdicts": {name: [j.describe() for j in judged] for name, judged in sets.items()},
    }
