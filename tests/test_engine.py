"""End to end on builtin:tiny-sd: every hook point, outputs, reload, determinism, failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from fake_methods import EotMap, FakeMethodsPlugin, Recorder
from safetensors.torch import load_file

import conceptedit
from conceptedit import TrainingError
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

CONCEPTS = {"cats": {"pairs": [["a cat", "a dog"], ["a kitten", "a puppy"]], "templates": ["{}", "a photo of {}"]}}


def _recipe(**overrides: Any) -> dict[str, Any]:
    recipe = tiny_recipe(
        {"method": "test_eot_map", "params": {"concepts": "cats"}},
        {"method": "test_q_steer", "name": "steer", "training": {"steps": 4}},
        concepts=CONCEPTS,
    )
    recipe.update(overrides)
    return recipe


@pytest.fixture
def recorder() -> Any:
    rec = Recorder()
    with isolated_host(FakeMethodsPlugin(), rec):
        yield rec


def test_every_hook_point_end_to_end(recorder: Recorder, tmp_path: Path) -> None:
    EotMap.encoded.clear()
    result = conceptedit.apply(_recipe(output={"formats": ["delta", "diffusers"]}), out=tmp_path / "run", quiet=True)
    run_dir = tmp_path / "run"
    assert result.run_dir == run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "edit.safetensors",
        "exports",
        "logs",
        "manifest.json",
        "recipe.resolved.yaml",
        "recipe.yaml",
    ]
    assert not (tmp_path / "run.partial").exists()

    # prompt-encoding hook saw the expanded prompt pairs (2 pairs x 2 templates)
    assert EotMap.encoded[0] == ["a cat", "a photo of a cat", "a kitten", "a photo of a kitten"]

    # exactly the declared parameters changed: attn2 to_v (closed form) and attn2 to_q (training)
    base = build_tiny_sd()
    layers = [n for n, _ in base.unet.named_modules() if n.endswith("attn2")]
    expected = {f"unet.{n}.to_v.weight" for n in layers} | {f"unet.{n}.to_q.weight" for n in layers}
    assert set(result.changed) == expected
    edited = result.pipeline
    for prefix, module in (("unet", edited.unet), ("text_encoder", edited.text_encoder), ("vae", edited.vae)):
        original = dict(getattr(base, prefix).named_parameters())
        for name, param in module.named_parameters():
            same = torch.equal(param.detach(), original[name].detach())
            assert same == (f"{prefix}.{name}" not in expected), f"{prefix}.{name}"

    # the edit file holds only those tensors
    saved = load_file(str(run_dir / "edit.safetensors"))
    assert set(saved) == expected

    # lifecycle hooks in recipe order, the training steps in between
    names = [c[0] for c in recorder.calls]
    assert names == ["before_edit", "after_edit", "before_edit"] + ["train_step"] * 4 + ["after_edit", "after_run"]
    assert next(c[1] for c in recorder.calls if c[0] == "train_step")[0] == 1

    # manifest: versions, base model, seed, per-edit timing and memory
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["base_model"]["id"] == "builtin:tiny-sd"
    assert manifest["versions"]["torch"] and manifest["versions"]["diffusers"]
    assert [e["method"] for e in manifest["edits"]] == ["test_eot_map", "test_q_steer"]
    assert all(e["seconds"] > 0 and e["peak_rss_bytes"] > 0 for e in manifest["edits"])

    # reload into a fresh base pipeline: bit-identical weights
    fresh = conceptedit.load(build_tiny_sd(), run_dir)
    for name, tensor in saved.items():
        component, rest = name.split(".", 1)
        assert torch.equal(getattr(fresh, component).get_parameter(rest), tensor)

    # the full pipeline folder loads with plain diffusers and carries the edit
    plain = StableDiffusionPipeline.from_pretrained(str(run_dir / "exports/diffusers/pipeline"), local_files_only=True)
    for name, tensor in saved.items():
        component, rest = name.split(".", 1)
        assert torch.equal(getattr(plain, component).get_parameter(rest), tensor)


def test_loading_into_the_wrong_base_is_refused(recorder: Recorder, tmp_path: Path) -> None:
    conceptedit.apply(_recipe(), out=tmp_path / "run", quiet=True)
    with pytest.raises(conceptedit.RunDirError, match="not the base"):
        conceptedit.load(build_tiny_sd(seed=1), tmp_path / "run")
    with pytest.raises(conceptedit.RunDirError, match="not a finished"):
        conceptedit.load(build_tiny_sd(), tmp_path)


def test_same_recipe_and_seed_give_identical_edit_files(recorder: Recorder, tmp_path: Path) -> None:
    conceptedit.apply(_recipe(), out=tmp_path / "a", quiet=True)
    conceptedit.apply(_recipe(), out=tmp_path / "b", quiet=True)
    conceptedit.apply(_recipe(seed=1), out=tmp_path / "c", quiet=True)
    a, b, c = ((tmp_path / x / "edit.safetensors").read_bytes() for x in "abc")
    assert a == b
    assert a != c  # the seed reaches the training draws


def test_nan_loss_stops_the_run_naming_the_step(recorder: Recorder, tmp_path: Path) -> None:
    recipe = _recipe()
    recipe["edits"][1]["params"] = {"nan_at": 3}
    with pytest.raises(TrainingError, match="at step 3"):
        conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_training_group_sums_weighted_losses(recorder: Recorder, tmp_path: Path) -> None:
    group = {
        "group": "together",
        "training": {"steps": 3, "lr": 1e-3},
        "edits": [
            {"method": "test_q_steer", "name": "one", "weight": 1.0},
            {"method": "test_q_steer", "name": "two", "weight": 0.5, "params": {"concept": "a kitten"}},
        ],
    }
    result = conceptedit.apply(tiny_recipe(group), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "together.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    for row in log:
        assert row["total"] == pytest.approx(row["one/match"] + 0.5 * row["two/match"], rel=1e-5)
    assert result.outcomes[0].method == "group"
    # members' before_edit hooks ran, one train_step per optimiser step
    assert [c[0] for c in recorder.calls].count("train_step") == 3


class _Interrupt:
    """Simulates a kill after a given optimiser step."""

    def __init__(self, step: int) -> None:
        self.step = step

    @conceptedit.hookimpl
    def conceptedit_on_train_step(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    recipe = _recipe()
    recipe["edits"][1]["training"] = {"steps": 6, "checkpoint_every": 2}
    with isolated_host(FakeMethodsPlugin()):
        conceptedit.apply(recipe, out=tmp_path / "whole", quiet=True)
    with isolated_host(FakeMethodsPlugin(), _Interrupt(5)), pytest.raises(KeyboardInterrupt):
        conceptedit.apply(recipe, out=tmp_path / "cut", quiet=True)
    assert not (tmp_path / "cut").exists()
    partial = tmp_path / "cut.partial"
    assert sorted(p.name for p in (partial / "checkpoints" / "steer").iterdir()) == ["step-00000002", "step-00000004"]
    with isolated_host(FakeMethodsPlugin()):
        result = conceptedit.apply(recipe, out=tmp_path / "cut", resume=True, quiet=True)
    assert result.outcomes[1].details["resumed_from_step"] == 4
    assert (tmp_path / "cut" / "edit.safetensors").read_bytes() == (
        tmp_path / "whole" / "edit.safetensors"
    ).read_bytes()
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "logs" / "steer.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_dry_run_writes_nothing(recorder: Recorder, tmp_path: Path) -> None:
    result = conceptedit.apply(_recipe(), out=tmp_path / "run", dry_run=True, quiet=True)
    assert result.run_dir is None and result.changed == []
    assert list(tmp_path.iterdir()) == []


def test_editing_a_given_pipeline(recorder: Recorder, tmp_path: Path) -> None:
    pipe = build_tiny_sd()
    result = conceptedit.apply(_recipe(), pipeline=pipe, out=tmp_path / "run", quiet=True)
    assert result.pipeline is pipe
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["base_model"]["kind"] == "in_memory"
