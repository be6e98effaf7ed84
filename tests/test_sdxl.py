"""SDXL on builtin:tiny-sdxl: the adapter (every cross-attention layer, token positions of both
tokenizers, prompt encodings and UNet calls equal to diffusers' own, the pooled embedding found for
any copy of an encoded row), sampling equal to StableDiffusionXLPipeline, builtin:sdxl-random's sizes,
and every method end to end (supported ones change only what they declare and reload bit for bit;
unsupported ones are refused at validate with their reason)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from method_recipes import METHODS, run_and_reload, sample_images
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import conceptedit
from conceptedit.evaluation.sampling import Sampling, generate
from conceptedit.models.backbone import StableDiffusionAdapter, resolve_backbone
from conceptedit.models.builtin import (
    BUILTIN_MODELS,
    SDXL_PARAMETER_COUNTS,
    build_sdxl_random,
    build_tiny_sdxl,
)
from conceptedit.models.loading import load_model
from conceptedit.models.sdxl import PooledRows, StableDiffusionXLAdapter
from conceptedit.models.tokenizer import CLIP_TOKENIZER_DIR
from conceptedit.testing import edit_context, isolated_host, tiny_recipe
from conceptedit.toolkit import partial_ddim

# Token ids by hand, from the shipped vocabulary (checked against vocab.json below).
SOT, EOT, PAD2 = 49406, 49407, 0  # tokenizer 2 pads with "!", id 0; tokenizer 1 with [EoT]
A, CAT, HELLO, DOG = 320, 2368, 3306, 1929  # "a</w>", "cat</w>", "hello</w>", "dog</w>"
BANG, BANGBANG = 256, 748  # tokenizer 1's "!</w>" and "!!</w>" (tokenizer 2 splits every "!" off as id 0)

ANY_EDIT = {"method": "sld", "params": {"safety_concept": "violence"}}  # an edit context needs a recipe
SUPPORTED = ("adavd", "ca", "esd", "rece", "salun", "sld", "speed", "trce_eot", "trce_steer", "uce")
UNSUPPORTED = ("advunlearn", "race", "receler", "stereo")


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


@pytest.fixture(scope="module")
def tiny() -> StableDiffusionXLPipeline:
    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapter(pipe: Any, host: Any) -> StableDiffusionXLAdapter:
    adapter = resolve_backbone(pipe, host.registry.backbones)
    assert isinstance(adapter, StableDiffusionXLAdapter)
    return adapter


# ----------------------------------------------------------------------------- the models


def test_tiny_sdxl_is_sdxl_shaped(tiny: StableDiffusionXLPipeline) -> None:
    assert BUILTIN_MODELS["tiny-sdxl"].family == BUILTIN_MODELS["sdxl-random"].family == "sdxl"
    unet, te1, te2 = tiny.unet.config, tiny.text_encoder.config, tiny.text_encoder_2.config
    assert isinstance(tiny.text_encoder, CLIPTextModel) and isinstance(tiny.text_encoder_2, CLIPTextModelWithProjection)
    assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size == 96
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert max(unet.transformer_layers_per_block) > 1 and unet.use_linear_projection
    assert (tiny.tokenizer.pad_token_id, tiny.tokenizer_2.pad_token, tiny.tokenizer_2.pad_token_id) == (EOT, "!", PAD2)
    vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    hand = (vocab["!"], vocab["!</w>"], vocab["!!</w>"], vocab["a</w>"], vocab["cat</w>"], vocab["hello</w>"])
    assert hand == (PAD2, BANG, BANGBANG, A, CAT, HELLO) and vocab["dog</w>"] == DOG
    again = build_tiny_sdxl()
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        pairs = zip(getattr(tiny, name).parameters(), getattr(again, name).parameters(), strict=True)
        assert all(torch.equal(p, q) for p, q in pairs), name


def test_sdxl_random_has_sdxl_sizes_on_meta(builtin_host: Any) -> None:
    big = build_sdxl_random(device="meta")  # allocates nothing
    counts = {n: sum(p.numel() for p in getattr(big, n).parameters()) for n in SDXL_PARAMETER_COUNTS}
    assert counts == SDXL_PARAMETER_COUNTS
    adapter = _adapter(big, builtin_host)
    assert adapter.family == "sdxl" and adapter.text_dim == 2048
    layers = adapter.cross_attention_layers()
    assert len(layers) == 70  # attn2 per layer x transformer depth: down 2x2 + 2x10, mid 10, up 3x10 + 3x2
    assert {layer.projection("k").in_features for layer in layers} == {2048}


def test_adapter_finds_every_cross_attention_layer(tiny: StableDiffusionXLPipeline, builtin_host: Any) -> None:
    adapter = _adapter(tiny, builtin_host)
    assert adapter.family == "sdxl" and adapter.prediction_type == "epsilon" and adapter.text_dim == 96
    assert set(adapter.components()) == {"unet", "text_encoder", "text_encoder_2"}
    expected = {
        name for name, m in tiny.unet.named_modules() if type(m).__name__ == "Attention" and m.is_cross_attention
    }
    layers = adapter.cross_attention_layers()
    assert {layer.name for layer in layers} == expected and len(expected) == 11
    # several transformer layers per block: the second layer's attn2 is found too
    assert "mid_block.attentions.0.transformer_blocks.1.attn2" in expected
    assert "down_blocks.2.attentions.0.transformer_blocks.1.attn2" in expected
    assert all(layer.projection(w).in_features == 96 for layer in layers for w in ("k", "v"))
    # the SD adapter does not take an SDXL pipeline, nor the SDXL adapter an SD one
    assert not StableDiffusionAdapter.matches(tiny)
    assert not StableDiffusionXLAdapter.matches(conceptedit.load_model("builtin:tiny-sd2").pipeline)


def test_token_positions_from_both_tokenizers(tiny: StableDiffusionXLPipeline, builtin_host: Any) -> None:
    """Tokenizer 2 splits every '!' off as its pad token (id 0); tokenizer 1 reads '!' as BPE. The
    [EoT] row is the later of the two streams' first [EoT]: both halves have read the whole prompt."""
    adapter = _adapter(tiny, builtin_host)
    prompts = ["a cat", "a cat!", "hello!!", "", " ".join(["cat"] * 80)]
    enc = adapter.encode_prompts(prompts)
    stream_1 = {0: [A, CAT], 1: [A, CAT, BANG], 2: [HELLO, BANGBANG], 3: [], 4: [CAT] * 75}
    stream_2 = {0: [A, CAT], 1: [A, CAT, PAD2], 2: [HELLO, PAD2, PAD2], 3: [], 4: [CAT] * 75}
    assert torch.equal(adapter.tokenize(prompts), enc.input_ids)  # stream 1's ids
    for i in stream_1:
        row_1, row_2 = [SOT, *stream_1[i], EOT], [SOT, *stream_2[i], EOT]
        assert enc.input_ids[i].tolist() == row_1 + [EOT] * (77 - len(row_1)), prompts[i]
        theirs = tiny.tokenizer_2(prompts[i], padding="max_length", max_length=77, truncation=True).input_ids
        assert theirs == row_2 + [PAD2] * (77 - len(row_2)), prompts[i]
    assert enc.eot_index.tolist() == [3, 4, 4, 1, 76]  # "hello!!": stream 1's [EoT] is at 3, stream 2's at 4
    assert enc.positions("last_word").tolist() == [2, 3, 3, 0, 75]
    assert enc.positions("last_pad").tolist() == [76] * 5
    assert enc.keyword_positions([[CAT]] * 5).tolist() == [2, 2, -1, -1, 1]
    assert torch.equal(enc.row("eot"), enc.hidden[torch.arange(5), enc.eot_index])
    # The pooled embedding: text encoder 2's last layer, final norm and projection at stream 2's first [EoT].
    te2 = tiny.text_encoder_2
    with torch.no_grad():
        out = te2(torch.tensor([[SOT, HELLO, PAD2, PAD2, EOT] + [PAD2] * 72]), output_hidden_states=True)
        by_hand = te2.text_projection(te2.text_model.final_layer_norm(out.hidden_states[-1][0, 4]))
    assert enc.pooled is not None
    torch.testing.assert_close(enc.pooled[2], by_hand, atol=1e-6, rtol=1e-6)
    assert enc.hidden.shape == (5, 77, 96) and enc.pooled.shape == (5, 48)


def test_encode_prompts_equals_diffusers_encode_prompt(tiny: StableDiffusionXLPipeline, builtin_host: Any) -> None:
    adapter = _adapter(tiny, builtin_host)
    prompts = ["a photo of a cat", "hello!! world", "", "a dog running on the beach"]
    enc = adapter.encode_prompts(prompts, batch_size=3)  # two text-encoder batches
    with torch.no_grad():
        embeds, _, pooled, _ = tiny.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(enc.hidden, embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(enc.pooled, pooled, atol=1e-6, rtol=1e-6)
    short = adapter.encode_prompts(prompts[:2], length="longest")
    assert enc.pooled is not None and short.pooled is not None
    assert short.input_ids.shape[1] < 77 and torch.equal(short.eot_index, enc.eot_index[:2])
    torch.testing.assert_close(short.row("eot"), enc.row("eot")[:2], atol=1e-5, rtol=1e-5)  # causal
    torch.testing.assert_close(short.pooled, enc.pooled[:2], atol=1e-5, rtol=1e-5)


def test_predict_noise_equals_a_unet_call_with_added_conditioning(
    tiny: StableDiffusionXLPipeline, builtin_host: Any
) -> None:
    adapter = _adapter(tiny, builtin_host)
    enc = adapter.encode_prompts(["a cat", "a dog", ""])
    assert enc.pooled is not None
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 500, 999])
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 3)  # 8x8 latents: 64 px, no crop
    with torch.no_grad():
        ours = adapter.predict_noise(latents, t, enc.hidden)
        cond = {"text_embeds": enc.pooled, "time_ids": time_ids}
        theirs = tiny.unet(latents, t, encoder_hidden_states=enc.hidden, added_cond_kwargs=cond).sample
        assert torch.equal(ours, theirs)
        # rows sliced, reordered, repeated, expanded: each finds its own pooled embedding
        order = [2, 0, 0, 1]
        picked = torch.cat([enc.hidden[2:3], enc.hidden[:1].expand(2, -1, -1), enc.hidden[1:2]])
        again = adapter.predict_noise(latents[order], t[order], picked)
        torch.testing.assert_close(again, theirs[order], atol=1e-5, rtol=1e-5)
        # a bigger image: the time ids follow the latents (96 px)
        big = torch.randn(1, 4, 12, 12, generator=g)
        cond = {"text_embeds": enc.pooled[:1], "time_ids": torch.tensor([[96.0, 96, 0, 0, 96, 96]])}
        expected = tiny.unet(big, t[:1], encoder_hidden_states=enc.hidden[:1], added_cond_kwargs=cond).sample
        assert torch.equal(adapter.predict_noise(big, t[:1], enc.hidden[:1]), expected)
        # another adapter of the same pipeline (evaluation resolves its own) knows the rows too
        assert torch.equal(StableDiffusionXLAdapter(tiny).predict_noise(latents, t, enc.hidden), ours)
        # rows no encoding made have no pooled embedding: refused, unless registered
        made = enc.hidden[:1] + 0.01
        with pytest.raises(conceptedit.BackboneError, match=r"pooled embedding is unknown.*remember_pooled"):
            adapter.predict_noise(latents[:1], t[:1], made)
        adapter.remember_pooled(made, enc.pooled[:1])
        cond = {"text_embeds": enc.pooled[:1], "time_ids": time_ids[:1]}
        expected = tiny.unet(latents[:1], t[:1], encoder_hidden_states=made, added_cond_kwargs=cond).sample
        assert torch.equal(adapter.predict_noise(latents[:1], t[:1], made), expected)


def test_micro_batched_training_calls_find_the_pooled_rows(
    tiny: StableDiffusionXLPipeline, builtin_host: Any, tmp_path: Path
) -> None:
    loaded = conceptedit.load_recipe(tiny_recipe(ANY_EDIT, model="builtin:tiny-sdxl"))
    ctx = edit_context(loaded, tiny, tmp_path)
    assert isinstance(ctx.adapter, StableDiffusionXLAdapter)
    ctx.training_config = SimpleNamespace(micro_batch=1)  # type: ignore[assignment]
    enc = ctx.encode_prompts(["a cat", "a dog", "a red circle"])
    latents, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 50, 500])
    with torch.no_grad():
        whole = ctx.adapter.predict_noise(latents, t, enc.hidden)
        split = ctx.predict_noise(latents, t, enc.hidden, frozen=True)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_pooled_rows_forget_the_least_recently_used() -> None:
    rows = PooledRows(split=2, capacity=2)
    hidden = torch.randn(3, 5, 4)
    rows.add(hidden[:2], torch.eye(2), torch.float32)
    rows.find(hidden[:1], torch.float32)  # row 0 used: row 1 is now the oldest
    rows.add(hidden[2:], torch.ones(1, 2), torch.float32)
    assert len(rows) == 2
    assert torch.equal(rows.find(hidden[[2, 0]], torch.float32), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(conceptedit.BackboneError, match=r"rows \[0\] of 1"):
        rows.find(hidden[1:2], torch.float32)
    half = PooledRows(split=2)  # a float16 UNet: rows encoded in float32, handed over cast to float16
    half.add(hidden[:1], torch.ones(1, 2), torch.float16)
    assert torch.equal(half.find(hidden[:1].half(), torch.float16), torch.ones(1, 2))


def test_token_embedding_attacks_are_refused_with_a_reason(tiny: StableDiffusionXLPipeline, builtin_host: Any) -> None:
    adapter = _adapter(tiny, builtin_host)
    with pytest.raises(conceptedit.BackboneError, match=r"not supported on SDXL: its two text encoders"):
        adapter.token_embedding_table()
    with pytest.raises(conceptedit.BackboneError, match=r"not supported on SDXL"):
        adapter.encode_token_embeddings(adapter.tokenize(["a cat"]), torch.zeros(1, 77, 32))


# ----------------------------------------------------------------------------- sampling


def test_generate_equals_the_sdxl_pipeline(tiny: StableDiffusionXLPipeline, builtin_host: Any) -> None:
    sampling = Sampling(steps=3, guidance=5.0)
    ours = generate(tiny, "a red circle", 7, sampling, count=2, host=builtin_host)
    for i, image in enumerate(ours):
        theirs = tiny(
            "a red circle",
            negative_prompt="",
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(7 + i),
        ).images[0]
        assert np.array_equal(np.asarray(image), np.asarray(theirs)), i
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[1]))


def test_partial_ddim_equals_the_pipeline_with_ddim(
    tiny: StableDiffusionXLPipeline, builtin_host: Any, tmp_path: Path
) -> None:
    loaded = conceptedit.load_recipe(tiny_recipe(ANY_EDIT, model="builtin:tiny-sdxl"))
    ctx = edit_context(loaded, tiny, tmp_path)
    adapter = _adapter(tiny, builtin_host)
    cond, empty = adapter.encode_prompts(["a cat"]).hidden, adapter.encode_prompts([""]).hidden
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = partial_ddim(ctx, noise, cond, empty, 3.0, 4, 4)
    ddim = DDIMScheduler.from_config(tiny.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionXLPipeline(**{**tiny.components, "scheduler": ddim})
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        **adapter.pipeline_embeds(cond, empty),
        latents=noise,
        num_inference_steps=4,
        guidance_scale=3.0,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_an_sdxl_folder_loads_as_sdxl(tiny: StableDiffusionXLPipeline, builtin_host: Any, tmp_path: Path) -> None:
    tiny.save_pretrained(str(tmp_path / "sdxl"))
    loaded = load_model(str(tmp_path / "sdxl"))
    assert isinstance(loaded.pipeline, StableDiffusionXLPipeline)
    assert _adapter(loaded.pipeline, builtin_host).family == "sdxl"


# ----------------------------------------------------------------------------- methods


def test_every_builtin_method_declares_sdxl_or_says_why_not(builtin_host: Any) -> None:
    methods = builtin_host.registry.methods
    assert set(methods) == set(SUPPORTED) | set(UNSUPPORTED)
    assert {n for n, cls in methods.items() if "sdxl" in cls.backbones} == set(SUPPORTED)
    for name in UNSUPPORTED:
        assert "sdxl" in methods[name].unsupported_backbones, name


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_methods_are_refused_at_validate(name: str, tmp_path: Path) -> None:
    edits, concepts = METHODS[name]
    reason = conceptedit.load_recipe(tiny_recipe(*edits, concepts=concepts)).recipe.flat_edits()[0][1]
    reason = reason.method_cls.unsupported_backbones["sdxl"]
    with pytest.raises(conceptedit.RecipeError) as caught:
        conceptedit.load_recipe(tiny_recipe(*edits, model="builtin:tiny-sdxl", concepts=concepts))
    (issue,) = caught.value.issues
    assert issue.path == "edits.0.method" and "but the model is sdxl" in issue.message
    assert reason in issue.message
    # A pipeline handed in is checked once loaded, before anything runs.
    with pytest.raises(conceptedit.BackboneError, match=r"edits\.0: .*model is sdxl"):
        recipe = tiny_recipe(*edits, concepts=concepts)
        conceptedit.apply(recipe, pipeline=build_tiny_sdxl(), out=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", SUPPORTED)
def test_method_runs_on_tiny_sdxl_reloads_and_exports(name: str, tmp_path: Path) -> None:
    checked = run_and_reload(name, "builtin:tiny-sdxl", build_tiny_sdxl, StableDiffusionXLAdapter, tmp_path)
    run, edited = checked.run, checked.edited
    if checked.guards:  # the guard acts: the guarded pipeline samples differently
        reloaded = conceptedit.load(build_tiny_sdxl(), run)
        assert not np.array_equal(sample_images(reloaded), sample_images(checked.base))
        return  # a guard only: nothing for the diffusers format to hold but its hooks
    exported = conceptedit.export(run, "diffusers", out=tmp_path / "export", check_prompts=["a cat"])
    assert exported.check["weights_max_relative_error"] == 0.0 and exported.check["pixel_max_abs_diff"] == 0.0
    plain = StableDiffusionXLPipeline.from_pretrained(str(exported.folder / "pipeline"), local_files_only=True)
    assert plain.tokenizer_2.pad_token_id == PAD2
    for full, param in StableDiffusionXLAdapter(plain).named_parameters():
        assert torch.equal(param, edited.get_parameter(full)), full


def test_sld_safety_branch_reads_the_safety_concepts_pooled_embedding(builtin_host: Any, tmp_path: Path) -> None:
    edits, _ = METHODS["sld"]
    run = tmp_path / "run"
    conceptedit.apply(tiny_recipe(*edits, model="builtin:tiny-sdxl"), out=run, quiet=True)
    pipe = conceptedit.load(build_tiny_sdxl(), run)
    seen: list[dict[str, torch.Tensor]] = []
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True
    )
    pipe("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent")
    safety = _adapter(pipe, builtin_host).encode_prompts([edits[0]["params"]["safety_concept"]]).pooled
    (added,) = seen
    assert added["text_embeds"].shape[0] == 3 and added["time_ids"].shape[0] == 3  # [uncond, text, safety]
    torch.testing.assert_close(added["text_embeds"][2:], safety, atol=1e-6, rtol=1e-6)
    assert torch.equal(added["time_ids"][2], added["time_ids"][1])


def test_readme_lists_the_sdxl_builtins() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "builtin:tiny-sdxl" in readme and "builtin:sdxl-random" in readme
