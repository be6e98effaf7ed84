"""The base model's evaluation renders, kept between runs (``conceptedit.evaluation.base_cache``).

A second run of a recipe on the same base model must not render the base model's images again,
must report exactly what the first run reported, and must render again whenever anything that
could change a pixel differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import conceptedit
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.api.suite import SuitePrompt
from conceptedit.evaluation import evaluate as evaluation
from conceptedit.evaluation.base_cache import BaseRenderCache
from conceptedit.models.backbone import resolve_backbone
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.models.loading import load_model
from conceptedit.plugins import get_host

REPO = Path(__file__).resolve().parents[1]


def _recipe(seed: int = 0, seeds: int = 1, **evaluate: Any) -> dict[str, Any]:
    recipe = {
        "schema_version": 1,
        "model": "builtin:shapes",
        "device": "cpu",
        "seed": seed,
        "concepts": {"red": {"file": str(REPO / "recipes" / "concepts" / "shapes_red.json")}},
        "edits": [
            {
                "method": "trce_eot",
                "params": {"concepts": "red", "rows": {"eot": 1.0, "last_pad": 1.0}, "prior": None, "ridge": 0.1},
            }
        ],
        "evaluate": [
            {"suite": "shapes-explicit", "options": {"target": "red", "seeds": seeds}, "guidance": 5.0, **evaluate}
        ],
    }
    return recipe


def _count_renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images rendered per call of the evaluation's renderer."""
    counts: list[int] = []
    real = evaluation.render

    def counting(pipeline: Any, prompts: Any, **kwargs: Any) -> Any:
        counts.append(len(prompts))
        return real(pipeline, prompts, **kwargs)

    monkeypatch.setattr(evaluation, "render", counting)
    return counts


def test_a_second_run_reads_the_base_renders_and_reports_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    counts = _count_renders(monkeypatch)
    conceptedit.apply(_recipe(), out=tmp_path / "a", quiet=True)
    assert len(counts) == 2  # base, then edited
    n = counts[0]
    assert len(list((tmp_path / "cache" / "evaluation").glob("*.safetensors"))) == 1
    counts.clear()
    conceptedit.apply(_recipe(), out=tmp_path / "b", quiet=True)
    assert counts == [n]  # the edited model only
    first, second = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert first == second  # base metrics included
    assert (tmp_path / "a" / "report.html").read_bytes() == (tmp_path / "b" / "report.html").read_bytes()


def test_another_seed_list_steps_or_model_renders_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    counts = _count_renders(monkeypatch)
    conceptedit.apply(_recipe(), out=tmp_path / "first", quiet=True)
    for label, recipe in {
        "more seeds": _recipe(seeds=2),
        "steps": _recipe(steps=10),
        "guidance": _recipe(guidance=3.0),
        "batch": _recipe(batch_size=5),
    }.items():
        counts.clear()
        conceptedit.apply(recipe, out=tmp_path / label, quiet=True)
        assert len(counts) == 2, label  # base and edited rendered
    # Another base model: the same recipe on in-memory pipelines (keyed by a digest of their weights).
    pipes = [load_model("builtin:shapes").pipeline for _ in range(2)]
    with torch.no_grad():
        pipes[1].unet.conv_in.bias.add_(1e-3)
    counts.clear()
    for i, pipe in enumerate(pipes):
        conceptedit.apply(_recipe(), pipeline=pipe, out=tmp_path / f"memory{i}", quiet=True)
    assert len(counts) == 4  # other weights: both rendered again


def test_stored_renders_come_back_bit_for_bit(tmp_path: Path) -> None:
    cache = BaseRenderCache(tmp_path, "model")
    images = [Image.fromarray(torch.randint(0, 256, (8, 6, 3), dtype=torch.uint8).numpy()) for _ in range(3)]
    latents = [torch.randn(4, 2, 2) for _ in range(3)]
    cache.store("k", (images, latents))
    loaded = cache.load("k")
    assert loaded is not None
    for a, b in zip(loaded[0], images, strict=True):
        assert a.tobytes() == b.tobytes() and a.size == b.size and a.mode == "RGB"
    assert all(torch.equal(a, b) for a, b in zip(loaded[1], latents, strict=True))
    assert cache.load("other") is None
    (tmp_path / "k.safetensors").write_bytes(b"not safetensors")
    assert cache.load("k") is None  # a damaged file is rendered again, not trusted


def test_the_key_names_the_model_and_each_prompt() -> None:
    pipe = build_tiny_sd()
    adapter = resolve_backbone(pipe, get_host().registry.backbones)
    spec = EvaluateSpec(suite="shapes-explicit")
    prompts = [SuitePrompt("a red circle", 0), SuitePrompt("a blue square", 1)]
    key = BaseRenderCache(Path("."), "m").key
    first = key(pipe, adapter, prompts, [5.0, 5.0], spec)
    assert key(pipe, adapter, prompts, [5.0, 5.0], spec) == first
    assert BaseRenderCache(Path("."), "other").key(pipe, adapter, prompts, [5.0, 5.0], spec) != first
    assert key(pipe, adapter, [prompts[0], SuitePrompt("a blue square", 2)], [5.0, 5.0], spec) != first
    assert key(pipe, adapter, prompts[::-1], [5.0, 5.0], spec) != first
    assert key(pipe, adapter, prompts, [5.0, 7.5], spec) != first
    pipe.scheduler.register_to_config(beta_end=0.02)
    assert key(pipe, adapter, prompts, [5.0, 5.0], spec) != first
