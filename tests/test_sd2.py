"""SD-2.x on builtin:tiny-sd2: the adapter (layers, family, token positions with '!' padding), the
v-prediction targets against their formulas, and every built-in method end to end (changes only what
it declares, reloads bit for bit, exports a pipeline plain diffusers loads)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from conceptedit_builtin.sld import SldSettings, _SafetyGuidance
from conftest import REPO
from diffusers import DDIMScheduler, StableDiffusionPipeline
from method_recipes import METHODS, run_and_reload
from torch import Tensor

import conceptedit
from conceptedit import EditMethod, KVEdit, MethodParams, hookimpl
from conceptedit.models.backbone import SD2_TEXT_WIDTH, StableDiffusionAdapter, sd_family
from conceptedit.models.builtin import BUILTIN_MODELS, build_tiny_sd, build_tiny_sd2, sd2_scheduler_config
from conceptedit.models.tokenizer import CLIP_TOKENIZER_DIR
from conceptedit.testing import edit_context, isolated_host, tiny_recipe
from conceptedit.toolkit import (
    add_noise,
    alphas_cumprod,
    denoising_objective,
    output_from_noise,
    output_per_noise,
    partial_ddim,
    training_target,
)

# Token ids by hand, from the shipped vocabulary (checked against vocab.json below).
SOT, EOT, PAD = 49406, 49407, 0  # SD-2.x pads with "!", id 0 of the CLIP vocabulary
A, CAT, HELLO = 320, 2368, 3306  # "a</w>", "cat</w>", "hello</w>"


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


@pytest.fixture(scope="module")
def tiny2() -> StableDiffusionPipeline:
    pipe = build_tiny_sd2()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the model and its adapter


def test_tiny_sd2_is_sd2_shaped(tiny2: StableDiffusionPipeline) -> None:
    assert BUILTIN_MODELS["tiny-sd2"].family == "sd2" and BUILTIN_MODELS["tiny-sd"].family == "sd1"
    te, unet = tiny2.text_encoder.config, tiny2.unet.config
    assert te.hidden_act == "gelu" and unet.cross_attention_dim == te.hidden_size == 64
    assert unet.use_linear_projection and tuple(unet.attention_head_dim) == (2, 4)
    assert tiny2.scheduler.config.prediction_type == "v_prediction" and isinstance(tiny2.scheduler, DDIMScheduler)
    tok = tiny2.tokenizer
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == ("!", PAD, EOT, SOT)
    vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert (vocab["!"], vocab["a</w>"], vocab["cat</w>"], vocab["hello</w>"]) == (PAD, A, CAT, HELLO)
    again = build_tiny_sd2()
    assert all(torch.equal(p, q) for p, q in zip(tiny2.unet.parameters(), again.unet.parameters(), strict=True))


def test_adapter_finds_every_cross_attention_layer_and_the_family(tiny2: StableDiffusionPipeline) -> None:
    adapter = StableDiffusionAdapter(tiny2)
    assert adapter.family == "sd2" and adapter.prediction_type == "v_prediction" and adapter.text_dim == 64
    expected = {
        name for name, m in tiny2.unet.named_modules() if type(m).__name__ == "Attention" and m.is_cross_attention
    }
    layers = adapter.cross_attention_layers()
    assert {layer.name for layer in layers} == expected and len(expected) == 4
    for layer in layers:
        assert layer.projection("k").in_features == layer.projection("v").in_features == 64
    sd1 = StableDiffusionAdapter(build_tiny_sd())
    assert sd1.family == "sd1" and sd1.prediction_type == "epsilon"


def test_family_rule() -> None:
    def pipe(act: str, width: int) -> Any:
        return SimpleNamespace(
            text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_act=act)),
            unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=width)),
        )

    assert sd_family(pipe("quick_gelu", 768)) == "sd1"  # SD-1.x: OpenAI CLIP ViT-L/14
    assert sd_family(pipe("gelu", SD2_TEXT_WIDTH)) == "sd2"  # SD-2.x: OpenCLIP ViT-H/14
    assert sd_family(pipe("gelu", 64)) == "sd2"  # tiny-sd2: OpenCLIP's activation at toy width
    assert sd_family(pipe("quick_gelu", SD2_TEXT_WIDTH)) == "sd2"


def test_token_positions_come_from_the_end_of_text_id(tiny2: StableDiffusionPipeline) -> None:
    """'!' is the pad id and also a token of the prompt: the first [EoT] is where the EoT id is."""
    adapter = StableDiffusionAdapter(tiny2)
    prompts = ["a cat!", "", "hello!!", "a cat", " ".join(["cat"] * 80)]
    enc = adapter.encode_prompts(prompts)
    words = {0: [A, CAT, PAD], 1: [], 2: [HELLO, PAD, PAD], 3: [A, CAT], 4: [CAT] * 75}
    for i, w in words.items():
        row = [SOT, *w, EOT]
        assert enc.input_ids[i].tolist() == row + [PAD] * (77 - len(row)), prompts[i]
    assert enc.eot_index.tolist() == [4, 1, 4, 3, 76]  # never the first 0 (2 for "hello!!")
    assert enc.positions("last_word").tolist() == [3, 0, 3, 2, 75]  # "!" is a word of "a cat!"
    assert enc.positions("sot").tolist() == [0] * 5
    assert enc.positions("last_pad").tolist() == [76] * 5  # the last position of the 77-token context
    assert enc.keyword_positions([[PAD]] * 5).tolist() == [3, -1, 2, -1, -1]  # only words, never padding
    assert enc.keyword_positions([[CAT]] * 5).tolist() == [2, -1, -1, 2, 1]
    short = adapter.encode_prompts(["a cat!", ""], length="longest")
    assert short.input_ids.tolist() == [[SOT, A, CAT, PAD, EOT], [SOT, EOT, PAD, PAD, PAD]]
    assert short.eot_index.tolist() == [4, 1] and short.positions("last_pad").tolist() == [4, 4]
    # causal: rows up to [EoT] ignore the padding (equal up to the kernels' summation order)
    torch.testing.assert_close(short.row("eot"), enc.row("eot")[:2], atol=1e-5, rtol=1e-5)
    assert torch.equal(enc.row("last_pad"), enc.hidden[:, 76])


def test_attention_mask_marks_the_real_tokens_by_the_end_of_text_id(tiny2: StableDiffusionPipeline) -> None:
    seen: list[torch.Tensor] = []
    encoder = tiny2.text_encoder
    handle = encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    encoder.config.use_attention_mask = True
    try:
        StableDiffusionAdapter(tiny2).encode_prompts(["a cat!"], length="longest")
    finally:
        encoder.config.use_attention_mask = False
        handle.remove()
    assert seen[0].tolist() == [[1, 1, 1, 1, 1]]  # the "!" (id 0) is attended to, as the tokenizer's mask has it


# ----------------------------------------------------------------------------- v-prediction


def test_training_target_formulas() -> None:
    alphas = alphas_cumprod(sd2_scheduler_config())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 480, 999])
    a = alphas[t].double().sqrt().view(-1, 1, 1, 1)
    s = (1 - alphas[t].double()).sqrt().view(-1, 1, 1, 1)
    v = training_target(alphas, x0, eps, t, prediction="v_prediction")
    torch.testing.assert_close(v.double(), a * eps.double() - s * x0.double(), rtol=1e-6, atol=1e-6)
    assert training_target(alphas, x0, eps, t, prediction="epsilon") is eps  # the ε case: the noise itself
    assert torch.equal(training_target(alphas, x0, eps, t, prediction="sample"), x0)
    x_t = add_noise(alphas, x0, eps, t)
    torch.testing.assert_close(output_from_noise(alphas, x_t, eps, t, prediction="v_prediction"), v, atol=1e-5, rtol=0)
    torch.testing.assert_close(output_from_noise(alphas, x_t, eps, t, prediction="sample"), x0, atol=1e-4, rtol=0)
    # k_t: at a fixed x_t, v moves by 1/α_t per unit of ε (v = ε/α_t − (σ_t/α_t) x_t)
    k = output_per_noise(alphas, t, prediction="v_prediction").double().view(-1, 1, 1, 1)
    other = eps + 0.5
    moved = output_from_noise(alphas, x_t, other, t, prediction="v_prediction") - v
    torch.testing.assert_close(moved.double(), 0.5 * k.expand_as(moved), atol=1e-4, rtol=1e-5)
    assert torch.equal(output_per_noise(alphas, t, prediction="epsilon"), torch.ones(3))


def test_denoising_objective_compares_to_v(tiny2: StableDiffusionPipeline) -> None:
    adapter = StableDiffusionAdapter(tiny2)
    alphas = alphas_cumprod(tiny2.scheduler.config)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    hidden = adapter.encode_prompts(["a cat"]).hidden
    objective = denoising_objective(adapter, clean, alphas, torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = objective(hidden)
        g = torch.Generator().manual_seed(5)  # the objective's draws, by hand: t, then the noise
        t = torch.randint(0, alphas.shape[0], (1,), generator=g)
        eps = torch.randn(clean.shape, generator=g)
        a = alphas[t].double()
        x_t = (a.sqrt() * clean.double() + (1 - a).sqrt() * eps.double()).float()
        out = tiny2.unet(x_t, t, encoder_hidden_states=hidden).sample.double()
        v = a.sqrt() * eps.double() - (1 - a).sqrt() * clean.double()
    assert abs(float(got) - float(((out - v) ** 2).mean())) < 1e-5 * max(1.0, float(got))
    assert abs(float(got) - float(((out - eps.double()) ** 2).mean())) > 1e-3  # not the ε loss


def test_ddim_partial_sampling_reads_v_as_the_pipeline_does(tiny2: StableDiffusionPipeline, tmp_path: Path) -> None:
    sld = {"method": "sld", "params": {"safety_concept": "violence"}}  # any edit: the context needs a recipe
    loaded = conceptedit.load_recipe(tiny_recipe(sld, model="builtin:tiny-sd2"))
    ctx = edit_context(loaded, tiny2, tmp_path)
    adapter = StableDiffusionAdapter(tiny2)
    cond, empty = adapter.encode_prompts(["a cat"]).hidden, adapter.encode_prompts([""]).hidden
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = partial_ddim(ctx, noise, cond, empty, 3.0, 4, 4)
    theirs = tiny2(
        prompt_embeds=cond,
        negative_prompt_embeds=empty,
        latents=noise,
        num_inference_steps=4,
        guidance_scale=3.0,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    eps_pipe = StableDiffusionPipeline(
        **{
            **tiny2.components,
            "scheduler": DDIMScheduler.from_config(tiny2.scheduler.config, prediction_type="epsilon"),
        }
    )
    as_eps = partial_ddim(edit_context(loaded, eps_pipe, tmp_path / "eps"), noise, cond, empty, 3.0, 4, 4)
    assert (as_eps - ours).abs().max() > 1e-3  # the prediction type matters, and the sampler honours it


def test_sld_on_v_is_sld_on_the_noise_the_outputs_imply() -> None:
    """SLD's thresholds and momentum are in ε units: on a v-model each step reads the outputs as ε."""
    alphas = alphas_cumprod(sd2_scheduler_config())
    settings = SldSettings(
        safety_concept="x",
        strength=1.0,
        warmup_steps=0,
        guidance_scale=1000,
        threshold=0.01,
        momentum_scale=0.3,
        momentum_beta=0.4,
    )
    g = torch.Generator().manual_seed(2)
    results: dict[str, list[Tensor]] = {}
    steps = [(torch.tensor(801), torch.randn(2, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g))]
    steps.append((torch.tensor(401), torch.randn(2, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)))
    for prediction in ("epsilon", "v_prediction"):
        stub = SimpleNamespace(
            progress_bar=lambda *a, **k: None, scheduler=SimpleNamespace(config=sd2_scheduler_config())
        )
        hooks = _SafetyGuidance(stub, settings, torch.zeros(1, 77, 64), prediction)  # type: ignore[arg-type]
        results[prediction] = []
        for t, x_t, eps in steps:  # one image, two steps: [uncond, text, safety] outputs at x_t
            x = x_t[:1].expand(3, -1, -1, -1)
            out = (
                eps
                if prediction == "epsilon"
                else output_from_noise(alphas, x, eps, t.expand(3), prediction=prediction)
            )
            hooks.half, hooks.per_noise = 1, hooks._per_noise(t)
            (merged,) = hooks.after(None, (), {}, (out,))
            if prediction == "v_prediction":  # back to ε: ε = α v + σ x_t
                a = alphas[t]
                merged = a.sqrt() * merged + (1 - a).sqrt() * x[:2]
            results[prediction].append(merged)
    for ours, reference in zip(results["v_prediction"], results["epsilon"], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert not torch.equal(results["epsilon"][1][1], steps[1][2][1])  # the guidance did act


# ----------------------------------------------------------------------------- backbones declared and refused


class _Sd1Only(EditMethod[MethodParams]):
    name = "test_sd1_only"
    summary = "test: a method that refuses SD-2.x"
    kind = "closed_form"
    backbones = frozenset({"sd1"})
    unsupported_backbones: ClassVar[dict[str, str]] = {"sd2": "its rows assume the [EoT] padding of SD-1.x"}

    def attention_edits(self, ctx: Any) -> Any:
        enc = ctx.encode_prompts(["a cat"])
        yield KVEdit(keys=enc.row("eot"), targets=enc.row("sot"), ridge=0.1)


class _Sd1OnlyPlugin:
    __name__ = "sd1_only"

    @hookimpl
    def conceptedit_register_methods(self, register: Any) -> None:
        register(_Sd1Only)


def test_validate_refuses_a_method_that_does_not_support_sd2(tmp_path: Path) -> None:
    with isolated_host(_Sd1OnlyPlugin(), entry_points=True):
        edit = {"method": "test_sd1_only", "params": {}}
        conceptedit.load_recipe(tiny_recipe(edit))  # sd1: fine
        with pytest.raises(conceptedit.RecipeError, match=r"SD-1\.x") as caught:
            conceptedit.load_recipe(tiny_recipe(edit, model="builtin:tiny-sd2"))
        (issue,) = caught.value.issues
        assert issue.path == "edits.0.method" and "supports sd1, but the model is sd2" in issue.message
        # A pipeline handed in is checked once loaded, before anything runs.
        with pytest.raises(conceptedit.BackboneError, match=r"edits\.0: .*model is sd2: its rows assume"):
            conceptedit.apply(tiny_recipe(edit), pipeline=build_tiny_sd2(), out=tmp_path / "run", quiet=True)
        assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- every built-in method on SD-2.x


def test_every_builtin_method_declares_sd2(builtin_host: Any) -> None:
    assert set(builtin_host.registry.methods) == set(METHODS)
    assert all("sd2" in cls.backbones for cls in builtin_host.registry.methods.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_on_tiny_sd2_reloads_and_exports(name: str, tmp_path: Path) -> None:
    checked = run_and_reload(name, "builtin:tiny-sd2", build_tiny_sd2, StableDiffusionAdapter, tmp_path)
    assert StableDiffusionAdapter(checked.base).family == "sd2"
    run, changed, edited = checked.run, checked.changed, checked.edited
    if not changed:
        return  # a guard only: nothing for the diffusers format to hold but its hooks
    exported = conceptedit.export(run, "diffusers", out=tmp_path / "export", check_prompts=["a cat"])
    assert exported.check["weights_max_relative_error"] == 0.0
    plain = StableDiffusionPipeline.from_pretrained(str(exported.folder / "pipeline"), local_files_only=True)
    assert plain.tokenizer.pad_token_id == PAD and plain.scheduler.config.prediction_type == "v_prediction"
    assert sd_family(plain) == "sd2"
    for full, param in StableDiffusionAdapter(plain).named_parameters():
        assert torch.equal(param, edited.get_parameter(full)), full


def test_readme_lists_tiny_sd2() -> None:
    assert "builtin:tiny-sd2" in (REPO / "README.md").read_text(encoding="utf-8")
