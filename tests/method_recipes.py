"""Each built-in method as a tiny recipe (2 training steps), and what the per-backbone tests check
of a run: the tensors a method declares it may change, and a fixed-seed sample."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import conceptedit
from conceptedit.testing import tiny_recipe

ART = {"art": {"concepts": ["Van Gogh", "Picasso"], "target": "art", "templates": ["{}", "a painting by {}"]}}
NSFW = {"nsfw": {"pairs": [["nudity", "a person wearing clothes"]], "templates": ["a photo of {}"]}}
GRUMPY = {"cat": {"pairs": [["Grumpy Cat", "a cat"]], "templates": ["a photo of {}"]}}
NUDE = {"nude": {"pairs": [["a nude person", "a person wearing clothes"]], "templates": ["a photo of {}"]}}
TRAIN = {"steps": 2, "lr": 1e-3}

METHODS: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "uce": ([{"method": "uce", "params": {"concepts": "art"}}], ART),
    "rece": ([{"method": "rece", "params": {"concepts": "art", "rounds": 1}}], ART),
    "speed": ([{"method": "speed", "params": {"concepts": "art", "retain": ["Monet", "a dog"]}}], ART),
    "trce_eot": ([{"method": "trce_eot", "params": {"concepts": "nsfw", "prior": None, "ridge": 0.1}}], NSFW),
    "trce_steer": (
        [
            {
                "method": "trce_steer",
                "params": {
                    "concepts": "nsfw",
                    "trajectories_per_concept": 1,
                    "sampling_steps": 4,
                    "unconditional_trajectories": 2,
                    "regularization_batch": 1,
                },
                "training": TRAIN,
            }
        ],
        NSFW,
    ),
    "esd": (
        [
            {
                "method": "esd",
                "params": {"concept": "nudity", "parameters": "x-strict", "sampling_steps": 4},
                "training": TRAIN,
            }
        ],
        {},
    ),
    "race": (
        [
            {
                "method": "race",
                "params": {"concept": "nudity", "parameters": "x", "sampling_steps": 4, "attack_steps": 2},
                "training": TRAIN,
            }
        ],
        {},
    ),
    "receler": (
        [
            {
                "method": "receler",
                "params": {
                    "concept": "a red circle",
                    "rank": 4,
                    "sampling_steps": 4,
                    "attack_tokens": 1,
                    "attack_steps": 1,
                },
                "training": TRAIN,
            }
        ],
        {},
    ),
    "advunlearn": (
        [
            {
                "method": "advunlearn",
                "params": {"concept": "a red circle", "sampling_steps": 4, "retain_batch": 1, "warmup_steps": 1},
                "training": TRAIN,
            }
        ],
        {},
    ),
    "stereo": (
        [
            {
                "method": "stereo",
                "params": {
                    "concept": "red",
                    "parameters": "x-strict",
                    "sampling_steps": 4,
                    "ste_steps": 1,
                    "inversion_steps": 1,
                    "gallery_size": 1,
                    "iterations": 1,
                },
                "training": TRAIN,
            }
        ],
        {},
    ),
    "ca": (
        [
            {
                "method": "ca",
                "params": {
                    "concepts": "cat",
                    "anchor_samples": 2,
                    "generation_steps": 3,
                    "batch_size": 1,
                    "loss": "noise",
                    "prior_weight": 0.5,
                },
                "training": TRAIN,
            }
        ],
        GRUMPY,
    ),
    "salun": (
        [
            {
                "method": "salun",
                "params": {
                    "concepts": "nude",
                    "forget_samples": 2,
                    "retain_samples": 2,
                    "batch_size": 1,
                    "generation_steps": 3,
                    "alpha": 0.5,
                    "parameters": "xattn",
                },
                "training": TRAIN,
            }
        ],
        NUDE,
    ),
    "sld": ([{"method": "sld", "params": {"safety_concept": "violence", "preset": "max"}}], {}),
    "adavd": ([{"method": "adavd", "params": {"erase": ["cat"]}}], {}),
}


def declared_tensors(spec: Any, adapter: Any) -> set[str]:
    """The base tensors a method says it may change: its trainable set, or the K/V projections it solves
    (with FLUX's maps of the pooled vector)."""
    method = spec.build()
    if method.kind == "training":
        return set(method.trainable_parameters(SimpleNamespace(adapter=adapter)))
    if method.kind == "closed_form":
        layers = [*adapter.cross_attention_layers(), *adapter.pooled_layers()]
        return {layer.parameter_name(w) for layer in layers for w in ("k", "v")}
    return set()


def sample_images(pipe: Any) -> np.ndarray:
    """A fixed-seed 64 px sample (every tiny model's native size; FLUX's pipeline would default to 1024 px)."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a cat in a garden", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images


@dataclass
class CheckedRun:
    """A method's tiny run that changed only what it declares and reloaded bit for bit."""

    run: Path
    changed: set[str]
    guards: list[Any]
    edited: Any  # the edited pipeline's adapter
    base: Any  # a fresh base pipeline


def run_and_reload(
    name: str, model: str, build: Callable[[], Any], adapter_cls: Callable[[Any], Any], tmp_path: Path
) -> CheckedRun:
    """Run ``name``'s tiny recipe on ``model``; check it changed only the tensors it declares (each
    of them and no other), left something behind, and reloads into ``build()`` with the same
    weights and the same fixed-seed images."""
    edits, concepts = METHODS[name]
    recipe = tiny_recipe(*edits, model=model, concepts=concepts)
    run = tmp_path / "run"
    result = conceptedit.apply(recipe, out=run, quiet=True)
    base = build()
    adapter = adapter_cls(base)
    spec = conceptedit.load_recipe(recipe).recipe.flat_edits()[0][1]
    declared = declared_tensors(spec, adapter)
    changed = set(result.changed)
    assert changed <= declared, sorted(changed - declared)[:3]
    guards = json.loads((run / "manifest.json").read_text()).get("guards", [])
    assert bool(changed) or guards, "the edit left nothing behind"
    edited = adapter_cls(result.pipeline)
    for full, param in adapter.named_parameters():  # only what it changed moved
        assert torch.equal(edited.get_parameter(full), param) != (full in changed), full
    reloaded = conceptedit.load(build(), run)
    for full, param in adapter_cls(reloaded).named_parameters():
        assert torch.equal(param, edited.get_parameter(full)), full
    assert np.array_equal(sample_images(reloaded), sample_images(result.pipeline))
    return CheckedRun(run, changed, guards, edited, base)
