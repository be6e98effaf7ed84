"""Built-in models: seeded, SD-shaped, runnable and round-trippable; SD-1.4 sizes are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from conceptedit.models.builtin import (
    BUILTIN_MODELS,
    SD14_PARAMETER_COUNTS,
    build_tiny_sd,
    sd14_random_components,
    sd_scheduler_config,
)

COMPONENTS = ("unet", "text_encoder", "vae")


def _states(pipe: StableDiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in COMPONENTS}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny() -> StableDiffusionPipeline:
    pipe = build_tiny_sd(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sd_is_seeded(tiny: StableDiffusionPipeline) -> None:
    again, other = _states(build_tiny_sd(seed=0)), _states(build_tiny_sd(seed=1))
    for name, state in _states(tiny).items():
        assert _same(state, again[name]), name
        assert not _same(state, other[name]), name


def test_tiny_sd_is_sd_shaped(tiny: StableDiffusionPipeline) -> None:
    assert tiny.safety_checker is None and tiny.feature_extractor is None
    assert isinstance(tiny.scheduler, DDIMScheduler)
    assert {k: tiny.scheduler.config[k] for k in sd_scheduler_config()} == sd_scheduler_config()
    assert tiny.vae_scale_factor == 8 and tiny.unet.config.sample_size == 8
    assert tiny.tokenizer.pad_token_id == tiny.tokenizer.eos_token_id == 49407
    assert tiny.text_encoder.config.vocab_size == len(tiny.tokenizer)
    cross = [m for n, m in tiny.unet.named_modules() if n.endswith("attn2")]
    assert cross and all(m.to_k.bias is None and m.to_v.bias is None for m in cross)
    assert all(p.dtype == torch.float32 for p in tiny.unet.parameters())


def test_tiny_sd_generates(tiny: StableDiffusionPipeline) -> None:
    images = tiny("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_tiny_sd_round_trips(tiny: StableDiffusionPipeline, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.safety_checker is None
    reloaded = _states(loaded)
    for name, state in _states(tiny).items():
        assert _same(state, reloaded[name]), name
    assert loaded.tokenizer("a photo of a cat").input_ids == tiny.tokenizer("a photo of a cat").input_ids
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert {k: loaded.scheduler.config[k] for k in sd_scheduler_config()} == sd_scheduler_config()


def test_sd14_random_has_sd14_sizes() -> None:
    components = sd14_random_components(device="meta")
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}
    assert counts == SD14_PARAMETER_COUNTS


def test_registry() -> None:
    assert set(BUILTIN_MODELS) == {
        "tiny-sd",
        "tiny-sd2",
        "tiny-sdxl",
        "tiny-flux",
        "sd14-random",
        "sdxl-random",
        "shapes",
        "shapes-xl",
    }
    for name, model in BUILTIN_MODELS.items():
        assert model.name == name and model.description and callable(model.build)
    assert BUILTIN_MODELS["tiny-sd"].build is build_tiny_sd
