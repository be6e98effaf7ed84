"""Every shipped recipe runs on builtin:shapes too (short settings), not only on random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COCO_30K
from typer.testing import CliRunner

from conceptedit.cli.app import app

REPO = Path(__file__).resolve().parents[1]
SHORT_TRCE = [
    f"edits.0.params.prior.captions={COCO_30K}",
    "edits.0.params.prior.limit=20",
    "edits.1.params.sampling_steps=6",
    "edits.1.params.unconditional_trajectories=4",
    "edits.1.params.trajectories_per_concept=1",
    "edits.1.training.steps=2",
]
RECIPES: dict[str, list[str]] = {
    "trce_nsfw.yaml": SHORT_TRCE,
    "trce_unsafe.yaml": SHORT_TRCE,
    "uce_artists.yaml": [],
    "esd_nudity.yaml": ["edits.0.params.sampling_steps=4", "edits.0.training.steps=2"],
    "sld_guard.yaml": [],
    "trce_plus_sld.yaml": [f"edits.0.params.prior.captions={COCO_30K}", "edits.0.params.prior.limit=20"],
    "trce_plus_esd.yaml": [
        f"edits.0.params.prior.captions={COCO_30K}",
        "edits.0.params.prior.limit=20",
        "edits.1.training.steps=2",
        "edits.1.edits.0.params.sampling_steps=6",
        "edits.1.edits.0.params.unconditional_trajectories=4",
        "edits.1.edits.0.params.trajectories_per_concept=1",
        "edits.1.edits.1.params.sampling_steps=4",
    ],
}


def test_every_recipe_is_covered() -> None:
    shipped = {p.name for p in (REPO / "recipes").glob("*.yaml")} - {"quickstart.yaml"}
    assert shipped == set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_on_the_shapes_model(recipe: str, tmp_path: Path) -> None:
    args = [
        "apply",
        str(REPO / "recipes" / recipe),
        "--model",
        "builtin:shapes",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    for item in RECIPES[recipe]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["base_model"]["id"] == "builtin:shapes"
    assert manifest["changed_tensors"] or manifest["guards"]  # every recipe edits weights or installs a guard
