"""``builtin:shapes-xl``: the shapes world in SDXL's layout, its training script and its measured accuracy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

import conceptedit
from conceptedit.models.builtin import BUILTIN_MODELS, CLIP_EOS_ID, sd_scheduler_config
from conceptedit.models.sdxl import StableDiffusionXLAdapter, second_stream_ids
from conceptedit.models.tokenizer import tokenize
from conceptedit.shapes.evaluate import (
    accuracy,
    context_prompts,
    judge_prompts,
    judge_under_prefix_tokens,
    prompt_embeds,
)
from conceptedit.shapes.model import SHAPES_MODEL_DIR, SHAPES_XL_MODEL_DIR
from conceptedit.shapes.world import explicit_prompts, implicit_prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_xl() -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(SHAPES_XL_MODEL_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_second_stream_ids_are_what_tokenizer_2_gives(shapes_xl: StableDiffusionXLPipeline) -> None:
    """For prompts without ``!`` tokenizer 2 gives tokenizer 1's tokens, padded with ``!`` (id 0)."""
    prompts = ["a red circle", "a drawing of a tiny scarlet circle, on the right", ""]
    ids = tokenize(shapes_xl.tokenizer, prompts)
    derived = second_stream_ids(ids, CLIP_EOS_ID, 0)
    assert torch.equal(derived, tokenize(shapes_xl.tokenizer_2, prompts))
    # by hand: [SoT] a red circle [EoT] ! ! ...
    assert derived[0, :6].tolist() == [49406, *shapes_xl.tokenizer("a red circle").input_ids[1:4], 49407, 0]


def test_prompt_embeds_from_ids_match_the_pipelines_own_encoding(shapes_xl: StableDiffusionXLPipeline) -> None:
    prompts = ["a red circle", "a small blue cross at the top"]
    embeds = prompt_embeds(shapes_xl, tokenize(shapes_xl.tokenizer, prompts))
    rows, _, pooled, _ = shapes_xl.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds["prompt_embeds"], rows, rtol=0, atol=1e-6)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], pooled, rtol=0, atol=1e-6)


def test_shipped_model_is_a_plain_sdxl_folder(shapes_xl: StableDiffusionXLPipeline) -> None:
    files = [p for p in SHAPES_XL_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30e6
    weights = ("unet", "vae", "text_encoder", "text_encoder_2")
    assert {p.suffix for p in files if p.parent.name in weights} == {".json", ".safetensors"}
    assert (SHAPES_XL_MODEL_DIR / "README.md").is_file()
    assert isinstance(shapes_xl.scheduler, DDIMScheduler)
    assert {k: shapes_xl.scheduler.config[k] for k in sd_scheduler_config()} == sd_scheduler_config()
    assert shapes_xl.tokenizer.pad_token_id == CLIP_EOS_ID and shapes_xl.tokenizer_2.pad_token_id == 0
    assert not shapes_xl.config.force_zeros_for_empty_prompt
    width = shapes_xl.text_encoder.config.hidden_size + shapes_xl.text_encoder_2.config.hidden_size
    assert shapes_xl.unet.config.cross_attention_dim == width
    assert shapes_xl.unet.config.addition_embed_type == "text_time"
    # the VAE is builtin:shapes', byte for byte
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (SHAPES_XL_MODEL_DIR / vae).read_bytes() == (SHAPES_MODEL_DIR / vae).read_bytes()
    assert StableDiffusionXLAdapter.matches(shapes_xl)


def test_builtin_shapes_xl_loads_through_the_toolkit() -> None:
    assert BUILTIN_MODELS["shapes-xl"].family == "sdxl"
    loaded = conceptedit.load_model("builtin:shapes-xl")
    assert loaded.kind == "builtin" and isinstance(loaded.pipeline, StableDiffusionXLPipeline)


def test_recorded_accuracy_meets_the_bars() -> None:
    """builtin:shapes' bars, on the numbers eval.json recorded for the shipped SDXL-layout weights."""
    measured = json.loads((SHAPES_XL_MODEL_DIR / "eval.json").read_text())["accuracy"]
    assert measured["explicit"]["colour"] >= 0.95 and measured["explicit"]["shape"] >= 0.95
    assert measured["implicit_colour"]["colour"] >= 0.9 and measured["implicit_shape"]["shape"] >= 0.9
    for name in ("contexts", "random_prefix_tokens"):
        assert measured[name]["colour"] >= 0.9 and measured[name]["shape"] >= 0.9, (name, measured[name])
    assert measured["explicit"]["n"] == 4 * 28 and measured["contexts"]["n"] == 224


def test_shipped_model_draws_what_it_is_asked(shapes_xl: StableDiffusionXLPipeline) -> None:
    """Fresh seeds (not those of eval.json): explicit, implicit, in context and under prefix tokens."""
    explicit = accuracy(judge_prompts(shapes_xl, explicit_prompts(), seeds=[100, 101]))
    assert explicit.colour >= 0.9 and explicit.shape >= 0.85, explicit
    judged = judge_prompts(shapes_xl, implicit_prompts()[::6], seeds=[100])
    colour = accuracy([j for j in judged if j.prompt.implicit == "colour"]).colour
    shape = accuracy([j for j in judged if j.prompt.implicit == "shape"]).shape
    assert colour >= 0.8 and shape >= 0.8, (colour, shape)
    contexts = accuracy(judge_prompts(shapes_xl, context_prompts()[::4], seeds=[100]))
    assert contexts.colour >= 0.85 and contexts.shape >= 0.85, contexts
    noisy = accuracy(judge_under_prefix_tokens(shapes_xl, explicit_prompts(), seeds=[100], noise_seed=1))
    assert noisy.colour >= 0.85 and noisy.shape >= 0.85, noisy


def test_train_script_writes_a_loadable_sdxl_folder(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_shapes", REPO / "scripts" / "train_shapes.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "model"
    tiny = ["--steps", "2", "--text-steps", "2", "--batch", "4", "--text-batch", "4", "--pool", "16"]
    script.main(["--family", "sdxl", "--out", str(out), *tiny, "--no-eval"])
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["steps"] == 2 and not any(k.startswith("vae_") for k in training["config"])
    assert "builtin:shapes-xl" in (out / "README.md").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.tokenizer_2.pad_token == "!"
    image = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
