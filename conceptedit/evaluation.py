"""Evaluating a pipeline on prompt suites: generate with fixed seeds, score, sum up, compare.

Every image has its own seeded CPU generator, so it depends only on its prompt, seed and the
model, never on batch size or on which other prompts share a batch: the base model's image and
the edited model's image for one prompt differ by the edit alone. The base model is the same
pipeline with the run's original weights swapped back in (no second copy of the model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from rich.console import Console
from rich.table import Table

from conceptedit.engine.progress import Reporter
from conceptedit.errors import PluginError
from conceptedit.evaluators import Sample
from conceptedit.io.atomic import atomic_write_text
from conceptedit.models.backbone import resolve_backbone
from conceptedit.plugins import PluginHost
from conceptedit.recipe.schema import EvaluateSpec
from conceptedit.suites import PromptSuite, SuitePrompt

DEFAULT_GUIDANCE = 7.5
EXAMPLES = 8  # prompts per suite kept as images for the report
BaseWeights = Callable[[], AbstractContextManager[Any]]


@dataclass
class SuiteResult:
    """One suite's metrics on the evaluated model (and the base model, when compared).

    Attributes:
        suite: The suite's name.
        options: Its options.
        n: Images scored per model.
        metrics: The suite's metrics on the evaluated model.
        base_metrics: The same on the base model, or None.
        protocol: How the numbers were made: scorer and version, sampler, seeds.
    """

    suite: str
    options: dict[str, Any]
    n: int
    metrics: dict[str, float]
    base_metrics: dict[str, float] | None
    protocol: dict[str, Any]
    examples: list[Example] = field(default_factory=list, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """Everything but the example images, for JSON."""
        return {k: v for k, v in asdict(self).items() if k != "examples"}


@dataclass
class Example:
    """One prompt's image from the evaluated model and, when compared, the base model's."""

    prompt: str
    seed: int
    image: Image.Image
    base_image: Image.Image | None


@torch.no_grad()
def render(
    pipeline: Any, prompts: Sequence[SuitePrompt], *, steps: int, guidance: float | None, batch_size: int,
    host: PluginHost, progress: Any = None,
) -> list[Image.Image]:
    """One image per prompt, in order, each from its own seed (and guidance, unless ``guidance`` is set)."""
    adapter = resolve_backbone(pipeline, host.registry.backbones)
    dtype = pipeline.unet.dtype
    empty = adapter.encode_prompts([""]).hidden.to(dtype)
    images: list[Image.Image] = []
    start = 0
    while start < len(prompts):
        scale = guidance or prompts[start].guidance or DEFAULT_GUIDANCE
        end = start + 1
        while end < len(prompts) and end - start < batch_size and (guidance or prompts[end].guidance
                                                                   or DEFAULT_GUIDANCE) == scale:
            end += 1
        chunk = prompts[start:end]
        hidden = adapter.encode_prompts([p.text for p in chunk]).hidden.to(dtype)
        out = pipeline(
            prompt_embeds=hidden,
            negative_prompt_embeds=empty.expand(len(chunk), -1, -1),
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=[torch.Generator("cpu").manual_seed(p.seed) for p in chunk],
            output_type="pil",
        )
        images.extend(out.images)
        if progress is not None:
            progress.advance(len(chunk))
        start = end
    return images


def evaluate(
    pipeline: Any, specs: Sequence[EvaluateSpec], *, host: PluginHost, base_weights: BaseWeights | None = None,
    base_pipeline: Any = None, reporter: Reporter | None = None,
) -> list[SuiteResult]:
    """Run every suite of ``specs`` on ``pipeline`` and, with the same seeds, on the base model:
    either ``base_weights`` (a context manager factory that puts the base weights into ``pipeline``,
    no second copy) or a separate ``base_pipeline``."""
    if base_weights is not None and base_pipeline is not None:
        raise ValueError("give base_weights or base_pipeline, not both")
    reporter = reporter or Reporter(quiet=True)
    results = []
    for spec in specs:
        suite_cls = host.suite(spec.suite)
        suite = suite_cls(suite_cls.Options.model_validate(spec.options))
        prompts = suite.prompts()[: spec.limit]
        evaluator = _evaluator(host, suite)
        compare = spec.compare_base and (base_weights is not None or base_pipeline is not None)
        label = f"eval {spec.suite}"
        with reporter.task(label, len(prompts) * (2 if compare else 1)) as bar:
            images, scores = _score(pipeline, prompts, spec, host, evaluator, bar, nullcontext())
            base_images: list[Image.Image | None] = [None] * len(prompts)
            base_scores = None
            if compare and base_pipeline is not None:
                base_images, base_scores = _score(base_pipeline, prompts, spec, host, evaluator, bar, nullcontext())
            elif compare and base_weights is not None:
                base_images, base_scores = _score(pipeline, prompts, spec, host, evaluator, bar, base_weights())
        results.append(
            SuiteResult(
                suite=spec.suite,
                options=dict(spec.options),
                n=len(prompts),
                metrics=suite.summarise(prompts, scores),
                base_metrics=suite.summarise(prompts, base_scores) if base_scores is not None else None,
                protocol={
                    **evaluator.protocol(),
                    "sampler": type(pipeline.scheduler).__name__,
                    "steps": spec.steps,
                    "guidance": spec.guidance or "per prompt (default 7.5)",
                    "seeds": [p.seed for p in prompts],
                },
                examples=[
                    Example(p.text, p.seed, image, base)
                    for p, image, base in list(zip(prompts, images, base_images, strict=True))[:EXAMPLES]
                ],
            )
        )
    return results


def _evaluator(host: PluginHost, suite: PromptSuite) -> Any:
    evaluators = host.registry.evaluators
    if suite.scorer not in evaluators:
        raise PluginError(
            f"suite {suite.name!r} is scored by evaluator {suite.scorer!r}, which no installed plugin provides; "
            "`conceptedit plugins` shows what is installed and what failed to load"
        )
    return evaluators[suite.scorer]()


def _score(
    pipeline: Any, prompts: Sequence[SuitePrompt], spec: EvaluateSpec, host: PluginHost, evaluator: Any, bar: Any,
    weights: AbstractContextManager[Any],
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Images (the first :data:`EXAMPLES`; None after) and scores of every prompt, in order.

    Under ``accelerate launch`` / torchrun each process takes every n-th prompt and the results
    are gathered: seeds are per image, so the split changes no image and no number.
    """
    state = PartialState()
    mine = list(range(state.process_index, len(prompts), state.num_processes))
    with weights:
        images = render(pipeline, [prompts[i] for i in mine], steps=spec.steps, guidance=spec.guidance,
                        batch_size=spec.batch_size, host=host, progress=bar)
    samples = [Sample(prompts[i].text, prompts[i].seed, image, prompts[i].labels) for i, image in zip(mine, images,
                                                                                                       strict=True)]
    rows = [(i, image if i < EXAMPLES else None, score)
            for i, image, score in zip(mine, images, evaluator.score(samples), strict=True)]
    if state.num_processes > 1:
        rows = sorted(gather_object(rows), key=lambda row: row[0])
    if [row[0] for row in rows] != list(range(len(prompts))):
        raise RuntimeError(f"gathered {len(rows)} results for {len(prompts)} prompts: a process lost or repeated some")
    return [row[1] for row in rows], [row[2] for row in rows]


def write_metrics(path: Path, results: Sequence[SuiteResult]) -> None:
    """``metrics.json``: every suite's numbers with the protocol that made them."""
    atomic_write_text(path, json.dumps({"suites": [r.as_dict() for r in results]}, indent=2) + "\n")


def print_results(
    results: Sequence[SuiteResult], console: Console | None = None, labels: tuple[str, str] = ("base", "edited")
) -> None:
    """A table per suite: the compared model's column (``labels[0]``) next to the evaluated one's."""
    console = console or Console()
    for r in results:
        options = ", ".join(f"{k}={v}" for k, v in r.options.items())
        table = Table(title=f"{r.suite}" + (f" ({options})" if options else "") + f", {r.n} images")
        table.add_column("metric")
        if r.base_metrics is not None:
            table.add_column(labels[0], justify="right")
        table.add_column(labels[1] if r.base_metrics is not None else "value", justify="right")
        for name, value in r.metrics.items():
            cells = [f"{r.base_metrics[name]:.3f}"] if r.base_metrics is not None else []
            table.add_row(name, *cells, f"{value:.3f}")
        console.print(table)
