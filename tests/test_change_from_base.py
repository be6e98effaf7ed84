"""The change-from-base scorer: distances from the base model's image at the same prompt and seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_PROMPTS
from PIL import Image

import conceptedit
from conceptedit import PluginError
from conceptedit.api.evaluator import Sample
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.evaluation.evaluate import evaluate
from conceptedit.evaluation.metrics import change_metrics
from conceptedit.plugins import get_host


def _scorer() -> object:
    return get_host().registry.evaluators["change-from-base"]()


def test_distances_are_measured_from_the_base_image_and_latent() -> None:
    base = np.zeros((4, 4, 3), dtype=np.uint8)
    edited = base.copy()
    edited[:2, :, 0] = 255  # half the pixels, one channel of three, moved all the way
    base_latent = torch.full((4, 2, 2), 2.0)
    latent = base_latent.clone()
    latent[0] += 1.0  # a quarter of the entries moved by 1
    same, moved = _scorer().score(
        [  # type: ignore[attr-defined]
            Sample(
                "p",
                0,
                Image.fromarray(base),
                latent=base_latent,
                base_image=Image.fromarray(base),
                base_latent=base_latent,
            ),
            Sample(
                "p",
                0,
                Image.fromarray(edited),
                latent=latent,
                base_image=Image.fromarray(base),
                base_latent=base_latent,
            ),
        ]
    )
    assert same == {"pixel_mae": 0.0, "latent_rmse": 0.0, "latent_relative": 0.0}
    assert moved["pixel_mae"] == pytest.approx(1 / 6)
    assert moved["latent_rmse"] == pytest.approx(0.5)  # sqrt(4 of 16 entries x 1 / 16)
    assert moved["latent_relative"] == pytest.approx(2.0 / 8.0)  # ||delta|| = 2, ||base|| = 8
    assert change_metrics([same, moved])["pixel_mae"] == pytest.approx(1 / 12)


def test_without_a_base_image_it_says_what_is_missing() -> None:
    image = Image.new("RGB", (4, 4))
    with pytest.raises(PluginError, match="base image"):
        _scorer().score([Sample("p", 0, image, latent=torch.zeros(4, 2, 2))])  # type: ignore[attr-defined]


def test_coco_suite_scored_by_change_from_base_measures_an_edit(tmp_path: Path) -> None:
    """Preservation without CLIP weights: COCO captions, each image against the base model's."""
    base = conceptedit.load_model("builtin:tiny-sd").pipeline
    edited = conceptedit.load_model("builtin:tiny-sd").pipeline
    with torch.no_grad():
        for layer in edited.unet.modules():
            if layer.__class__.__name__ == "Attention" and getattr(layer, "is_cross_attention", False):
                layer.to_v.weight.mul_(1.5)  # a stand-in edit of every cross-attention value
    options = {"root": str(SHARED_PROMPTS), "scorer": "change-from-base"}
    spec = EvaluateSpec(suite="coco-3k", options=options, limit=2, steps=2)
    (same,) = evaluate(base, [spec], host=get_host(), base_pipeline=conceptedit.load_model("builtin:tiny-sd").pipeline)
    (moved,) = evaluate(edited, [spec], host=get_host(), base_pipeline=base)
    assert same.metrics == {"pixel_mae": 0.0, "latent_rmse": 0.0, "latent_relative": 0.0}
    assert moved.base_metrics == {"pixel_mae": 0.0, "latent_rmse": 0.0, "latent_relative": 0.0}
    assert moved.metrics["latent_relative"] > 0.01 and moved.metrics["pixel_mae"] > 0
    assert moved.protocol["scorer"] == "change-from-base" and moved.n == 2
    spec = EvaluateSpec(suite="coco-3k", options=options, limit=1, steps=2)
    with pytest.raises(PluginError, match="--compare BASE"):
        evaluate(edited, [spec], host=get_host())
