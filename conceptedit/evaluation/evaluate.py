"""Evaluating a pipeline on prompt suites: generate with fixed seeds, score, sum up, compare.

Every image has its own seeded CPU generator, so it depends only on its prompt, seed and the
model, never on batch size or on which other prompts share a batch: the base model's image and
the edited model's image for one prompt differ by the edit alone. The base model is the same
pipeline with the run's original weights swapped back in (no second copy of the model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import Tensor

from conceptedit.api.evaluator import EXTRA_IMAGE, Evaluator, Sample
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.api.results import Example, SuiteResult
from conceptedit.api.suite import SuitePrompt
from conceptedit.errors import PluginError
from conceptedit.evaluation.base_cache import BaseRenderCache
from conceptedit.evaluation.loss_curves import LossCurves
from conceptedit.evaluation.report import write_report
from conceptedit.evaluation.sampling import sample
from conceptedit.io.atomic import atomic_write_text
from conceptedit.io.progress import Reporter
from conceptedit.models.backbone import resolve_backbone
from conceptedit.plugins import PluginHost

DEFAULT_GUIDANCE = 7.5
EXAMPLES = 8  # prompts per suite kept as images for the report
BaseWeights = Callable[[], AbstractContextManager[Any]]


def _scale(prompt: SuitePrompt, guidance: float | None) -> float:
    return guidance or prompt.guidance or DEFAULT_GUIDANCE


@torch.no_grad()
def render(
    pipeline: Any,
    prompts: Sequence[SuitePrompt],
    *,
    steps: int,
    guidance: float | None,
    batch_size: int,
    host: PluginHost,
    progress: Any = None,
) -> tuple[list[Image.Image], list[Tensor]]:
    """One image and its final latent per prompt, in order, each from its own seed (and guidance,
    unless ``guidance`` is set)."""
    adapter = resolve_backbone(pipeline, host.registry.backbones)
    dtype = adapter.dtype
    images: list[Image.Image] = []
    latents: list[Tensor] = []
    start = 0
    while start < len(prompts):
        scale = _scale(prompts[start], guidance)
        end = start + 1
        while end < len(prompts) and end - start < batch_size and _scale(prompts[end], guidance) == scale:
            end += 1
        chunk = prompts[start:end]
        hidden = adapter.encode_prompts([p.text for p in chunk]).hidden.to(dtype)
        chunk_images, chunk_latents = sample(
            pipeline, adapter, hidden, [p.seed for p in chunk], steps=steps, guidance=scale
        )
        images.extend(chunk_images)
        latents.extend(chunk_latents)
        if progress is not None:
            progress.advance(len(chunk))
        start = end
    return images, latents


@dataclass
class _PipelineModel:
    """A pipeline as :class:`~conceptedit.api.evaluator.EvaluatedModel` for evaluators that generate."""

    pipeline: Any
    host: PluginHost
    steps: int
    #: The base model's arm; None when this model is the base (or there is none).
    base: _Arm | None = None
    is_base: bool = False

    @property
    def adapter(self) -> Any:
        return resolve_backbone(self.pipeline, self.host.registry.backbones)

    @contextmanager
    def base_model(self) -> Iterator[Any]:
        if self.is_base:
            yield self.adapter
            return
        if self.base is None:
            raise PluginError("this scorer needs the base model: pass --compare BASE to `conceptedit eval`")
        pipeline, weights = self.base
        with weights():
            yield resolve_backbone(pipeline, self.host.registry.backbones)

    def render(self, hidden: Tensor, seed: int, guidance: float | None) -> tuple[Image.Image, Tensor]:
        images, latents = sample(
            self.pipeline,
            self.adapter,
            hidden.to(self.adapter.dtype),
            [seed],
            steps=self.steps,
            guidance=guidance or DEFAULT_GUIDANCE,
        )
        return images[0], latents[0]

    def evaluator(self, name: str, **options: Any) -> Evaluator:
        return _construct(self.host, name, options, who=f"an evaluator asked for {name!r}")


def evaluate(
    pipeline: Any,
    specs: Sequence[EvaluateSpec],
    *,
    host: PluginHost,
    base_weights: BaseWeights | None = None,
    base_pipeline: Any = None,
    reporter: Reporter | None = None,
    base_cache: BaseRenderCache | None = None,
) -> list[SuiteResult]:
    """Run every suite of ``specs`` on ``pipeline`` and, with the same seeds, on the base model:
    either ``base_weights`` (a context manager factory that puts the base weights into ``pipeline``,
    no second copy) or a separate ``base_pipeline``. With ``base_cache`` the base model's renders
    are read from it when an earlier run stored them, and stored otherwise."""
    if base_weights is not None and base_pipeline is not None:
        raise ValueError("give base_weights or base_pipeline, not both")
    reporter = reporter or Reporter(quiet=True)
    has_base = base_weights is not None or base_pipeline is not None
    results = []
    for spec in specs:
        suite_cls = host.suite(spec.suite)
        suite = suite_cls(suite_cls.Options.model_validate(spec.options))
        prompts = suite.prompts()[: spec.limit]
        evaluator = _construct(host, suite.scorer, suite.scorer_options(), who=f"suite {suite.name!r}")
        if evaluator.needs_base and not has_base:
            raise PluginError(
                f"suite {suite.name!r} is scored by {suite.scorer!r}, which compares each image with the base "
                "model's: pass --compare BASE to `conceptedit eval` (a recipe's evaluate: section uses the "
                "run's original weights)"
            )
        compare = spec.compare_base and has_base
        mine = _my_share(len(prompts))
        edited: _Arm = (pipeline, nullcontext)
        base: _Arm | None = None
        if base_pipeline is not None:
            base = (base_pipeline, nullcontext)
        elif base_weights is not None:
            base = (pipeline, base_weights)
        renders = len(mine) * (2 if compare or evaluator.needs_base else 1)
        with reporter.task(f"eval {spec.suite}", renders) as bar:
            base_out = (
                _render_arm(base, prompts, mine, spec, host, bar, base_cache)
                if base is not None and (compare or evaluator.needs_base)
                else None
            )
            edited_out = _render_arm(edited, prompts, mine, spec, host, bar)
            shown, scores = _score_arm(edited, evaluator, prompts, mine, edited_out, base_out, spec, host, base=base)
            base_shown: list[Any] = [None] * len(prompts)
            base_scores = None
            if compare and base is not None and base_out is not None:
                base_shown, base_scores = _score_arm(
                    base, evaluator, prompts, mine, base_out, base_out, spec, host, is_base=True
                )
        results.append(_suite_result(spec, suite, evaluator, pipeline, prompts, scores, base_scores, shown, base_shown))
    return results


def _suite_result(
    spec: EvaluateSpec,
    suite: Any,
    evaluator: Evaluator,
    pipeline: Any,
    prompts: Sequence[SuitePrompt],
    scores: list[Any],
    base_scores: list[Any] | None,
    shown: list[Any],
    base_shown: list[Any],
) -> SuiteResult:
    """One suite's metrics (and the base model's, against itself), its protocol and example images."""
    metrics = suite.summarise(prompts, scores)
    base_metrics = None
    if base_scores is not None:  # metrics of a pair: the base model's are against itself
        metrics |= suite.compare(scores, base_scores)
        base_metrics = suite.summarise(prompts, base_scores) | suite.compare(base_scores, base_scores)
    return SuiteResult(
        suite=spec.suite,
        options=dict(spec.options),
        n=len(prompts),
        metrics=metrics,
        base_metrics=base_metrics,
        protocol={
            **evaluator.protocol(),
            "sampler": type(pipeline.scheduler).__name__,
            "steps": spec.steps,
            "guidance": spec.guidance or "per prompt (default 7.5)",
            "seeds": [p.seed for p in prompts],
        },
        examples=[
            Example(p.text, p.seed, own[0], theirs[0] if theirs else None, own[1])
            for p, own, theirs in list(zip(prompts, shown, base_shown, strict=True))[:EXAMPLES]
        ],
    )


#: A model to render with: the pipeline and a factory of the context that puts its weights in place.
_Arm = tuple[Any, Callable[[], AbstractContextManager[Any]]]
#: This process's images and latents, in the order of its share of the prompts.
_Rendered = tuple[list[Image.Image], list[Tensor]]


def _construct(host: PluginHost, name: str, options: dict[str, Any], *, who: str) -> Evaluator:
    evaluators = host.registry.evaluators
    if name not in evaluators:
        raise PluginError(
            f"{who} needs evaluator {name!r}, which no installed plugin provides; "
            "`conceptedit plugins` shows what is installed and what failed to load"
        )
    return evaluators[name](**options)


def _my_share(n: int) -> list[int]:
    """Prompt indices of this process: under ``accelerate launch`` / torchrun each takes every n-th."""
    state = PartialState()
    return list(range(state.process_index, n, state.num_processes))


def _render_arm(
    arm: _Arm,
    prompts: Sequence[SuitePrompt],
    mine: Sequence[int],
    spec: EvaluateSpec,
    host: PluginHost,
    bar: Any,
    cache: BaseRenderCache | None = None,
) -> _Rendered:
    pipeline, weights = arm
    selected = [prompts[i] for i in mine]
    key = None
    if cache is not None:
        adapter = resolve_backbone(pipeline, host.registry.backbones)
        key = cache.key(pipeline, adapter, selected, [_scale(p, spec.guidance) for p in selected], spec)
        stored = cache.load(key)
        if stored is not None:
            bar.advance(len(selected))
            return stored
    with weights():
        rendered = render(
            pipeline,
            selected,
            steps=spec.steps,
            guidance=spec.guidance,
            batch_size=spec.batch_size,
            host=host,
            progress=bar,
        )
    if cache is not None and key is not None:
        cache.store(key, rendered)
    return rendered


def _score_arm(
    arm: _Arm,
    evaluator: Evaluator,
    prompts: Sequence[SuitePrompt],
    mine: Sequence[int],
    out: _Rendered,
    base_out: _Rendered | None,
    spec: EvaluateSpec,
    host: PluginHost,
    *,
    base: _Arm | None = None,
    is_base: bool = False,
) -> tuple[list[Any], list[dict[str, Any]]]:
    """(image, scorer's extra image) of the first :data:`EXAMPLES` prompts (None after) and the
    scores of every prompt, in order.

    Seeds are per image, so splitting the prompts over processes changes no image and no number;
    the shares are gathered back into prompt order. Scorers that generate see this arm's model, and
    the base arm through it (``is_base``: this arm is the base).
    """
    pipeline, weights = arm
    images, latents = out
    base_images, base_latents = base_out if base_out is not None else ([None] * len(mine), [None] * len(mine))
    samples = [
        Sample(
            prompts[i].text,
            prompts[i].seed,
            image,
            prompts[i].labels,
            _scale(prompts[i], spec.guidance),
            latent,
            base_image,
            base_latent,
        )
        for i, image, latent, base_image, base_latent in zip(
            mine, images, latents, base_images, base_latents, strict=True
        )
    ]
    with weights():
        if evaluator.needs_model:
            evaluator.attach(_PipelineModel(pipeline, host, spec.steps, base, is_base))
        scores = evaluator.score(samples)
    rows = []
    for i, image, score in zip(mine, images, scores, strict=True):
        extra = score.pop(EXTRA_IMAGE, None)  # reports show it; summaries and gathers never carry it
        rows.append((i, (image, extra) if i < EXAMPLES else None, score))
    if PartialState().num_processes > 1:
        rows = sorted(gather_object(rows), key=lambda row: row[0])
    if [row[0] for row in rows] != list(range(len(prompts))):
        raise RuntimeError(f"gathered {len(rows)} results for {len(prompts)} prompts: a process lost or repeated some")
    return [row[1] for row in rows], [row[2] for row in rows]


def evaluate_into(
    folder: Path | None,
    pipeline: Any,
    specs: Sequence[EvaluateSpec],
    *,
    host: PluginHost,
    base_weights: BaseWeights | None = None,
    base_pipeline: Any = None,
    reporter: Reporter | None = None,
    labels: tuple[str, str] = ("base", "edited"),
    curves: Sequence[LossCurves] = (),
    base_cache: BaseRenderCache | None = None,
) -> list[SuiteResult]:
    """:func:`evaluate`, then, when ``folder`` is given (the main process), ``metrics.json``,
    ``report.md`` and ``report.html`` in it: what a recipe's ``evaluate:`` and ``conceptedit eval`` write."""
    results = evaluate(
        pipeline,
        specs,
        host=host,
        base_weights=base_weights,
        base_pipeline=base_pipeline,
        reporter=reporter,
        base_cache=base_cache,
    )
    if folder is not None:
        write_metrics(folder / "metrics.json", results)
        write_report(folder, results, labels=labels, curves=curves)
    return results


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
        shown = [name for name in r.metrics if not _is_interval_part(name, r.metrics)]
        for name in shown:
            cells = [_cell(name, r.base_metrics)] if r.base_metrics is not None else []
            table.add_row(name, *cells, _cell(name, r.metrics))
        console.print(table)


def _is_interval_part(name: str, metrics: dict[str, float]) -> bool:
    """``erased_n``, ``erased_low``, ``erased_high``: shown inside the ``erased`` row, not as rows."""
    stem, _, part = name.rpartition("_")
    return part in ("n", "low", "high") and stem in metrics and f"{stem}_low" in metrics


def _cell(name: str, metrics: dict[str, float]) -> str:
    """``0.875 [0.640, 0.965] n=16`` for a rate with its Wilson interval, else the value alone."""
    value = metrics[name]
    if f"{name}_low" in metrics and f"{name}_high" in metrics and f"{name}_n" in metrics:
        low, high, n = metrics[f"{name}_low"], metrics[f"{name}_high"], metrics[f"{name}_n"]
        return f"{value:.3f} [{low:.3f}, {high:.3f}] n={n:.0f}"
    return f"{value:.3f}"
