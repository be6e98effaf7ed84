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
from torch import Tensor

from conceptedit.models.sdxl import encode_rows, second_stream_ids
from conceptedit.models.tokenizer import clean_prompt, tokenize
from conceptedit.shapes.contexts import CONTEXT_WORDS
from conceptedit.shapes.judge import Verdict, judge
from conceptedit.shapes.noise import CaptionNoise, insert_tokens
from conceptedit.shapes.splits import in_contexts
from conceptedit.shapes.world import (
    COLOUR_NAMES,
    CONCEPTS,
    SHAPE_NAMES,
    Prompt,
    explicit_prompts,
    implicit_prompts,
)

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


@torch.no_grad()
def judge_under_prefix_tokens(
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    tokens: int = 5,
    noise_seed: int = 0,
    **sampler: Any,
) -> list[Judged]:
    """Every prompt with every seed, each image's prompt behind ``tokens`` random prefix tokens of
    its own (drawn from the vocabulary but the world's words, as training's caption noise)."""
    settings = {**SAMPLER, **sampler}
    noise = CaptionNoise(pipeline.tokenizer, 1.0, tokens)
    rng = np.random.default_rng(noise_seed)
    pairs = [(p, s) for p in prompts for s in seeds]
    ids = tokenize(pipeline.tokenizer, [p.text for p, _ in pairs])
    noisy = torch.stack([insert_tokens(row, noise.random_tokens(tokens, rng), prefix=True) for row in ids])
    judged = []
    for start in range(0, len(pairs), 64):
        chunk = pairs[start : start + 64]
        embeds = prompt_embeds(pipeline, noisy[start : start + 64])
        generators = [torch.Generator().manual_seed(s) for _, s in chunk]
        out = pipeline(**embeds, generator=generators, output_type="np", **settings).images
        for (prompt, seed), image in zip(chunk, np.round(out * 255).astype(np.uint8), strict=True):
            judged.append(Judged(prompt, seed, judge(image)))
    return judged


def prompt_embeds(pipeline: Any, ids: Tensor) -> dict[str, Tensor]:
    """The pipeline's ``prompt_embeds`` for token ids of its first tokenizer; on SDXL also
    ``pooled_prompt_embeds``, with the second stream's ids derived from the first's."""
    if getattr(pipeline, "text_encoder_2", None) is None:
        return {"prompt_embeds": pipeline.text_encoder(ids)[0]}
    ids_2 = second_stream_ids(ids, int(pipeline.tokenizer.eos_token_id), int(pipeline.tokenizer_2.pad_token_id))
    rows, pooled = encode_rows(pipeline.text_encoder, pipeline.text_encoder_2, ids, ids_2)
    return {"prompt_embeds": rows, "pooled_prompt_embeds": pooled}


def context_prompts(per_phrasing: int = 1, seed: int = 0) -> list[Prompt]:
    """Every concept's explicit name and held-out phrasings inside captions of the caption grammar
    (two to four of size, position, background and prefix, from the whole context vocabulary),
    with every other-kind concept by name: ``a drawing of a tiny scarlet circle, on the right``."""
    vocabulary = {slot: CONTEXT_WORDS[slot] for slot in ("size", "position", "background", "prefix")}
    prompts: list[Prompt] = []
    for i, name in enumerate(CONCEPTS):
        split = in_contexts(name, vocabulary=vocabulary, per_phrasing=per_phrasing, seed=seed + i, name="contexts")
        prompts += split.prompts
    return prompts


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
    """Accuracy on the explicit prompts, on the held-out implicit colour and shape prompts, on
    context captions (:func:`context_prompts`, one seed each) and on the explicit prompts behind
    five random prefix tokens, overall and per concept; with every verdict, so a regression can be
    traced to its images."""
    explicit = judge_prompts(pipeline, explicit_prompts(), explicit_seeds, **sampler)
    implicit = judge_prompts(pipeline, implicit_prompts(), implicit_seeds, **sampler)
    sets = {
        "explicit": explicit,
        "implicit_colour": [j for j in implicit if j.prompt.implicit == "colour"],
        "implicit_shape": [j for j in implicit if j.prompt.implicit == "shape"],
        "contexts": judge_prompts(pipeline, context_prompts(), [0], **sampler),
        "random_prefix_tokens": judge_under_prefix_tokens(pipeline, explicit_prompts(), explicit_seeds, **sampler),
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
