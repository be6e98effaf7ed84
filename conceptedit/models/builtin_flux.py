"""``builtin:tiny-flux``: FLUX.1-schnell's layout at toy size with seeded random weights.

FLUX.1 conditions a rectified-flow transformer on two text encoders: T5 v1.1 XXL, whose
4096-wide rows enter through ``context_embedder`` and the double-stream blocks' joint attention,
and CLIP ViT-L/14, whose pooled output (768 wide) is added to the timestep embedding. The tiny
model keeps every part and its wiring and shrinks the widths:

* ``FluxTransformer2DModel``: 2 double-stream and 2 single-stream blocks, 2 heads of 16
  (rotary axes 4 + 6 + 6 = 16, FLUX's 16 + 56 + 56 = 128), 48-wide text rows, 32-wide pooled
  vector, 64 input channels (16 latent channels in 2x2 patches), and ``guidance_embeds: false``
  as schnell: there is no distilled guidance input, so classifier-free guidance is true CFG with
  a negative prompt (``true_cfg_scale``);
* ``T5EncoderModel`` in T5 v1.1's form (gated GELU, relative position buckets, no tied
  embeddings), 48 wide, 2 layers, T5's 32,128-row embedding table (the tokenizer's 32,100
  entries rounded up to a multiple of 128, as Google's checkpoints), no dropout; its tokenizer is
  the T5-style stand-in of :func:`~conceptedit.models.tokenizer.load_t5_tokenizer`;
* ``CLIPTextModel`` (OpenAI CLIP's ``quick_gelu``, pooled at the end-of-text id) 32 wide with the
  real CLIP tokenizer;
* ``AutoencoderKL`` with 16 latent channels, FLUX's scaling and shift factors and no quant
  convolutions, four levels (8x down-sampling) and ``sample_size`` 64, the native image size;
* ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-schnell's config (no resolution shift).

The final norms of both text encoders get random affine weights: a freshly initialised one puts
every row on a fixed sphere (T5's RMS norm) or hyperplane (CLIP's LayerNorm), a degeneracy no
trained encoder has and one that makes closed-form edits ill-conditioned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from conceptedit.models.tokenizer import load_clip_tokenizer, load_t5_tokenizer

if TYPE_CHECKING:  # diffusers/transformers load on first build: ``import conceptedit`` must stay cheap
    from diffusers import FluxPipeline

#: T5's embedding rows: the tokenizer's 32,100 entries rounded up to a multiple of 128.
T5_VOCAB_ROWS = 32_128


def flux_schnell_scheduler_config() -> dict[str, Any]:
    """FLUX.1-schnell's ``FlowMatchEulerDiscreteScheduler`` config: shift 1, no resolution-dependent shift."""
    return {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }


def tiny_flux_configs() -> dict[str, dict[str, Any]]:
    """Constructor arguments of the tiny model's ``transformer``, ``text_encoder`` (CLIP),
    ``text_encoder_2`` (T5) and ``vae`` (see the module docstring)."""
    clip_width, t5_width = 32, 48
    return {
        "transformer": {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": t5_width,
            "pooled_projection_dim": clip_width,
            "guidance_embeds": False,
            "axes_dims_rope": (4, 6, 6),
        },
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": clip_width,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": clip_width,
            "bos_token_id": 49406,
            "eos_token_id": 49407,  # pooling finds the end-of-text token by this id
            "pad_token_id": 49407,
        },
        "text_encoder_2": {
            "vocab_size": T5_VOCAB_ROWS,
            "d_model": t5_width,
            "d_kv": 12,
            "d_ff": 96,
            "num_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
            "dropout_rate": 0.0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 16,
            "block_out_channels": (32, 32, 64, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "norm_num_groups": 32,
            "sample_size": 64,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
    }


def _randomise_final_norm(norm: Any) -> None:
    """Random affine weights for a text encoder's final norm (see the module docstring); T5's has no shift."""
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0.0, 0.2)


def build_tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """A tiny FLUX.1-schnell-shaped pipeline for tests: builds in about a second, samples 64 px images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs = tiny_flux_configs()
    # Reseeding per component keeps each one independent of the others' sizes.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**configs["transformer"])
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    _randomise_final_norm(clip.get_submodule("final_layer_norm"))
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(**configs["text_encoder_2"]))
    _randomise_final_norm(t5.encoder.final_layer_norm)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs["vae"])
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**flux_schnell_scheduler_config()),
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=t5.eval(),
        tokenizer_2=load_t5_tokenizer(),
        transformer=transformer,
    )
    return pipeline.to(dtype=dtype) if dtype != torch.float32 else pipeline
