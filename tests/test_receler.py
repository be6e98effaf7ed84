"""Receler on builtin:tiny-sd: the eraser and one step's loss by hand, no base tensor changed, the eraser
guard reloaded bit for bit and composed with AdaVD, resume, and its recipe errors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conceptedit_builtin.adavd import AdaVDProcessor
from conceptedit_builtin.receler import ERASER_TENSORS, Receler, installed_erasers
from hand import RecordedSoftPrompt, record_soft_prompts
from safetensors import safe_open
from torch import Tensor

import conceptedit
from conceptedit import EditError, Guard, RecipeError, RunDirError
from conceptedit.io.edit_file import read_edit
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import edit_context, isolated_host, tiny_recipe

CONCEPT = "a red circle"
PROMPT = "a red circle on a blue background"


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _edit(training: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """A small Receler edit for tiny-sd (rank 8, 4-step DDIM, 2 soft tokens with 2 attack steps)."""
    return {
        "method": "receler",
        "params": {"concept": CONCEPT, "rank": 8, "sampling_steps": 4, "attack_tokens": 2, "attack_steps": 2, **params},
        "training": {"steps": 3, "lr": 1e-2, **(training or {})},
    }


def _latents(pipe: Any, prompt: str = PROMPT, seed: int = 1) -> Tensor:
    """The pipeline's final latents (no VAE rounding) for ``prompt``: 3 steps, CFG 7.5."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    return out.images


def _attn2(pipe: Any) -> dict[str, Any]:
    return {name: m for name, m in pipe.unet.named_modules() if name.endswith("attn2")}


def _method_and_context(pipe: Any, tmp_path: Path, **params: Any) -> tuple[Receler, Any]:
    """A Receler method and an edit context on ``pipe``, outside any run (2 training steps)."""
    loaded = conceptedit.load_recipe(tiny_recipe(_edit(**params)))
    method = loaded.recipe.edits[0].build()
    ctx = edit_context(loaded, pipe, tmp_path)
    ctx = dataclasses.replace(ctx, method=method, training_config=method.Training(steps=2), generator=torch.Generator())
    return method, ctx


def _hidden(pipe: Any, prompt: str) -> Tensor:
    """The text encoder's output for ``prompt``, computed with the tokenizer and the encoder alone."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].float()


def _hand_erasers(pipe: Any, tensors: dict[str, Tensor], outputs: dict[str, Tensor]) -> list[Any]:
    """Forward hooks adding o + U GELU(D o + d) + u to every attn2 output, written out here; records the addend."""

    def hook(name: str) -> Callable[..., Tensor]:
        def add(module: Any, args: Any, out: Tensor) -> Tensor:
            w = {k: tensors[f"{name}.{k}"] for k in ERASER_TENSORS}
            addend = F.linear(F.gelu(F.linear(out, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])
            outputs[name] = addend
            return out + addend

        return add

    return [m.register_forward_hook(hook(name)) for name, m in _attn2(pipe).items()]


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> type[RecordedSoftPrompt]:
    return record_soft_prompts(monkeypatch)


# ----------------------------------------------------------------------------- (a) the eraser and the loss by hand


def test_fresh_erasers_add_zero_so_the_pipeline_samples_bit_for_bit_as_before(tmp_path: Path) -> None:
    pipe = build_tiny_sd()
    before = _latents(pipe)
    method, ctx = _method_and_context(pipe, tmp_path)
    with method.added_modules(ctx) as modules:
        erasers = modules["erasers"]
        assert len(erasers) == len(_attn2(pipe)) == 4  # one per cross-attention layer
        assert all(not e.up.weight.any() and not e.up.bias.any() and e.down.weight.any() for e in erasers)
        assert [len(m._forward_hooks) for m in _attn2(pipe).values()] == [1, 1, 1, 1]
        during = _latents(pipe)
        # with a non-zero up-projection an attn2 call returns o + U GELU(D o + d) + u, o its own output
        layer_name, layer = next(iter(_attn2(pipe).items()))
        eraser = erasers[0]
        with torch.no_grad():
            eraser.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
            h, c = torch.randn(1, 64, 32), torch.randn(1, 77, 32)
            got = layer(h, encoder_hidden_states=c)
            with method.erasers.off():
                o = layer(h, encoder_hidden_states=c)
            want = o + eraser.up(F.gelu(F.linear(o, eraser.down.weight, eraser.down.bias)))
        assert method.erasers.layers[0].name == layer_name
        assert torch.equal(got, want)
    assert _attn2_hooks(pipe) == 0  # taken off on exit
    assert torch.equal(during, before)


def _attention_probs_by_hand(pipe: Any, x: Tensor, t: Tensor, hidden: Tensor) -> dict[str, Tensor]:
    """attn2's softmax(QKᵀ/√d) ``[B, heads, N, L]`` as diffusers' classic AttnProcessor computes them."""
    from diffusers.models.attention_processor import AttnProcessor

    probs: dict[str, Tensor] = {}
    for name, module in _attn2(pipe).items():
        module.set_processor(AttnProcessor())
        scores = module.get_attention_scores

        def spy(
            q: Tensor, k: Tensor, mask: Any = None, _name: str = name, _scores: Any = scores, _heads: int = module.heads
        ) -> Tensor:
            p = _scores(q, k, mask)
            probs[_name] = p.reshape(-1, _heads, *p.shape[1:])
            return p

        module.get_attention_scores = spy
    with torch.no_grad():
        pipe.unet(x, t, encoder_hidden_states=hidden)
    return probs


def _mask_by_hand(probs: dict[str, Tensor], words: list[int], threshold: float) -> dict[str, Tensor]:
    """The reference's get_mask: heads and word tokens averaged, the 8x8 maps (tiny-sd's second-coarsest
    side; SD's 16) averaged, min-max normalised, thresholded, resized nearest to each layer."""
    side = {name: int(p.shape[2] ** 0.5) for name, p in probs.items()}
    maps = {name: p[..., words].mean(-1).mean(1).reshape(-1, side[name], side[name]) for name, p in probs.items()}
    chosen = torch.stack([m for name, m in maps.items() if side[name] == 8]).mean(0)
    norm = (chosen - chosen.min()) / (chosen.max() - chosen.min())
    mask = (norm >= threshold).double()
    return {name: F.interpolate(mask[None], (side[name], side[name])).reshape(-1) for name in probs}


def test_one_step_is_the_erase_term_on_the_adversarial_prompt_plus_beta_times_the_localised_penalty(
    tmp_path: Path, spied: type[RecordedSoftPrompt], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With random (non-zero) erasers, one step's terms equal, recomputed with diffusers and hand-written
    erasers: ‖ε(x, t, adv) − (ε*(∅) − η(ε*(c) − ε*(∅)))‖² and β·mean_l Σ_outside mean_ch E_l² / (|outside| + 1e-9),
    adv the adversary's prompt, ε* the UNet without erasers, the mask from ε*(x, t, c)'s attention to c's words."""
    pipe = build_tiny_sd().to(torch.float64)
    beta, tau, eta = 0.7, 0.5, 1.5
    method, ctx = _method_and_context(pipe, tmp_path, reg_weight=beta, mask_threshold=tau, eta=eta)
    samples: list[Any] = []
    real_sample = Receler.sample
    monkeypatch.setattr(Receler, "sample", lambda self, c, d: samples.append(real_sample(self, c, d)) or samples[-1])
    with method.added_modules(ctx) as modules:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for eraser in modules["erasers"]:
                eraser.up.weight.normal_(0, 0.2, generator=g)
                eraser.up.bias.normal_(0, 0.05, generator=g)
        method.prepare_training(ctx)
        terms = method.trajectory_loss(ctx, 1)
        tensors = {
            f"{x.name}.{k}": v.detach().clone()
            for x, e in zip(method.erasers.layers, modules["erasers"], strict=True)
            for k, v in e.state_dict().items()
        }
        second = method.trajectory_loss(ctx, 2)
    (first_made, second_made), (found, _) = spied.made, spied.found
    assert (first_made.position, first_made.tokens, first_made.steps, first_made.update) == ("suffix", 2, 2, "adam")
    assert first_made.radius is None and first_made.start is None
    assert torch.equal(second_made.start, found.embeddings[0, list(found.slots)])  # warm start (attack_init: latest)
    assert set(second) == {"erase", "localisation"}

    x, t = samples[0].x.double(), samples[0].t
    concept, empty = _hidden(pipe, CONCEPT).double(), _hidden(pipe, "").double()
    with torch.no_grad():
        e_c = pipe.unet(x, t, encoder_hidden_states=concept).sample
        e_0 = pipe.unet(x, t, encoder_hidden_states=empty).sample
        outputs: dict[str, Tensor] = {}
        handles = _hand_erasers(pipe, tensors, outputs)
        pred = pipe.unet(x, t, encoder_hidden_states=found.hidden.double()).sample
        for handle in handles:
            handle.remove()
    erase = (pred - (e_0 - eta * (e_c - e_0))).pow(2).mean()
    words = list(range(1, 1 + len(pipe.tokenizer(CONCEPT, add_special_tokens=False).input_ids)))
    masks = _mask_by_hand(_attention_probs_by_hand(pipe, x, t, concept), words, tau)
    assert 0 < int(masks[next(iter(masks))].sum()) < 64  # a real region: some pixels in, some out
    penalties = []
    for name, out in outputs.items():
        outside = 1 - masks[name]
        penalties.append((out[0].pow(2).mean(-1) * outside).sum() / (outside.sum() + 1e-9))
    localisation = beta * torch.stack(penalties).mean()
    assert localisation > 0
    torch.testing.assert_close(terms["erase"].double(), erase, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["localisation"].double(), localisation, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- (b), (c) one trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 3-step Receler run on tiny-sd (rank 8, 2 attack steps), shared by the tests below."""
    with isolated_host(entry_points=True):
        return conceptedit.apply(tiny_recipe(_edit()), out=tmp_path_factory.mktemp("receler") / "run", quiet=True)


def test_no_base_tensor_changes_and_the_trained_erasers_are_the_guard(trained: Any) -> None:
    run = trained.run_dir
    assert trained.changed == [] and trained.outcomes[0].changed == []
    tensors, _ = read_edit(run / "edit.safetensors")
    assert tensors == {}
    base = build_tiny_sd()
    for part in ("unet", "text_encoder"):
        edited, fresh = getattr(trained.pipeline, part).state_dict(), getattr(base, part).state_dict()
        assert edited.keys() == fresh.keys()  # no eraser registered inside the model
        assert all(torch.equal(edited[k], fresh[k]) for k in fresh), part
    (record,) = trained.manifest["guards"]
    assert record["file"] == "guards/000-receler.safetensors" and record["method"] == "receler"
    with safe_open(str(run / record["file"]), "pt") as fh:
        settings = json.loads(fh.metadata()["config"])["receler"]
        saved = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    assert settings["rank"] == 8 and settings["layers"] == list(_attn2(base))
    assert len(saved) == 4 * len(settings["layers"])
    assert all(saved[f"{name}.up.weight"].abs().sum() > 0 for name in settings["layers"])  # they trained
    log = [json.loads(x) for x in (run / "logs" / "receler.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and all({"erase", "localisation"} <= set(row) for row in log)
    assert trained.outcomes[0].details["steps"] == 3


def test_load_installs_the_same_erasers_and_samples_bit_for_bit_like_the_run(trained: Any) -> None:
    pipe = conceptedit.load(build_tiny_sd(), trained.run_dir)
    edited = _latents(trained.pipeline)
    assert torch.equal(_latents(pipe), edited)
    assert not torch.equal(edited, _latents(build_tiny_sd()))  # the erasers act
    with conceptedit.suspend_guards(pipe):
        assert torch.equal(_latents(pipe), _latents(build_tiny_sd()))  # and pass through when suspended
    (mine,), (theirs,) = installed_erasers(pipe), installed_erasers(trained.pipeline)
    assert all(
        torch.equal(a, b)
        for m, n in zip(mine.modules, theirs.modules, strict=True)
        for a, b in zip(m.state_dict().values(), n.state_dict().values(), strict=True)
    )
    with pytest.raises(RunDirError, match="already installed"):
        conceptedit.load(pipe, trained.run_dir)
    # a later processor swap (xformers, a user's own) keeps the erasers: they are forward hooks on attn2
    from diffusers.models.attention_processor import AttnProcessor

    pipe.unet.set_attn_processor(AttnProcessor())
    swapped = _latents(pipe)
    with conceptedit.suspend_guards(pipe):
        assert not torch.equal(swapped, _latents(pipe))


def test_erasers_compose_with_adavd_processors_and_reload_identically(tmp_path: Path) -> None:
    adavd = {"method": "adavd", "params": {"erase": ["a red circle"]}}
    result = conceptedit.apply(tiny_recipe(_edit(training={"steps": 2}), adavd), out=tmp_path / "run", quiet=True)
    assert [g["method"] for g in result.manifest["guards"]] == ["receler", "adavd"]
    pipe = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    assert all(isinstance(m.processor, AdaVDProcessor) for m in _attn2(pipe).values())
    both = _latents(pipe)
    assert torch.equal(both, _latents(result.pipeline))
    (erasers,) = installed_erasers(pipe)
    with erasers.off():
        assert not torch.equal(both, _latents(pipe))  # the erasers act on top of AdaVD's output


def test_an_interrupted_run_resumes_to_the_same_erasers(tmp_path: Path) -> None:
    class Interrupt:
        @conceptedit.hookimpl
        def conceptedit_on_train_step(self, step: int) -> None:
            if step == 3:
                raise KeyboardInterrupt

    recipe = tiny_recipe(_edit(training={"steps": 4, "checkpoint_every": 2}, attack_init="random"))
    whole = conceptedit.apply(recipe, out=tmp_path / "whole", quiet=True)
    with isolated_host(Interrupt(), entry_points=True), pytest.raises(KeyboardInterrupt):
        conceptedit.apply(recipe, out=tmp_path / "cut", quiet=True)
    assert not _attn2_hooks(build_tiny_sd())
    resumed = conceptedit.apply(recipe, out=tmp_path / "cut", resume=True, quiet=True)
    assert resumed.outcomes[0].details["resumed_from_step"] == 2
    assert (tmp_path / "cut" / "guards" / "000-receler.safetensors").read_bytes() == (
        tmp_path / "whole" / "guards" / "000-receler.safetensors"
    ).read_bytes()
    assert resumed.manifest["guards"] == whole.manifest["guards"]


def _attn2_hooks(pipe: Any) -> int:
    return sum(len(m._forward_hooks) for m in _attn2(pipe).values())


# ----------------------------------------------------------------------------- (d) errors


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rank": 0}, r"edits\.0\.params\.rank"),
        ({"mask_threshold": 1.5}, r"mask_threshold"),
        ({"concept": "  "}, r"must name the concept to erase"),
        ({"mask_phrase": "blue"}, r"mask_phrase 'blue' must be words of the concept 'a red circle'"),
        ({"reg_wieght": 0.1}, r"did you mean 'reg_weight'"),
        ({"attack_position": "middle"}, r"attack_position"),
        ({"attack_steps": -1}, r"attack_steps"),
    ],
)
def test_bad_params_are_recipe_errors(params: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        conceptedit.load_recipe(tiny_recipe(_edit(**params)))


def test_a_mask_resolution_the_unet_lacks_names_the_ones_it_has(tmp_path: Path) -> None:
    with pytest.raises(EditError, match=r"mask_resolution 16: the UNet's cross-attention maps have sides \[4, 8\]"):
        conceptedit.apply(tiny_recipe(_edit(mask_resolution=16)), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_a_guard_missing_an_eraser_tensor_is_refused(trained: Any) -> None:
    with safe_open(str(trained.run_dir / "guards" / "000-receler.safetensors"), "pt") as fh:
        config = json.loads(fh.metadata()["config"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    name = config["receler"]["layers"][1]
    del tensors[f"{name}.up.bias"]
    pipe = build_tiny_sd()
    with pytest.raises(RunDirError, match=f"eraser for {name} is incomplete"):
        Receler.install_guard(pipe, Guard(config, tensors), conceptedit.toolkit.StableDiffusionAdapter(pipe))
