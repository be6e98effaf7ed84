"""Built-in base models that need no network: randomly initialised SD-1.x, SD-2.x and SDXL pipelines.

No SD weights can be had offline, so tests and dry runs use pipelines with SD-1.x's exact
structure (cross-attention ``to_k``/``to_v`` without bias, the real CLIP tokenizer, SD's DDIM
schedule) and seeded random weights. ``tiny-sd`` is small enough to build and sample in well under
a second on a CPU; ``sd14-random`` has SD-1.4's exact sizes, for memory and speed checks.
``tiny-sd2`` is SD-2.x (768-v) at toy size: an OpenCLIP-style text encoder (``gelu``, tokenizer
padding with ``!``), per-block head counts and linear projections in the UNet, and a
``v_prediction`` schedule. ``tiny-sdxl`` is SDXL at toy size: two text encoders (an OpenAI-CLIP-style
``CLIPTextModel`` and an OpenCLIP-style ``CLIPTextModelWithProjection`` whose tokenizer pads with
``!``), a UNet with ``text_time`` added conditioning (pooled text embedding + 6 time ids), several
transformer layers per block, and SDXL's Euler schedule; ``sdxl-random`` has SDXL-base-1.0's
exact sizes (built on demand, about 14 GB in float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from conceptedit.models.builtin_flux import build_tiny_flux
from conceptedit.models.tokenizer import load_clip_tokenizer, load_openclip_tokenizer

if TYPE_CHECKING:  # diffusers/transformers load on first build: ``import conceptedit`` must stay cheap
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

ComponentConfigs = dict[str, dict[str, Any]]
"""Constructor keyword arguments per component: ``unet``, ``text_encoder`` (and for SDXL
``text_encoder_2``) and ``vae``."""

# The published SD-1.4 component sizes (CompVis/stable-diffusion-v1-4), checked by building.
SD14_PARAMETER_COUNTS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}

# SDXL-base-1.0's component sizes (stabilityai/stable-diffusion-xl-base-1.0), checked by building on meta.
SDXL_PARAMETER_COUNTS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}

#: SDXL's added time conditioning: (original height, width, crop top, left, target height, width).
SDXL_TIME_IDS = 6

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407


def sd_scheduler_config() -> dict[str, Any]:
    """SD-1.x's DDIM schedule (what the v1 model cards ship)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def sd2_scheduler_config() -> dict[str, Any]:
    """SD-2.x 768-v's DDIM schedule (``stabilityai/stable-diffusion-2-1``): SD-1.x's betas, v-prediction."""
    return sd_scheduler_config() | {"prediction_type": "v_prediction"}


def sdxl_scheduler_config() -> dict[str, Any]:
    """SDXL-base-1.0's ``EulerDiscreteScheduler`` config: SD-1.x's betas, ε-prediction, leading spacing."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "use_karras_sigmas": False,
    }


def _text_config(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": hidden,
        # The real special-token ids, so pooling finds the end-of-text token by id.
        "bos_token_id": CLIP_BOS_ID,
        "eos_token_id": CLIP_EOS_ID,
        "pad_token_id": CLIP_EOS_ID,
    }


def _openclip_text_config(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    """SD-2.x's text tower (OpenCLIP ViT-H/14 in transformers' CLIPTextModel): ``gelu`` instead of
    ``quick_gelu``, and the tokenizer pads with ``!`` (id 0), recorded as the pad id."""
    return _text_config(hidden, intermediate, layers, heads) | {"hidden_act": "gelu", "pad_token_id": 0}


def _unet_config(
    sample_size: int, channels: tuple[int, ...], layers_per_block: int, cross_attention_dim: int
) -> dict[str, Any]:
    depth = len(channels)
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,  # diffusers' legacy name: SD-1.x uses 8 heads per attention layer
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def _sdxl_unet_config(
    sample_size: int,
    channels: tuple[int, ...],
    layers_per_block: int,
    transformer_layers: tuple[int, ...],
    heads: tuple[int, ...],
    text_width: int,
    pooled_width: int,
    time_embed_dim: int,
) -> dict[str, Any]:
    """SDXL's UNet layout: no attention at the first level, several transformer layers per block
    further down (and in the mid block), linear projections, per-block head counts, and the
    ``text_time`` added conditioning: the pooled text embedding and 6 time ids, each embedded in
    ``time_embed_dim`` sinusoids, projected into the time embedding."""
    depth = len(channels)
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        "up_block_types": ("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        "transformer_layers_per_block": transformer_layers,
        "attention_head_dim": heads,  # diffusers' legacy name for the head count
        "use_linear_projection": True,
        "cross_attention_dim": text_width,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": pooled_width + SDXL_TIME_IDS * time_embed_dim,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def _vae_config(sample_size: int, channels: tuple[int, ...], layers_per_block: int) -> dict[str, Any]:
    depth = len(channels)
    return {
        "sample_size": sample_size,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ("DownEncoderBlock2D",) * depth,
        "up_block_types": ("UpDecoderBlock2D",) * depth,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    }


def tiny_sd_configs() -> ComponentConfigs:
    """SD-1.x structure at toy width: 64 px images, 8x8x4 latents, 32-wide CLIP text encoder."""
    return {
        "unet": _unet_config(sample_size=8, channels=(32, 64), layers_per_block=1, cross_attention_dim=32),
        "text_encoder": _text_config(hidden=32, intermediate=37, layers=2, heads=4),
        # Four VAE levels give SD's 8x downsampling, so 64 px images map to the UNet's 8x8 latents.
        "vae": _vae_config(sample_size=64, channels=(32, 32, 64, 64), layers_per_block=1),
    }


def tiny_sd2_configs() -> ComponentConfigs:
    """SD-2.x (768-v) structure at toy width: 64 px images, 8x8x4 latents, 64-wide OpenCLIP-style text.

    As in SD-2.x's UNet, the head count is set per block (diffusers' legacy ``attention_head_dim``,
    ``[5, 10, 20, 20]`` there: 64 channels a head), transformer blocks project in and out with linear
    layers, attention is upcast, and cross-attention reads the text encoder's full width.
    """
    unet = _unet_config(sample_size=8, channels=(32, 64), layers_per_block=1, cross_attention_dim=64)
    unet |= {"attention_head_dim": (2, 4), "use_linear_projection": True, "upcast_attention": True}
    return {
        "unet": unet,
        "text_encoder": _openclip_text_config(hidden=64, intermediate=256, layers=2, heads=4),
        "vae": _vae_config(sample_size=64, channels=(32, 32, 64, 64), layers_per_block=1),
    }


def sd14_configs() -> ComponentConfigs:
    """SD-1.4's exact component configs (UNet, CLIP ViT-L/14 text tower, KL-f8 VAE)."""
    return {
        "unet": _unet_config(
            sample_size=64, channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768
        ),
        "text_encoder": _text_config(hidden=768, intermediate=3072, layers=12, heads=12),
        "vae": _vae_config(sample_size=512, channels=(128, 256, 512, 512), layers_per_block=2),
    }


def tiny_sdxl_configs() -> ComponentConfigs:
    """SDXL structure at toy width: 64 px images, 8x8x4 latents; text encoder 1 is 32 wide
    (``quick_gelu``), text encoder 2 is 64 wide (``gelu``, with a 48-wide projection for the pooled
    embedding), so cross-attention reads 96-wide rows; transformer depths (1, 1, 2) per level (the
    mid block takes the last), as SDXL's (1, 2, 10)."""
    unet = _sdxl_unet_config(
        sample_size=8,
        channels=(32, 32, 64),
        layers_per_block=1,
        transformer_layers=(1, 1, 2),
        heads=(2, 2, 4),
        text_width=32 + 64,
        pooled_width=48,
        time_embed_dim=8,
    )
    vae = _vae_config(sample_size=64, channels=(32, 32, 64, 64), layers_per_block=1)
    return {
        "unet": unet,
        "text_encoder": _text_config(hidden=32, intermediate=37, layers=2, heads=4),
        "text_encoder_2": _openclip_text_config(hidden=64, intermediate=128, layers=3, heads=4)
        | {"projection_dim": 48},
        "vae": vae | {"scaling_factor": 0.13025, "force_upcast": True},
    }


def sdxl_configs() -> ComponentConfigs:
    """SDXL-base-1.0's exact component configs: UNet (2048-wide cross-attention, ``text_time``
    conditioning), CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection) text towers, KL-f8 VAE."""
    unet = _sdxl_unet_config(
        sample_size=128,
        channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers=(1, 2, 10),
        heads=(5, 10, 20),
        text_width=768 + 1280,
        pooled_width=1280,
        time_embed_dim=256,
    )
    vae = _vae_config(sample_size=1024, channels=(128, 256, 512, 512), layers_per_block=2)
    return {
        "unet": unet,
        "text_encoder": _text_config(hidden=768, intermediate=3072, layers=12, heads=12),
        "text_encoder_2": _openclip_text_config(hidden=1280, intermediate=5120, layers=32, heads=20),
        "vae": vae | {"scaling_factor": 0.13025, "force_upcast": True},
    }


def _seeded_text_encoder(config: dict[str, Any], seed: int, device: torch.device | str, *, projection: bool) -> Any:
    """A CLIP text encoder (with the pooled projection when ``projection``) with seeded weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    text_encoder = cls(CLIPTextConfig(**config))
    # A freshly initialised final LayerNorm (scale 1, shift 0) puts every embedding on the
    # hyperplane where its features sum to zero, a degeneracy no trained CLIP has and one that
    # makes closed-form edits singular. Random affine parameters remove it, as training does.
    norm = (
        text_encoder.get_submodule("final_layer_norm")
        if hasattr(text_encoder, "final_layer_norm")
        else text_encoder.text_model.final_layer_norm
    )
    if torch.device(device).type != "meta":
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    return text_encoder


def build_components(
    configs: ComponentConfigs, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, torch.nn.Module]:
    """UNet, text encoder(s) and VAE with seeded weights; reseeding per component keeps each one
    independent of the others' sizes. ``device="meta"`` allocates nothing (for counting parameters).
    A ``text_encoder_2`` config (SDXL) adds a second text encoder with the pooled projection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        parts: dict[str, torch.nn.Module] = {"unet": unet}
        parts["text_encoder"] = _seeded_text_encoder(configs["text_encoder"], seed, device, projection=False)
        if "text_encoder_2" in configs:  # SDXL: the second encoder gives the pooled embedding
            parts["text_encoder_2"] = _seeded_text_encoder(configs["text_encoder_2"], seed, device, projection=True)
        torch.manual_seed(seed)
        parts["vae"] = AutoencoderKL(**configs["vae"])
    return parts


def sd14_random_components(device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.nn.Module]:
    """SD-1.4-sized components with random weights (about 4 GB in float32 unless on ``meta``)."""
    return build_components(sd14_configs(), seed, device)


def assemble_pipeline(
    components: dict[str, torch.nn.Module], dtype: torch.dtype = torch.float32, *, sd2: bool = False
) -> StableDiffusionPipeline:
    """An SD pipeline around ``components`` with the real tokenizer, SD's DDIM and no safety checker
    (``sd2``: SD-2.x's tokenizer, padding with ``!``, and its v-prediction schedule)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=load_openclip_tokenizer() if sd2 else load_clip_tokenizer(),
        unet=components["unet"],
        scheduler=DDIMScheduler(**(sd2_scheduler_config() if sd2 else sd_scheduler_config())),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline.to(dtype=dtype) if dtype != torch.float32 else pipeline


def build_tiny_sd(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A tiny SD-1.x pipeline for tests: builds and samples 64 px images in well under a second."""
    return assemble_pipeline(build_components(tiny_sd_configs(), seed), dtype)


def build_tiny_sd2(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A tiny SD-2.x (768-v) pipeline for tests: OpenCLIP-style text encoder, ``!`` padding, v-prediction."""
    return assemble_pipeline(build_components(tiny_sd2_configs(), seed), dtype, sd2=True)


def build_sd14_random(
    seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> StableDiffusionPipeline:
    """SD-1.4's exact architecture with random weights: real memory and speed without the weights."""
    return assemble_pipeline(sd14_random_components(device, seed), dtype)


def assemble_sdxl_pipeline(
    components: dict[str, torch.nn.Module],
    dtype: torch.dtype = torch.float32,
    *,
    scheduler: Any = None,
    force_zeros_for_empty_prompt: bool = True,
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline around ``components``: SD-1.x's tokenizer for text encoder 1, SD-2.x's (padding
    with ``!``, as ``stabilityai/stable-diffusion-xl-base-1.0``'s ``tokenizer_2``) for text encoder 2,
    ``scheduler`` (default SDXL's Euler schedule), zeros for an absent negative prompt as SDXL-base
    does unless ``force_zeros_for_empty_prompt`` is off, no watermarker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_openclip_tokenizer(),
        unet=components["unet"],
        scheduler=scheduler if scheduler is not None else EulerDiscreteScheduler(**sdxl_scheduler_config()),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    return pipeline.to(dtype=dtype) if dtype != torch.float32 else pipeline


def build_tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline for tests: two text encoders, pooled + time-id conditioning, 64 px images."""
    return assemble_sdxl_pipeline(build_components(tiny_sdxl_configs(), seed), dtype)


def build_sdxl_random(
    seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> StableDiffusionXLPipeline:
    """SDXL-base-1.0's exact architecture with random weights (3.47B parameters: about 14 GB in
    float32; ``device="meta"`` allocates nothing), for speed and memory figures."""
    return assemble_sdxl_pipeline(build_components(sdxl_configs(), seed, device), dtype)


def _load_shapes() -> StableDiffusionPipeline:
    from conceptedit.shapes.model import load_shapes  # the shapes package imports this module

    return load_shapes()


def _load_shapes_xl() -> StableDiffusionXLPipeline:
    from conceptedit.shapes.model import load_shapes_xl

    return load_shapes_xl()


@dataclass(frozen=True)
class BuiltinModel:
    """A model reachable as ``builtin:NAME``; ``family`` is the backbone family its adapter detects
    (known without building it, so ``validate`` can refuse a method that does not support it)."""

    name: str
    description: str
    build: Callable[..., Any]
    family: str = "sd1"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel("tiny-sd", "tiny random SD-1.x (64 px, 3.4M parameters) for tests and dry runs", build_tiny_sd),
        BuiltinModel(
            "tiny-sd2",
            "tiny random SD-2.x (768-v layout at 64 px, 5.1M parameters: OpenCLIP-style text encoder, "
            "'!' padding, v-prediction) for tests",
            build_tiny_sd2,
            family="sd2",
        ),
        BuiltinModel(
            "tiny-sdxl",
            "tiny random SDXL (64 px, 7.5M parameters: two text encoders, pooled and time-id "
            "conditioning, several transformer layers per block) for tests",
            build_tiny_sdxl,
            family="sdxl",
        ),
        BuiltinModel(
            "tiny-flux",
            "tiny random FLUX.1-schnell layout (64 px, 4.4M parameters: T5-style and CLIP text encoders, "
            "double- and single-stream blocks, 16-channel VAE, flow matching) for tests",
            build_tiny_flux,
            family="flux",
        ),
        BuiltinModel(
            "sd14-random", "SD-1.4's exact architecture (1.07B parameters) with random weights", build_sd14_random
        ),
        BuiltinModel(
            "sdxl-random",
            "SDXL-base-1.0's exact architecture (3.47B parameters) with random weights, for speed and memory",
            build_sdxl_random,
            family="sdxl",
        ),
        BuiltinModel(
            "shapes",
            "SD-1.x architecture trained on coloured shapes (32 px): knows colours and shapes, "
            "by name and implicitly; the default for measuring erasure offline",
            _load_shapes,
        ),
        BuiltinModel(
            "shapes-xl",
            "SDXL architecture trained on the same coloured shapes (32 px): two text encoders, pooled "
            "conditioning; for measuring erasure on SDXL offline",
            _load_shapes_xl,
            family="sdxl",
        ),
    )
}
