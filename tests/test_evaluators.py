"""Evaluators are plugins: the built-in shapes judge is found through its entry point and scores samples."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conceptedit.api.evaluator import Sample
from conceptedit.plugins import new_host
from conceptedit.shapes.world import render, sample_scene


def test_the_shapes_judge_is_an_installed_evaluator_that_scores_samples() -> None:
    judge_cls = new_host().registry.evaluators["shapes-judge"]
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(40)]
    samples = [
        Sample(f"a {s.colour} {s.shape}", i, Image.fromarray(render(s)), {"colour": s.colour, "shape": s.shape})
        for i, s in enumerate(scenes)
    ]
    blank = Sample("nothing", 0, Image.new("RGB", (32, 32), (230, 230, 230)), {"colour": "red"})
    scores = judge_cls().score([*samples, blank])
    assert [row["colour"] for row in scores[:-1]] == [s.colour for s in scenes]
    assert sum(row["shape_correct"] for row in scores[:-1]) >= 39
    assert scores[-1]["colour"] == "none" and scores[-1]["colour_correct"] is False
    assert "shape_correct" not in scores[-1]
    protocol = judge_cls().protocol()
    assert protocol["scorer"] == "shapes-judge" and "red" in protocol["colours"]
