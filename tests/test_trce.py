"""TRCE (trce_eot + trce_steer) on builtin:tiny-sd: the math, the token rows, caching, recipes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COCO_30K, REPO
from fake_methods import FakeMethodsPlugin
from safetensors.torch import load_file
from typer.testing import CliRunner

import conceptedit
from conceptedit.cli.app import app
from conceptedit.data.prompt_files import read_prompts
from conceptedit.engine import trajectories
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

PAIRS = [
    ["nudity", "a person wearing clothes"],
    ["a naked body", "a person wearing clothes"],
    ["an erotic photo", "a person wearing clothes"],
]
TEMPLATES = ["a photo of {}", "an illustration of {}", "{} in a painting"]


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(FakeMethodsPlugin(), entry_points=True) as host:
        yield host


def _stage1(**params: Any) -> dict[str, Any]:
    base = {"concepts": "nsfw", "prior": {"captions": str(COCO_30K), "limit": 40}, "eta": 0.2}
    base.update(params)
    return {"method": "trce_eot", "params": base}


def _stage2(**training: Any) -> dict[str, Any]:
    return {
        "method": "trce_steer",
        "params": {
            "concepts": "nsfw",
            "trajectories_per_concept": 2,
            "sampling_steps": 10,
            "unconditional_trajectories": 6,
            "regularization_batch": 2,
        },
        "training": {"steps": 12, "lr": 3e-4, **training},
    }


def _recipe(*edits: dict[str, Any]) -> dict[str, Any]:
    return tiny_recipe(*edits, concepts={"nsfw": {"pairs": PAIRS, "templates": TEMPLATES}})


def _eot_embeddings(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """First-[EoT] embeddings computed independently of the engine (float64)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0].double()
    eot = (ids == pipe.tokenizer.eos_token_id).int().argmax(1)
    return hidden[torch.arange(len(prompts)), eot]


def _prior(pipe: Any, captions: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        flat = pipe.text_encoder(ids)[0].double().reshape(-1, pipe.text_encoder.config.hidden_size)
    return flat.T @ flat / len(captions)


def _kv_weights(pipe: Any) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().double().clone()
        for n, p in pipe.unet.named_parameters()
        if "attn2.to_k" in n or "attn2.to_v" in n
    }


def test_stage1_solves_the_trce_objective(tmp_path: Path) -> None:
    # float64 model: what is left of the gradient is the engine's float32 rounding of the text
    # embeddings and of the row weights 1/N, the same on every machine (float32: ~1e-6, BLAS-dependent).
    base = build_tiny_sd(dtype=torch.float64)
    before = _kv_weights(base)
    result = conceptedit.apply(
        _recipe(_stage1()), pipeline=build_tiny_sd(dtype=torch.float64), out=tmp_path / "run", quiet=True
    )
    after = _kv_weights(result.pipeline)
    prompts_m = [t.replace("{}", m) for m, _ in PAIRS for t in TEMPLATES]
    prompts_s = [t.replace("{}", s) for _, s in PAIRS for t in TEMPLATES]
    e_m, e_s = _eot_embeddings(base, prompts_m), _eot_embeddings(base, prompts_s)
    prior = _prior(base, read_prompts(COCO_30K, limit=40))
    n, eta = len(prompts_m), 0.2
    assert len(after) == 2 * sum(n.endswith("attn2") for n, _ in base.unet.named_modules())
    for name, w in before.items():
        new = after[name]
        assert not torch.equal(new, w), name

        def grad(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            return (x @ e_m.T - w @ e_s.T) @ e_m / n + eta * (x - w) @ prior

        # normal equations hold at W' (gradient ~ 0 next to its size at W)
        assert grad(new).norm() / grad(w).norm() < 1e-6, name  # measured 3.9e-8
        # W' e_m moved toward W e_s for the training pairs ...
        moved = (new @ e_m.T - w @ e_s.T).norm() / (w @ e_m.T - w @ e_s.T).norm()
        assert moved < 0.6, (name, float(moved))  # measured 0.44-0.51
        # ... while the outputs of ordinary caption tokens barely changed
        kept = torch.sqrt(torch.trace((new - w) @ prior @ (new - w).T) / torch.trace(w @ prior @ w.T))
        assert kept < 0.12, (name, float(kept))  # measured 0.07-0.10


def test_first_eot_comes_from_token_ids_not_word_counts(builtin_host: Any) -> None:
    from conceptedit.engine.context import EditContext
    from conceptedit.models.backbone import resolve_backbone

    pipe = build_tiny_sd()
    assert pipe.tokenizer(["Nudity"]).input_ids[0] == [49406, 1156, 16436, 49407]  # <SoT> nu dity</w> <EoT>
    adapter = resolve_backbone(pipe, builtin_host.registry.backbones)
    method_cls = builtin_host.method("trce_eot")
    prompts = ["Nudity", "A snapshot of Nudity", "Masturbation at sunset"]
    expected = {"token": [3, 6, len(pipe.tokenizer(prompts[2]).input_ids) - 1], "legacy_wordcount": [2, 5, 4]}
    for mode, positions in expected.items():
        method = method_cls(method_cls.Params(concepts="x", eot_index=mode))
        ctx = EditContext(
            run=_FakeRun(adapter),
            edit=None,
            index=0,
            method=method,  # type: ignore[arg-type]
            generator=torch.Generator(),
        )
        assert method.encode_prompts(ctx, prompts).eot_index.tolist() == positions, mode


class _FakeRun:
    """Just enough of a RunContext for calling a method's prompt-encoding hook directly."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.parked = None


def test_token_rows_and_legacy_index_change_the_edit(tmp_path: Path) -> None:
    runs = {}
    for label, params in {
        "eot": {},
        "legacy": {"eot_index": "legacy_wordcount"},
        "eot+sot": {"rows": {"eot": 1.0, "sot": 1.0}},
        "key": {"rows": {"eot": 0.0, "keyword": 1.0}},
        "last_pad": {"rows": {"eot": 0.0, "last_pad": 1.0}},
    }.items():
        result = conceptedit.apply(
            _recipe(_stage1(**params)), pipeline=build_tiny_sd(), out=tmp_path / label, quiet=True
        )
        runs[label] = _kv_weights(result.pipeline)
    name = next(iter(runs["eot"]))
    for label in ("legacy", "eot+sot", "key", "last_pad"):
        assert not torch.allclose(runs[label][name], runs["eot"][name]), label


def test_reference_eta_states_its_reading_of_the_cache(tmp_path: Path) -> None:
    """η from the reference's s: s² when its cache summed 30,000 captions, ≈20.6 s² for MACE's 616,767."""

    def edit(**params: Any) -> dict[str, Any]:
        spec = _stage1(**params)
        spec["params"] = {k: v for k, v in spec["params"].items() if v is not None}  # eta=None: leave it out
        return spec

    def stage1(**params: Any) -> Any:
        return conceptedit.load_recipe(_recipe(edit(**params))).recipe.edits[0].params

    assert stage1().eta == 0.2 and stage1().reference_eta is None  # eta as given by default
    coco = stage1(eta=None, reference_eta={"preserve_scale": 0.01})
    assert coco.eta == pytest.approx(1e-4, rel=1e-12)
    mace = stage1(eta=None, reference_eta={"preserve_scale": 0.02, "cache": "mace617k"})
    assert mace.eta == pytest.approx(4e-4 * 616_767 / 30_000, rel=1e-12)  # 8.22e-3
    assert stage1(eta=mace.eta, reference_eta={"preserve_scale": 0.02, "cache": "mace617k"}).eta == mace.eta
    with pytest.raises(conceptedit.RecipeError, match="contradicts reference_eta"):
        stage1(reference_eta={"preserve_scale": 0.01, "cache": "mace617k"})  # eta 0.2 given as well
    with pytest.raises(conceptedit.RecipeError, match="cache"):
        stage1(eta=None, reference_eta={"preserve_scale": 0.01, "cache": "coco3k"})
    # the resolved recipe records the derived η and loads again unchanged
    recipe = _recipe(edit(eta=None, reference_eta={"preserve_scale": 0.01, "cache": "mace617k"}))
    resolved = conceptedit.load_recipe(recipe).recipe.model_dump(mode="json")
    again = conceptedit.load_recipe(resolved).recipe
    assert again.edits[0].params.eta == pytest.approx(1e-4 * 616_767 / 30_000, rel=1e-12)
    assert again.model_dump(mode="json") == resolved


def test_stage1_refuses_a_singular_system(tmp_path: Path) -> None:
    with pytest.raises(conceptedit.SingularSystemError, match="singular"):
        conceptedit.apply(_recipe(_stage1(prior=None, ridge=0.0)), out=tmp_path / "run", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_prior_is_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    conceptedit.apply(_recipe(_stage1()), out=tmp_path / "a", quiet=True)
    files = list((tmp_path / "cache" / "priors").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    conceptedit.apply(_recipe(_stage1()), out=tmp_path / "b", quiet=True)
    assert files[0].stat().st_mtime_ns == stamp
    assert (tmp_path / "a" / "edit.safetensors").read_bytes() == (tmp_path / "b" / "edit.safetensors").read_bytes()
    # another caption subset is another prior
    conceptedit.apply(_recipe(_stage1(prior={"captions": str(COCO_30K), "limit": 41})), out=tmp_path / "c", quiet=True)
    assert len(list((tmp_path / "cache" / "priors").glob("*.safetensors"))) == 2


def test_stage2_trains_only_its_parameters_and_the_loss_falls(tmp_path: Path) -> None:
    base = build_tiny_sd()
    result = conceptedit.apply(
        _recipe(_stage1(), _stage2(steps=40)), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True
    )
    originals = dict(base.unet.named_parameters())
    for name, param in result.pipeline.unet.named_parameters():
        declared = "attn1." in name or "attn2.to_q." in name or "attn2.to_k." in name or "attn2.to_v." in name
        assert torch.equal(param, originals[name]) != declared, name
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "trce_steer.jsonl").read_text().splitlines()]
    erase = [row["erase"] for row in log]
    assert len(erase) == 40
    assert sum(erase[-10:]) < 0.75 * sum(erase[:10]), erase  # measured: 0.019 -> 0.012 mean hinge


def test_micro_batches_give_the_same_training(tmp_path: Path) -> None:
    """Back-propagating each sample's share of the loss as it is computed (stage 2's loss is a sum over
    its samples, ``ctx.separable_loss``) is the same maths as one batched call and one backward.

    The two paths sum the same numbers in a different order. In float32 that rounding (~1e-7)
    is amplified by Adam, which normalises each gradient element, into differences of the size
    of a step (~3e-4) wherever a gradient element is near zero, and how often that happens
    depends on the BLAS, the CPU and the thread count. So the check runs on a float64 model,
    where the same rounding is ~1e-16: measured 6e-16 largest difference (2e-13 of the largest
    weight change); 1e-10 leaves a million-fold margin and still catches any real difference,
    which shows up at the 1e-6 level or above.
    """
    runs = {}
    for label, training in {"whole": {}, "lean": {"micro_batch": 1, "gradient_checkpointing": True}}.items():
        runs[label] = conceptedit.apply(
            _recipe(_stage1(), _stage2(**training)),
            pipeline=build_tiny_sd(dtype=torch.float64),
            out=tmp_path / label,
            quiet=True,
        )
    a, b = (load_file(str(tmp_path / x / "edit.safetensors")) for x in ("whole", "lean"))
    assert sorted(a) == sorted(b) == runs["whole"].changed == runs["lean"].changed
    base = {f"unet.{n}": p.detach() for n, p in build_tiny_sd(dtype=torch.float64).unet.named_parameters()}
    trained = [name for name in a if "attn1." in name]
    assert trained and all(a[name].dtype == torch.float64 for name in a)
    assert min(float((a[name] - base[name]).abs().max()) for name in trained) > 1e-5  # training moved them
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-10)


def test_micro_batches_keep_one_graph_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With micro_batch 1 the trained model sees one sample per call, each with its graph, and runs no
    more forwards than the whole batch does: stage 2's loss is a sum over samples, so each sample is
    back-propagated as it is computed instead of being run again in backward."""
    calls: list[tuple[int, bool]] = []

    def counting(pipe: Any) -> Any:
        real = pipe.unet.forward

        def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append((sample.shape[0], torch.is_grad_enabled()))
            return real(sample, *args, **kwargs)

        pipe.unet.forward = forward
        return pipe

    steps = 2
    lean = _stage2(micro_batch=1, steps=steps)
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "lean-cache"))  # each run samples its own latents
    conceptedit.apply(_recipe(lean), pipeline=counting(build_tiny_sd()), out=tmp_path / "lean", quiet=True)
    lean_calls = list(calls)
    trained_per_step = 2 + lean["params"]["regularization_batch"]  # cond + uncond anchors, regulariser latents
    assert [size for size, grad in lean_calls if grad] == [1] * trained_per_step * steps, calls
    calls.clear()
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "whole-cache"))
    conceptedit.apply(
        _recipe(_stage2(steps=steps)), pipeline=counting(build_tiny_sd()), out=tmp_path / "whole", quiet=True
    )
    assert [size for size, grad in calls if grad] == [trained_per_step] * steps
    # Without a graph: as many samples in both runs (sampling and frozen passes, split into micro-batches
    # in the lean one), so no trained sample is run a second time.
    assert sum(size for size, grad in lean_calls if not grad) == sum(size for size, grad in calls if not grad)


def test_trajectories_are_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = trajectories._guided_noise
    monkeypatch.setattr(trajectories, "_guided_noise", lambda *a, **k: calls.append(1) or real(*a, **k))
    conceptedit.apply(_recipe(_stage1(), _stage2()), out=tmp_path / "a", quiet=True)
    first = len(calls)
    assert first > 0
    cached = list((tmp_path / "cache" / "trajectories").glob("*.safetensors"))
    assert len(cached) == 2  # malicious and unconditional
    conceptedit.apply(_recipe(_stage1(), _stage2()), out=tmp_path / "b", quiet=True)
    assert len(calls) == first  # the second run sampled nothing
    assert (tmp_path / "a" / "edit.safetensors").read_bytes() == (tmp_path / "b" / "edit.safetensors").read_bytes()


def test_kept_latents_are_paired_with_their_own_timestep(tmp_path: Path) -> None:
    """The cached latent for step k equals the input of a hand-run DDIM loop at t_k, stored in fp16."""
    from diffusers import DDIMScheduler

    from conceptedit.models.backbone import StableDiffusionAdapter
    from conceptedit.recipe.loader import load_recipe
    from conceptedit.testing import edit_context

    pipe = build_tiny_sd()
    adapter = StableDiffusionAdapter(pipe)
    ctx = edit_context(load_recipe(_recipe(_stage1())), pipe, tmp_path)
    request = trajectories.TrajectoryRequest(prompts=["a cat"], seeds=[7], needed={0: [0, 3]}, guidance=3.0, steps=10)
    kept = trajectories.sample_trajectories(ctx, request, "test")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(7))[None]
    cond = adapter.encode_prompts(["a cat"]).hidden
    empty = adapter.encode_prompts([""]).hidden
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps[:3]):
            if k == 0:
                torch.testing.assert_close(kept.latents[0].float(), x[0].half().float())
            both = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, empty])).sample
            eps = both[1:] + 3.0 * (both[:1] - both[1:])
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    assert kept.index.tolist() == [[0, 0], [0, 3]]
    assert kept.timesteps.tolist() == [int(scheduler.timesteps[0]), int(scheduler.timesteps[3])]
    # Both loops compute in float32 with different batching, so a value can round to the float16 next
    # to the hand loop's: one float16 step is at most 2^-10 (< 1e-3) of the value, hence 2e-3.
    torch.testing.assert_close(kept.latents[1].float(), x[0].half().float(), atol=2e-3, rtol=2e-3)
    assert kept.latents.dtype == torch.float16


def test_trce_steer_in_a_group_with_another_training_method(tmp_path: Path) -> None:
    group = {
        "group": "mix",
        "training": {"steps": 5, "lr": 1e-4},
        "edits": [_stage2() | {"training": None}, {"method": "test_q_steer", "weight": 0.5}],
    }
    group["edits"][0].pop("training")
    result = conceptedit.apply(_recipe(_stage1(), group), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "mix.jsonl").read_text().splitlines()]
    row = log[-1]
    expected = row["trce_steer/erase"] + row["trce_steer/preserve"] + 0.5 * row["test_q_steer/match"]
    # three non-negative terms, each logged after rounding to float32 (2^-24 relative): 1e-5 is loose
    assert row["total"] == pytest.approx(expected, rel=1e-5)
    assert [o.method for o in result.outcomes] == ["trce_eot", "group"]


@pytest.mark.parametrize("recipe", ["trce_nsfw.yaml", "trce_unsafe.yaml"])
def test_paper_recipes_run_on_tiny_sd(recipe: str, tmp_path: Path) -> None:
    args = [
        "apply",
        str(REPO / "recipes" / recipe),
        "--model",
        "builtin:tiny-sd",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        "--set",
        f"edits.0.params.prior.captions={COCO_30K}",
        "--set",
        "edits.0.params.prior.limit=20",
        "--set",
        "edits.1.params.sampling_steps=10",
        "--set",
        "edits.1.params.unconditional_trajectories=4",
        "--set",
        "edits.1.params.trajectories_per_concept=1",
        "--set",
        "edits.1.training.steps=3",
        "--set",
        "edits.1.training.checkpoint_every=2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [e["label"] for e in manifest["edits"]] == ["stage1", "stage2"]
    resolved = (tmp_path / "run" / "recipe.resolved.yaml").read_text()
    assert "builtin:tiny-sd" in resolved and "steps: 3" in resolved
