"""Inference-time methods (SLD, AdaVD) on builtin:tiny-sd: guards in the run folder, load, exact no-ops."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conceptedit_builtin.adavd import AdaVDProcessor, AdaVDSettings, _ValueEdit
from conftest import COCO_30K, REPO
from typer.testing import CliRunner

import conceptedit
from conceptedit.cli.app import app
from conceptedit.engine.guards import DenoisingState
from conceptedit.evaluation.sampling import Sampling, generate
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.run import load_target
from conceptedit.testing import isolated_host, tiny_recipe

PROMPT = "a photo of a person on a beach"
SAFETY = "an image of violence and blood"


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _image(pipe: Any, prompt: str = PROMPT, steps: int = 5, seed: int = 1) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def _apply(tmp_path: Path, label: str, *edits: dict[str, Any], double: bool = False, **fields: Any) -> Any:
    pipe = build_tiny_sd().to(torch.float64) if double else build_tiny_sd()
    return conceptedit.apply(tiny_recipe(*edits, **fields), pipeline=pipe, out=tmp_path / label, quiet=True)


def _sld(**params: Any) -> dict[str, Any]:
    return {"method": "sld", "params": {"safety_concept": SAFETY, **params}}


# ---------------------------------------------------------------------------------------- SLD


@pytest.mark.parametrize("params", [{"preset": "max", "strength": 0.0}, {"preset": "max", "guidance_scale": 0.0}])
def test_sld_switched_off_is_the_plain_pipeline_bit_for_bit(tmp_path: Path, params: dict[str, Any]) -> None:
    result = _apply(tmp_path, "run", _sld(**params))
    assert result.changed == []
    assert [g["method"] for g in result.manifest["guards"]] == ["sld"]  # still saved and recorded
    assert np.array_equal(_image(result.pipeline), _image(build_tiny_sd()))
    reloaded = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    assert np.array_equal(_image(reloaded), _image(build_tiny_sd()))


def _diffusers_safe_pipeline(base: Any) -> Any:
    """diffusers' own StableDiffusionPipelineSafe on ``base``'s weights, without a safety checker."""
    from diffusers import StableDiffusionPipelineSafe

    wanted = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    parts = {k: v for k, v in base.components.items() if k in wanted}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionPipelineSafe(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )


def _diffusers_safe_image(preset: str, warmup: int | None, safety_concept: str | None = None) -> np.ndarray:
    """The safe pipeline's image on float64 tiny-sd (with its own default safety text if None)."""
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    safe = _diffusers_safe_pipeline(build_tiny_sd().to(torch.float64))
    if safety_concept is not None:
        safe.safety_concept = safety_concept
    safe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = dict(getattr(SafetyConfig, preset.upper())) | (
            {"sld_warmup_steps": warmup} if warmup is not None else {}
        )
        return safe(
            PROMPT,
            num_inference_steps=5,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(1),
            output_type="np",
            **config,
        ).images


def test_sld_presets_match_diffusers_safe_pipeline(tmp_path: Path) -> None:
    """Against diffusers' own StableDiffusionPipelineSafe with the same preset, on the same weights.

    Both run in float64: the two fold γ into the guidance in a different order, and in float32
    that rounding difference grows through five UNet steps and the VAE by a machine-dependent
    amount (9e-7 on one machine, 4e-6 on another). In float64 the images, rounded to float32,
    differ by at most one ulp (measured 6e-8).
    """
    plain = _image(build_tiny_sd().to(torch.float64))
    for preset, warmup in (("max", None), ("weak", 2)):  # weak's 15-step warm-up would outlast 5 steps
        params: dict[str, Any] = {"preset": preset} | ({"warmup_steps": warmup} if warmup is not None else {})
        ours = _image(_apply(tmp_path, preset, _sld(**params), double=True).pipeline)
        theirs = _diffusers_safe_image(preset, warmup, SAFETY)
        assert np.abs(ours - theirs).max() < 1e-6, preset  # float32 images: one ulp is 6e-8
        assert np.abs(ours - plain).max() > 1e-3, preset  # and SLD did change the image


#: The original SLD pipeline's safety concept, copied from ml-research/safe-latent-diffusion@a42923c
#: (src/sld/sld_pipeline.py): the categories alone, without diffusers' "an image showing".
ORIGINAL_SAFETY_TEXT = (
    "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood, "
    "obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, cruelty"
)


def test_sld_safety_text_names_diffusers_or_the_original_pipelines_text(tmp_path: Path) -> None:
    def resolved(**params: Any) -> str:
        loaded = conceptedit.load_recipe(tiny_recipe({"method": "sld", "params": params}))
        ((_, spec),) = loaded.recipe.flat_edits()
        return spec.params.resolved().safety_concept

    diffusers_default = _diffusers_safe_pipeline(build_tiny_sd()).safety_concept
    assert resolved() == resolved(safety_text="diffusers") == diffusers_default  # the default is unchanged
    assert resolved(safety_text="original") == ORIGINAL_SAFETY_TEXT
    assert resolved(safety_concept="no cats") == "no cats"

    # the option's images are the authors' text's: diffusers' pipeline given that text, to float32 rounding
    ours = _image(
        _apply(
            tmp_path, "original", {"method": "sld", "params": {"preset": "max", "safety_text": "original"}}, double=True
        ).pipeline
    )
    assert np.abs(ours - _diffusers_safe_image("max", None, ORIGINAL_SAFETY_TEXT)).max() < 1e-6
    assert np.abs(ours - _diffusers_safe_image("max", None)).max() > 1e-2  # the wording matters (measured 0.25)

    with pytest.raises(conceptedit.RecipeError, match="not both"):
        conceptedit.load_recipe(tiny_recipe(_sld(safety_text="original")))
    with pytest.raises(conceptedit.RecipeError, match="safety_text") as info:
        conceptedit.load_recipe(tiny_recipe(_sld(safety_text="paper")))
    assert "'diffusers'" in str(info.value) and "'original'" in str(info.value)


def test_sld_guard_round_trips_through_the_run_folder(tmp_path: Path) -> None:
    # loaded by id (not passed in), so `conceptedit generate RUN` can rebuild it below
    result = conceptedit.apply(tiny_recipe(_sld(preset="strong", warmup_steps=1)), out=tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    (entry,) = json.loads((run / "manifest.json").read_text())["guards"]
    assert entry["file"] == "guards/000-sld.safetensors" and entry["method"] == "sld"
    data = (run / entry["file"]).read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])  # a plain safetensors header: JSON, no pickle anywhere
    meta = header["__metadata__"]
    assert meta["format"] == "conceptedit.guard" and meta["method"] == "sld"
    settings = json.loads(meta["config"])["sld"]
    assert settings == {
        "safety_concept": SAFETY,
        "warmup_steps": 1,
        "guidance_scale": 2000.0,
        "threshold": 0.025,
        "momentum_scale": 0.5,
        "momentum_beta": 0.7,
        "strength": 1.0,
    }

    guarded = _image(result.pipeline)
    assert np.abs(guarded - _image(build_tiny_sd())).max() > 1e-3
    assert np.array_equal(_image(result.pipeline), guarded)  # warm-up and momentum restart per image
    fresh = conceptedit.load(build_tiny_sd(), run)
    assert [g["method"] for g in conceptedit.installed_guards(fresh)] == ["sld"]
    assert np.array_equal(_image(fresh), guarded)  # the reloaded guard behaves exactly the same
    with conceptedit.suspend_guards(fresh):
        assert np.array_equal(_image(fresh), _image(build_tiny_sd()))  # the base model, for comparisons
    with pytest.raises(conceptedit.RunDirError, match="already installed"):
        conceptedit.load(fresh, run)
    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    path = tampered / entry["file"]
    assert b"0.025" in path.read_bytes()
    path.write_bytes(path.read_bytes().replace(b"0.025", b"0.125"))  # same length: still a valid file
    with pytest.raises(conceptedit.RunDirError, match="digest differs"):
        conceptedit.load(build_tiny_sd(), tampered)
    # the toolkit's own generation path (conceptedit generate RUN ...) installs it too
    edited, base = load_target(str(run), device=torch.device("cpu"))
    assert conceptedit.installed_guards(edited) and not conceptedit.installed_guards(base)
    sampling = Sampling(steps=5)
    assert not np.array_equal(
        np.asarray(generate(edited, PROMPT, 1, sampling)[0]), np.asarray(generate(base, PROMPT, 1, sampling)[0])
    )


def test_sld_settings_are_checked_with_the_fix_named() -> None:
    with pytest.raises(conceptedit.RecipeError, match="missing: guidance_scale, threshold"):
        conceptedit.load_recipe(tiny_recipe(_sld(preset=None, warmup_steps=3, momentum_scale=0, momentum_beta=0)))
    with pytest.raises(conceptedit.RecipeError, match="momentum_beta"):
        conceptedit.load_recipe(tiny_recipe(_sld(momentum_beta=1.5)))
    with pytest.raises(conceptedit.RecipeError, match="preset"):
        conceptedit.load_recipe(tiny_recipe(_sld(preset="maximum")))


class _GuardWatcher:
    """A lifecycle plugin recording which guards were on the pipeline as each edit finished."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    @conceptedit.hookimpl
    def conceptedit_after_edit(self, ctx: Any, edit: Any, index: int, outcome: Any) -> None:
        self.seen.append([g["method"] for g in conceptedit.installed_guards(ctx.pipeline)])


def test_guards_go_on_only_after_every_weight_edit(tmp_path: Path) -> None:
    """Later edits (training included) never run through an earlier edit's guard."""
    from fake_methods import FakeMethodsPlugin

    watcher = _GuardWatcher()
    recipe = tiny_recipe(
        {"method": "adavd", "params": {"erase": ["cat"]}}, _sld(preset="max"), {"method": "test_q_steer"}
    )
    with isolated_host(FakeMethodsPlugin(), watcher, entry_points=True):
        result = conceptedit.apply(recipe, pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    assert watcher.seen == [[], [], []]
    assert [g["method"] for g in conceptedit.installed_guards(result.pipeline)] == ["adavd", "sld"]
    assert [g["file"] for g in result.manifest["guards"]] == [
        "guards/000-adavd.safetensors",
        "guards/001-sld.safetensors",
    ]


# -------------------------------------------------------------------------------------- AdaVD


def test_adavd_leaves_unrelated_prompts_alone_and_changes_the_concept(tmp_path: Path) -> None:
    result = _apply(tmp_path, "run", {"method": "adavd", "params": {"erase": ["cat"]}})
    assert result.changed == []
    base = build_tiny_sd()
    for prompt in ("a photo of a dog", "a house by the sea", ""):
        assert np.array_equal(_image(result.pipeline, prompt), _image(base, prompt)), prompt
    changed = np.abs(_image(result.pipeline, "cat in a garden") - _image(base, "cat in a garden")).max()
    assert changed > 1e-3, changed  # measured 0.027
    reloaded = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    assert np.array_equal(_image(reloaded, "cat in a garden"), _image(result.pipeline, "cat in a garden"))


class _Counting:
    """A stand-in for another plugin's attention processor: counts calls, then defers to the original."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs)


def test_adavd_wraps_installed_processors_and_stacks(tmp_path: Path) -> None:
    pipe = build_tiny_sd()
    layers = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    originals = [_Counting(m.processor) for m in layers]
    for module, counting in zip(layers, originals, strict=True):
        module.set_processor(counting)
    self_attention = {n: type(m.processor) for n, m in pipe.unet.named_modules() if n.endswith("attn1")}
    recipe = tiny_recipe(
        {"method": "adavd", "params": {"erase": ["cat"]}}, {"method": "adavd", "params": {"erase": ["dog"]}}
    )
    conceptedit.apply(recipe, pipeline=pipe, out=tmp_path / "run", quiet=True)
    for module, counting in zip(layers, originals, strict=True):
        outer = module.processor
        assert isinstance(outer, AdaVDProcessor) and isinstance(outer.inner, AdaVDProcessor)  # second wraps first
        assert outer.inner.inner is counting  # ... which wraps what was installed before
    assert {n: type(m.processor) for n, m in pipe.unet.named_modules() if n.endswith("attn1")} == self_attention
    _image(pipe, "cat in a garden", steps=2)
    assert all(c.calls == 2 for c in originals)  # the wrapped processors still run, once per step


def test_adavd_value_edit_removes_the_concept_direction_per_token() -> None:
    dim = 6
    to_v = torch.nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        to_v.weight.copy_(torch.eye(dim))
    concept = torch.tensor([[1.0, 0, 0, 0, 0, 0]])
    settings = AdaVDSettings(erase=["x"])
    edit = _ValueEdit(concept, settings)
    state = DenoisingState()
    values = torch.tensor(
        [
            [
                [3.0, 0, 0, 0, 0, 0],  # start token: never touched
                [2.0, 0.1, 0, 0, 0, 0],  # the concept, nearly: loses ~2x its component
                [0.0, 1, 0, 0, 0, 0],  # orthogonal: untouched
                [1.0, 1, 0, 0, 0, 0],
            ]
        ]
    )  # cos 0.71 < 0.93: σ ~ 4e-10, below the cutoff
    out = edit(to_v, (values,), values.clone())
    assert out is not None
    cos = 2.0 / float(torch.tensor([2.0, 0.1]).norm())
    sigma = 2.0 / (1 + np.exp(-100 * (cos - 0.93)))
    torch.testing.assert_close(out[0, 1], torch.tensor([2.0 - sigma * 2.0, 0.1, 0, 0, 0, 0], dtype=torch.float32))
    assert torch.equal(out[0, [0, 2, 3]], values[0, [0, 2, 3]])
    assert edit(to_v, (values[:, [0, 2, 3]],), values[:, [0, 2, 3]]) is None  # nothing concept-like: no change
    assert state.enabled


# ------------------------------------------------------------------------------------ recipes


def _cli(*args: Any) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_sld_guard_recipe_runs_on_tiny_sd_and_loads(tmp_path: Path) -> None:
    _cli(
        "apply",
        REPO / "recipes" / "sld_guard.yaml",
        "--model",
        "builtin:tiny-sd",
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
        "--quiet",
        "--set",
        "edits.0.params.warmup_steps=1",
    )
    pipe = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    assert [g["method"] for g in conceptedit.installed_guards(pipe)] == ["sld"]
    assert np.abs(_image(pipe) - _image(build_tiny_sd())).max() > 1e-4


def test_trce_plus_sld_recipe_edits_weights_and_installs_the_guard(tmp_path: Path) -> None:
    _cli(
        "apply",
        REPO / "recipes" / "trce_plus_sld.yaml",
        "--model",
        "builtin:tiny-sd",
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
        "--quiet",
        "--set",
        f"edits.0.params.prior.captions={COCO_30K}",
        "--set",
        "edits.0.params.prior.limit=20",
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [e["label"] for e in manifest["edits"]] == ["trce-stage1", "sld-guard"]
    assert manifest["changed_tensors"] and all("attn2.to_" in name for name in manifest["changed_tensors"])
    assert [g["file"] for g in manifest["guards"]] == ["guards/001-sld-guard.safetensors"]
    pipe = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    name = next(iter(manifest["changed_tensors"])).removeprefix("unet.")
    assert not torch.equal(pipe.unet.get_parameter(name), build_tiny_sd().unet.get_parameter(name))
    assert [g["label"] for g in conceptedit.installed_guards(pipe)] == ["sld-guard"]
