"""Training ``builtin:shapes-xl``: SDXL's architecture at toy size, on the shapes world, from a seed.

The same world, captions, caption noise and stages as ``builtin:shapes`` (:mod:`.train`), with
what makes SDXL different from SD-1.x:

* two text encoders, an OpenAI-CLIP-style one (``quick_gelu``, padding with [EoT]) and an
  OpenCLIP-style one with a projection (``gelu``, padding with ``!``), trained together; the probes
  read each encoder's **penultimate** states from the first [EoT] on (the rows SDXL's UNet reads)
  and encoder 2's **pooled** projection, so both streams and the pooled vector carry the caption;
* a UNet with SDXL's layout (no attention at the first level, linear projections, per-block head
  counts) and ``text_time`` added conditioning: the pooled embedding and 6 time ids, here always
  ``(32, 32, 0, 0, 32, 32)`` (no crops, one size), what the pipeline passes by default.

The autoencoder is ``builtin:shapes``' own, frozen: the world and its images are the same, and
the two models then differ only where SD-1.x and SDXL differ. Empty captions are encoded like any
other (``force_zeros_for_empty_prompt`` off), as the erasure methods encode the unconditional
prompt. Sampling uses DDIM with SD's schedule (SDXL's betas are the same), as ``builtin:shapes``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from conceptedit.models.builtin import (
    CLIP_EOS_ID,
    ComponentConfigs,
    _openclip_text_config,
    _sdxl_unet_config,
    _text_config,
    assemble_sdxl_pipeline,
    build_components,
    sd_scheduler_config,
)
from conceptedit.models.sdxl import encode_rows, second_stream_ids
from conceptedit.models.tokenizer import CLIP_TOKENIZER_DIR, OPENCLIP_PAD_TOKEN, load_clip_tokenizer
from conceptedit.shapes.model import SHAPES_MODEL_DIR
from conceptedit.shapes.noise import CaptionNoise
from conceptedit.shapes.train import (
    Log,
    TrainConfig,
    TrainResult,
    _TokenCache,
    after_first_eot,
    shapes_configs,
    train_text_encoder,
    train_unet,
)
from conceptedit.shapes.world import IMAGE_SIZE

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

#: The time ids of every training and sampling call: 32 px images, no crop.
TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)


def shapes_xl_configs() -> ComponentConfigs:
    """UNet and text encoders of ``builtin:shapes-xl`` (the VAE is ``builtin:shapes``').

    Sized to ship in 30 MB with both 49,408-token embedding tables (32 and 40 wide, 14 MB together):
    the UNet's second level is 80 channels where ``builtin:shapes`` has 96, and each attention
    block has one transformer layer (SDXL has up to ten)."""
    return {
        "unet": _sdxl_unet_config(
            sample_size=8,
            channels=(64, 80),
            layers_per_block=1,
            transformer_layers=(1, 1),
            heads=(4, 4),
            text_width=32 + 40,
            pooled_width=32,
            time_embed_dim=8,
        )
        | {"norm_num_groups": 16},
        "text_encoder": _text_config(hidden=32, intermediate=128, layers=4, heads=4),
        "text_encoder_2": _openclip_text_config(hidden=40, intermediate=160, layers=4, heads=4)
        | {"projection_dim": 32},
    }


def train_xl(config: TrainConfig, log: Log = print) -> TrainResult:
    """Train the two text encoders, then the UNet; return the assembled SDXL pipeline."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    configs = shapes_xl_configs()
    components = build_components(configs | {"vae": shapes_configs()["vae"]}, seed=config.seed)
    vae = AutoencoderKL.from_pretrained(str(SHAPES_MODEL_DIR / "vae"), local_files_only=True)
    components["vae"] = vae.eval().requires_grad_(False)
    unet = components["unet"]
    encoder_1: Any = components["text_encoder"]
    encoder_2: Any = components["text_encoder_2"]
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = load_clip_tokenizer()
    token_ids = _TokenCache(tokenizer, CaptionNoise(tokenizer, config.noise_share, config.noise_tokens))

    def encode(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows of encoder 1 and 2 (penultimate states) and the pooled vector."""
        rows, pooled = encode_rows(encoder_1, encoder_2, ids, second_stream_ids(ids, CLIP_EOS_ID, 0))
        width = int(encoder_1.config.hidden_size)
        return rows[..., :width], rows[..., width:], pooled

    def read(ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        mask, counts = after_first_eot(ids)
        rows_1, rows_2, pooled = encode(ids)
        return {
            "rows_1": (rows_1[mask], counts),
            "rows_2": (rows_2[mask], counts),
            "pooled": (pooled, torch.ones_like(counts)),
        }

    def condition(texts: Sequence[str], rng: np.random.Generator) -> dict[str, Any]:
        ids = token_ids(texts, rng)
        rows, pooled = encode_rows(encoder_1, encoder_2, ids, second_stream_ids(ids, CLIP_EOS_ID, 0))
        time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).expand(len(texts), -1)
        return {"encoder_hidden_states": rows, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    widths = {
        "rows_1": int(encoder_1.config.hidden_size),
        "rows_2": int(encoder_2.config.hidden_size),
        "pooled": int(encoder_2.config.projection_dim),
    }
    seconds, losses = {}, {}
    start = time.perf_counter()
    losses["text_encoders"] = train_text_encoder([encoder_1, encoder_2], read, widths, token_ids, config, rng, log)
    seconds["text_encoders"] = time.perf_counter() - start
    start = time.perf_counter()
    losses["unet"] = train_unet(unet, condition, vae, config, rng, generator, log)
    seconds["unet"] = time.perf_counter() - start

    for module in components.values():
        module.eval().requires_grad_(False)
    pipeline = assemble_shapes_xl(components)
    pipeline.set_progress_bar_config(disable=True)
    return TrainResult(pipeline, config, seconds, losses)


def assemble_shapes_xl(components: dict[str, Any]) -> StableDiffusionXLPipeline:
    """An SDXL pipeline around trained ``components`` (the usual tokenizers), DDIM with SD's schedule,
    empty prompts encoded (not zeroed)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**sd_scheduler_config())
    return assemble_sdxl_pipeline(components, scheduler=scheduler, force_zeros_for_empty_prompt=False)


def save_xl(pipeline: StableDiffusionXLPipeline, folder: Path) -> None:
    """``save_pretrained`` with safetensors; both tokenizers as the SDXL repositories ship them
    (``vocab.json`` and ``merges.txt``, tokenizer 2 with ``!`` as its pad token)."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name, pad in (("tokenizer", None), ("tokenizer_2", OPENCLIP_PAD_TOKEN)):
        target = Path(folder) / name
        shutil.rmtree(target)
        target.mkdir()
        for file in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "LICENSE"):
            text = (CLIP_TOKENIZER_DIR / file).read_text()
            if pad is not None and file.endswith(".json"):
                text = text.replace('"pad_token": "<|endoftext|>"', f'"pad_token": "{pad}"')
            (target / file).write_text(text)
