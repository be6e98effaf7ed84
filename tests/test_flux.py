"""FLUX on builtin:tiny-flux: the T5-style tokenizer (ids by hand), the tiny model (seeded, FLUX-shaped,
sampling and round-tripping with plain diffusers), the adapter (its one map of the rows and one of the
pooled vector, token positions by hand, encodings and transformer calls equal to FluxPipeline's,
pooled vectors found for any copy of a row), sampling equal to FluxPipeline's, the flow-matching
formulas by hand, and every method end to end (the supported ones change only what they declare,
reload bit for bit and export a folder plain diffusers loads; the others are refused at validate
with their reason)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from method_recipes import METHODS, run_and_reload
from transformers import CLIPTextModel, T5EncoderModel

import conceptedit
from conceptedit.evaluation.sampling import Sampling, generate
from conceptedit.models.backbone import StableDiffusionAdapter, resolve_backbone
from conceptedit.models.builtin import BUILTIN_MODELS
from conceptedit.models.builtin_flux import T5_VOCAB_ROWS, build_tiny_flux, flux_schnell_scheduler_config
from conceptedit.models.flux import FluxAdapter, pack_latents, unpack_latents
from conceptedit.models.loading import load_model
from conceptedit.models.prediction import add_noise, output_from_noise, output_per_noise, training_target
from conceptedit.models.sdxl import StableDiffusionXLAdapter
from conceptedit.models.tokenizer import T5_TOKENIZER_DIR, load_t5_tokenizer
from conceptedit.testing import edit_context, isolated_host, tiny_recipe
from conceptedit.toolkit import ddim_timesteps, partial_ddim

# T5 conventions, and piece ids by hand from the shipped tokenizer.json (checked against it below).
PAD, EOS, UNK = 0, 1, 2
SPACE, BANG = 3, 4  # "▁" and "!"
A, CAT, PHOTO, OF, NUDE, WOMAN, CAP_A = 133, 2712, 1810, 309, 28990, 4755, 69  # "▁a" ... "▁woman", "▁A"
CAP_NU, DITY = 1887, 28663  # "Nudity" = "▁Nu" + "dity"
CONTEXT = 512

ANY_EDIT = {"method": "uce", "params": {"concepts": "art"}}  # an edit context needs a recipe
ART = METHODS["uce"][1]
SUPPORTED = ("esd", "rece", "trce_eot", "uce")
UNSUPPORTED = ("adavd", "advunlearn", "ca", "race", "receler", "salun", "sld", "speed", "stereo", "trce_steer")


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


@pytest.fixture(scope="module")
def tiny() -> FluxPipeline:
    pipe = build_tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapter(pipe: Any, host: Any) -> FluxAdapter:
    adapter = resolve_backbone(pipe, host.registry.backbones)
    assert isinstance(adapter, FluxAdapter)
    return adapter


# ----------------------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize(
    ("prompt", "ids"),
    [
        ("a cat", [A, CAT, EOS]),
        ("a cat!", [A, CAT, BANG, EOS]),
        ("A photo of a nude woman", [CAP_A, PHOTO, OF, A, NUDE, WOMAN, EOS]),
        ("Nudity", [CAP_NU, DITY, EOS]),  # two pieces: "</s>" at index 2
        ("日本 cat", [SPACE, UNK, CAT, EOS]),  # no piece covers the characters: "▁" then <unk>, as T5
        ("", [EOS]),
    ],
)
def test_t5_tokenizer_ids_by_hand(prompt: str, ids: list[int]) -> None:
    tok = load_t5_tokenizer()
    assert tok(prompt).input_ids == ids  # no start token; "</s>" appended
    padded = tok(prompt, padding="max_length", max_length=CONTEXT, truncation=True).input_ids
    assert padded == ids + [PAD] * (CONTEXT - len(ids))


def test_t5_tokenizer_follows_t5_conventions() -> None:
    tok = load_t5_tokenizer()
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (PAD, EOS, UNK, None)
    assert len(tok) == 32100 and tok.model_max_length == CONTEXT
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]  # T5's reverse order
    vocab = [
        piece for piece, _ in json.loads((T5_TOKENIZER_DIR / "tokenizer.json").read_text("utf-8"))["model"]["vocab"]
    ]
    hand = {PAD: "<pad>", EOS: "</s>", UNK: "<unk>", SPACE: "▁", BANG: "!", A: "▁a", CAT: "▁cat", PHOTO: "▁photo"}
    hand |= {OF: "▁of", NUDE: "▁nude", WOMAN: "▁woman", CAP_A: "▁A", CAP_NU: "▁Nu", DITY: "dity"}
    assert all(vocab[i] == piece for i, piece in hand.items())
    long = tok(" ".join(["cat"] * 600), truncation=True, max_length=CONTEXT).input_ids
    assert len(long) == CONTEXT and long[-2:] == [CAT, EOS]  # truncated, "</s>" kept
    assert (T5_TOKENIZER_DIR / "tokenizer.json").stat().st_size < 1_500_000


# ----------------------------------------------------------------------------- the model


def test_tiny_flux_is_flux_shaped(tiny: FluxPipeline) -> None:
    assert BUILTIN_MODELS["tiny-flux"].family == "flux"
    config = tiny.transformer.config
    assert isinstance(tiny.text_encoder, CLIPTextModel) and isinstance(tiny.text_encoder_2, T5EncoderModel)
    assert not config.guidance_embeds and config.num_layers == 2 and config.num_single_layers == 2
    assert config.joint_attention_dim == tiny.text_encoder_2.config.d_model == 48
    assert config.pooled_projection_dim == tiny.text_encoder.config.hidden_size == 32
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert tiny.text_encoder_2.config.vocab_size == T5_VOCAB_ROWS >= len(tiny.tokenizer_2)
    assert tiny.text_encoder_2.config.feed_forward_proj == "gated-gelu"
    vae = tiny.vae.config
    assert vae.latent_channels * 4 == config.in_channels and tiny.vae_scale_factor == 8
    assert (vae.scaling_factor, vae.shift_factor, vae.sample_size) == (0.3611, 0.1159, 64)
    assert (
        isinstance(tiny.scheduler, FlowMatchEulerDiscreteScheduler) and not tiny.scheduler.config.use_dynamic_shifting
    )
    assert tiny.tokenizer.eos_token_id == tiny.text_encoder.config.eos_token_id == 49407
    again, other = build_tiny_flux(), build_tiny_flux(seed=1)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        pairs = list(zip(getattr(tiny, name).parameters(), getattr(again, name).parameters(), strict=True))
        assert all(torch.equal(p, q) for p, q in pairs), name
        pairs = list(zip(getattr(tiny, name).parameters(), getattr(other, name).parameters(), strict=True))
        assert not all(torch.equal(p, q) for p, q in pairs), name


def test_tiny_flux_samples_and_round_trips(tiny: FluxPipeline, tmp_path: Path) -> None:
    def images(pipe: FluxPipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        out = pipe("a cat", height=64, width=64, num_inference_steps=2, generator=generator, output_type="np")
        return out.images

    first = images(tiny)
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    tiny.save_pretrained(tmp_path)
    plain = FluxPipeline.from_pretrained(tmp_path, local_files_only=True)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(plain, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert plain.tokenizer_2("a cat").input_ids == [A, CAT, EOS]
    assert {k: plain.scheduler.config[k] for k in flux_schnell_scheduler_config()} == flux_schnell_scheduler_config()
    # Equal weights, yet not bit-equal images: a loaded weight's memory alignment can change the matmul kernel.
    np.testing.assert_allclose(images(plain), first, atol=1e-5)
    loaded = load_model(str(tmp_path))  # a FLUX folder loads as FLUX
    assert isinstance(loaded.pipeline, FluxPipeline)


# ----------------------------------------------------------------------------- the adapter


def test_adapter_edits_the_one_map_of_the_rows_and_of_the_pooled_vector(tiny: FluxPipeline, builtin_host: Any) -> None:
    adapter = _adapter(tiny, builtin_host)
    assert adapter.family == "flux" and adapter.prediction_type == "flow" and adapter.text_dim == 48
    assert set(adapter.components()) == {"transformer", "text_encoder", "text_encoder_2"}
    assert adapter.denoiser is tiny.transformer and adapter.dtype == torch.float32
    (layer,) = adapter.cross_attention_layers()
    assert layer.name == "context_embedder" and layer.projection("k") is tiny.transformer.context_embedder
    assert layer.projection("v") is layer.projection("k") and layer.projection("k").in_features == 48
    assert {layer.parameter_name(w) for w in ("k", "v")} == {"transformer.context_embedder.weight"}
    assert [name for name, _ in layer.linear_maps(("k", "v"))] == ["transformer.context_embedder.weight"]
    with pytest.raises(conceptedit.BackboneError, match=r"share their linear map with \['v'\]"):
        layer.linear_maps(("k",))
    (pooled,) = adapter.pooled_layers()
    assert pooled.projection("k") is tiny.transformer.time_text_embed.text_embedder.linear_1
    assert pooled.parameter_name("v") == "transformer.time_text_embed.text_embedder.linear_1.weight"
    assert pooled.projection("k").in_features == 32  # CLIP's pooled width
    # each adapter takes its own family only
    assert not StableDiffusionAdapter.matches(tiny) and not StableDiffusionXLAdapter.matches(tiny)
    assert not FluxAdapter.matches(conceptedit.load_model("builtin:tiny-sd").pipeline)


def test_token_positions_by_hand(tiny: FluxPipeline, builtin_host: Any) -> None:
    """T5 has no start token and ends with "</s>" (id 1); the [EoT] row is the first "</s>" by id."""
    adapter = _adapter(tiny, builtin_host)
    prompts = ["a cat", "a cat!", "A photo of a nude woman", "", " ".join(["cat"] * 600)]
    enc = adapter.encode_prompts(prompts)
    words = {0: [A, CAT], 1: [A, CAT, BANG], 2: [CAP_A, PHOTO, OF, A, NUDE, WOMAN], 3: [], 4: [CAT] * 511}
    assert enc.hidden.shape == (5, CONTEXT, 48) and enc.pooled is not None and enc.pooled.shape == (5, 32)
    for i, ids in words.items():
        row = [*ids, EOS]
        assert enc.input_ids[i].tolist() == row + [PAD] * (CONTEXT - len(row)), prompts[i]
    assert enc.eos_token_id == EOS and adapter.tokenizer.eos_token_id == EOS
    assert enc.eot_index.tolist() == [2, 3, 6, 0, 511]
    assert enc.positions("last_word").tolist() == [1, 2, 5, 0, 510]
    assert enc.positions("sot").tolist() == [0] * 5  # the first word piece: T5 has no start token
    assert enc.positions("last_pad").tolist() == [511] * 5
    assert adapter.token_ids("cat") == [CAT] and adapter.token_ids("nude woman") == [NUDE, WOMAN]
    assert enc.keyword_positions([[CAT]] * 4 + [[NUDE]]).tolist() == [1, 1, -1, -1, -1]
    assert torch.equal(enc.row("eot"), enc.hidden[torch.arange(5), enc.eot_index])
    # "longest": the full rows (T5 reads the padding, unmasked), cut after the longest prompt's "</s>"
    short = adapter.encode_prompts(prompts[:3], length="longest")
    assert short.input_ids.shape == (3, 7) and torch.equal(short.input_ids, enc.input_ids[:3, :7])
    assert torch.equal(short.hidden, enc.hidden[:3, :7]) and torch.equal(short.eot_index, enc.eot_index[:3])


def test_encode_prompts_equals_the_pipelines_encode_prompt(tiny: FluxPipeline, builtin_host: Any) -> None:
    adapter = _adapter(tiny, builtin_host)
    prompts = ["a photo of a cat", "hello, world", "", "a dog running on the beach"]
    enc = adapter.encode_prompts(prompts, batch_size=3)  # two text-encoder batches
    with torch.no_grad():
        rows, pooled, _ = tiny.encode_prompt(prompts, prompt_2=None, device="cpu")
    assert torch.equal(enc.hidden, rows) and enc.pooled is not None and torch.equal(enc.pooled, pooled)


def test_predict_noise_equals_the_pipelines_transformer_call(tiny: FluxPipeline, builtin_host: Any) -> None:
    adapter = _adapter(tiny, builtin_host)
    enc = adapter.encode_prompts(["a cat", "a dog", ""])
    assert enc.pooled is not None
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(3, 16, 8, 8, generator=g), torch.tensor([10.0, 500.0, 937.5])
    packed = FluxPipeline._pack_latents(latents, 3, 16, 8, 8)
    assert torch.equal(pack_latents(latents), packed) and torch.equal(unpack_latents(packed, 8, 8), latents)
    with torch.no_grad():
        ours = adapter.predict_noise(latents, t, enc.hidden)
        theirs = tiny.transformer(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=None,
            pooled_projections=enc.pooled,
            encoder_hidden_states=enc.hidden,
            txt_ids=torch.zeros(CONTEXT, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32),
            return_dict=False,
        )[0]
        assert ours.shape == latents.shape and torch.equal(pack_latents(ours), theirs)
        # rows sliced, reordered, repeated: each finds its own pooled vector, whatever batch it stands in
        order = [2, 0, 0, 1]
        picked = torch.cat([enc.hidden[2:3], enc.hidden[:1].expand(2, -1, -1), enc.hidden[1:2]])
        torch.testing.assert_close(adapter.predict_noise(latents[order], t[order], picked), ours[order])
        assert torch.equal(FluxAdapter(tiny).predict_noise(latents, t, enc.hidden), ours)  # shared per pipeline
        with pytest.raises(conceptedit.BackboneError, match=r"FLUX: text rows \[0\] of 1 .*remember_pooled"):
            adapter.predict_noise(latents[:1], t[:1], enc.hidden[:1] + 0.01)


def test_token_embedding_attacks_are_refused_with_a_reason(tiny: FluxPipeline, builtin_host: Any) -> None:
    adapter = _adapter(tiny, builtin_host)
    with pytest.raises(conceptedit.BackboneError, match=r"not supported on FLUX: it reads two text encoders"):
        adapter.token_embedding_table()
    with pytest.raises(conceptedit.BackboneError, match=r"not supported on FLUX"):
        adapter.encode_token_embeddings(adapter.tokenize(["a cat"]), torch.zeros(1, CONTEXT, 48))


def test_a_guidance_distilled_transformer_is_refused(tiny: FluxPipeline) -> None:
    from diffusers import FluxTransformer2DModel

    config = dict(tiny.transformer.config) | {"guidance_embeds": True}
    dev = FluxPipeline(**{**tiny.components, "transformer": FluxTransformer2DModel.from_config(config)})
    with pytest.raises(conceptedit.BackboneError, match=r"guidance_embeds: true, as FLUX.1-dev"):
        FluxAdapter(dev)


# ----------------------------------------------------------------------------- sampling


def test_generate_equals_the_flux_pipeline_with_true_cfg(tiny: FluxPipeline, builtin_host: Any) -> None:
    ours = generate(tiny, "a red circle", 7, Sampling(steps=3, guidance=4.0), count=2, host=builtin_host)
    for i, image in enumerate(ours):
        theirs = tiny(
            "a red circle",
            negative_prompt="",
            true_cfg_scale=4.0,
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(7 + i),
        ).images[0]
        assert np.array_equal(np.asarray(image), np.asarray(theirs)), i
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[1]))


def test_partial_sampling_equals_the_pipelines_flow_sampler(
    tiny: FluxPipeline, builtin_host: Any, tmp_path: Path
) -> None:
    loaded = conceptedit.load_recipe(tiny_recipe(ANY_EDIT, model="builtin:tiny-flux", concepts=ART))
    ctx = edit_context(loaded, tiny, tmp_path)
    adapter = _adapter(tiny, builtin_host)
    cond, empty = adapter.encode_prompts(["a cat"]).hidden, adapter.encode_prompts([""]).hidden
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = ddim_timesteps(ctx, 4)
    tiny.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.5)
    assert torch.equal(steps, tiny.scheduler.timesteps) and steps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    ours = partial_ddim(ctx, noise, cond, empty, 3.0, 4, 4)
    theirs = tiny(
        **adapter.pipeline_embeds(cond, empty),
        **adapter.pipeline_arguments(3.0, None, None),
        latents=pack_latents(noise),
        num_inference_steps=4,
        output_type="latent",
    ).images
    # the engine batches both branches in one call, the pipeline makes two: equal up to rounding
    torch.testing.assert_close(pack_latents(ours), theirs, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- flow matching


def test_flow_matching_formulas_by_hand() -> None:
    """x_t = (1 − σ) x₀ + σ ε with σ = t/1000; the target is the velocity ε − x₀."""
    table = torch.zeros(1000)  # a flow model's schedule: only its length (1000 training steps) is read
    clean, noise, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 4.0]]), torch.tensor([250])
    noisy = add_noise(table, clean, noise, t, prediction="flow")
    assert noisy.tolist() == [[1.25, 1.0]]  # 0.75·2 + 0.25·(−1), 0.75·0 + 0.25·4
    assert training_target(table, clean, noise, t, prediction="flow").tolist() == [[-3.0, 4.0]]
    # the same velocity from x_t and ε alone: (ε − x_t)/(1 − σ)
    assert output_from_noise(table, noisy, noise, t, prediction="flow").tolist() == [[-3.0, 4.0]]
    torch.testing.assert_close(
        output_per_noise(table, torch.tensor([250, 500]), prediction="flow"), torch.tensor([4 / 3, 2])
    )
    # the forward process is the flow scheduler's own (at its timestep 1000 σ)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[0.25], mu=0.5)
    assert torch.equal(scheduler.scale_noise(clean, scheduler.timesteps, noise), noisy)
    # fractional timesteps (the sampler's 1000 σ) need no table lookup
    half = add_noise(table, clean, noise, torch.tensor([937.5]), prediction="flow")
    torch.testing.assert_close(half, 0.0625 * clean + 0.9375 * noise)


def test_negative_guidance_in_velocity_space_is_the_velocity_of_the_noise_space_target() -> None:
    """ESD's ε(∅) − η(ε(c) − ε(∅)): on a flow model the same weights on velocities give the velocity
    of the ε-space target, because at a fixed x_t a velocity is affine in its ε, v = (ε − x_t)/(1 − σ)."""
    table, t, eta = torch.zeros(1000), torch.tensor([400]), 1.5
    g = torch.Generator().manual_seed(0)
    x, e_c, e_0 = (torch.randn(1, 4, generator=g) for _ in range(3))
    v_c, v_0 = (output_from_noise(table, x, e, t, prediction="flow") for e in (e_c, e_0))
    target_eps = e_0 - eta * (e_c - e_0)
    torch.testing.assert_close(v_0 - eta * (v_c - v_0), output_from_noise(table, x, target_eps, t, prediction="flow"))


# ----------------------------------------------------------------------------- methods


def test_every_builtin_method_declares_flux_or_says_why_not(builtin_host: Any) -> None:
    methods = builtin_host.registry.methods
    assert set(methods) == set(SUPPORTED) | set(UNSUPPORTED)
    assert {n for n, cls in methods.items() if "flux" in cls.backbones} == set(SUPPORTED)
    for name in UNSUPPORTED:
        assert "flux" in methods[name].unsupported_backbones["flux"].lower(), name  # a reason that says why on FLUX


def test_conceptedit_methods_shows_the_flux_reasons() -> None:
    from typer.testing import CliRunner

    from conceptedit.cli.app import app

    result = CliRunner().invoke(app, ["methods", "sld", "--json"])
    assert result.exit_code == 0, result.output
    (info,) = json.loads(result.stdout)
    assert "flux" not in info["backbones"] and "true CFG" in info["unsupported_backbones"]["flux"]
    (info,) = json.loads(CliRunner().invoke(app, ["methods", "uce", "--json"]).stdout)
    assert "flux" in info["backbones"]


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_methods_are_refused_at_validate(name: str, tmp_path: Path) -> None:
    edits, concepts = METHODS[name]
    spec = conceptedit.load_recipe(tiny_recipe(*edits, concepts=concepts)).recipe.flat_edits()[0][1]
    reason = spec.method_cls.unsupported_backbones["flux"]
    with pytest.raises(conceptedit.RecipeError) as caught:
        conceptedit.load_recipe(tiny_recipe(*edits, model="builtin:tiny-flux", concepts=concepts))
    (issue,) = caught.value.issues
    assert issue.path == "edits.0.method" and "but the model is flux" in issue.message and reason in issue.message
    # A pipeline handed in is checked once loaded, before anything runs.
    with pytest.raises(conceptedit.BackboneError, match=r"edits\.0: .*model is flux"):
        conceptedit.apply(
            tiny_recipe(*edits, concepts=concepts), pipeline=build_tiny_flux(), out=tmp_path / "r", quiet=True
        )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", SUPPORTED)
def test_method_runs_on_tiny_flux_reloads_and_exports(name: str, tmp_path: Path) -> None:
    checked = run_and_reload(name, "builtin:tiny-flux", build_tiny_flux, FluxAdapter, tmp_path)
    if name == "esd":  # x-strict: the double-stream blocks' text keys and values
        assert checked.changed == {
            f"transformer.transformer_blocks.{i}.attn.add_{w}_proj.{p}"
            for i in (0, 1)
            for w in "kv"
            for p in ("weight", "bias")
        }
    else:  # the one map of the T5 rows and the one of the CLIP pooled vector
        assert checked.changed == {
            "transformer.context_embedder.weight",
            "transformer.time_text_embed.text_embedder.linear_1.weight",
        }
    exported = conceptedit.export(checked.run, "diffusers", out=tmp_path / "export", check_prompts=["a cat"])
    assert exported.check["weights_max_relative_error"] == 0.0
    # Equal weights; a loaded weight's memory alignment may change a matmul's rounding, and so a pixel by one level.
    assert exported.check["pixel_max_abs_diff"] <= 1.0 and exported.check["pixel_mean_abs_diff"] < 0.01
    plain = FluxPipeline.from_pretrained(str(exported.folder / "pipeline"), local_files_only=True)
    assert plain.tokenizer_2.eos_token_id == EOS
    for full, param in FluxAdapter(plain).named_parameters():
        assert torch.equal(param, checked.edited.get_parameter(full)), full


def test_trce_maps_the_eot_rows_and_the_pooled_vectors_with_priors_and_adversarial_rounds(tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog on the grass\na bowl of fruit\na city street at night\n", encoding="utf-8")
    edit = {
        "method": "trce_eot",
        "params": {
            "concepts": "nsfw",
            "prior": {"captions": str(captions), "limit": 3},
            "eta": 0.1,
            "ridge": 0.1,
            "adversarial": {"rounds": 1},
        },
    }
    recipe = tiny_recipe(edit, model="builtin:tiny-flux", concepts=METHODS["trce_eot"][1])
    result = conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    assert set(result.changed) == {
        "transformer.context_embedder.weight",
        "transformer.time_text_embed.text_embedder.linear_1.weight",
    }
    # The pooled mapping moves the malicious prompt's pooled projection toward the safe one's.
    base = FluxAdapter(build_tiny_flux())
    edited = FluxAdapter(result.pipeline)
    enc = base.encode_prompts(["a photo of nudity", "a photo of a person wearing clothes"])
    assert enc.pooled is not None
    before = base.pooled_layers()[0].projection("k")
    after = edited.pooled_layers()[0].projection("k")
    with torch.no_grad():
        gap_before = (before(enc.pooled[0]) - before(enc.pooled[1])).norm()
        gap_after = (after(enc.pooled[0]) - before(enc.pooled[1])).norm()
    assert gap_after < 0.5 * gap_before


def test_trce_refuses_the_legacy_word_count_without_a_start_token(tmp_path: Path) -> None:
    edit = {"method": "trce_eot", "params": {"concepts": "nsfw", "prior": None, "eot_index": "legacy_wordcount"}}
    recipe = tiny_recipe(edit, model="builtin:tiny-flux", concepts=METHODS["trce_eot"][1])
    with pytest.raises(conceptedit.EditError, match=r"legacy_wordcount .* flux tokenizer has none"):
        conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
