"""Training ``builtin:shapes``: SD-1.x's architecture at toy size, on the shapes world, from a seed.

Two stages, as SD was built: an ``AutoencoderKL`` (32x32 images to 8x8x4 latents) trained alone,
then the UNet and a CLIP text encoder trained jointly from scratch on its latents, with the real
SD-1.x tokenizer, SD's noise schedule, epsilon prediction and 10% empty captions (so classifier-free
guidance works). Images and captions are drawn afresh every step from one seeded generator, so a
seed fixes the whole run (for a given thread count: float sums depend on how work is split).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from conceptedit.models.builtin import (
    ComponentConfigs,
    _text_config,
    _unet_config,
    _vae_config,
    assemble_pipeline,
    build_components,
    sd_scheduler_config,
)
from conceptedit.models.tokenizer import CLIP_TOKENIZER_DIR, load_clip_tokenizer, tokenize
from conceptedit.shapes.world import IMAGE_SIZE, describe, render, sample_scene

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTokenizer

Log = Callable[[str], None]


def shapes_configs() -> ComponentConfigs:
    """The component sizes: about 5.4M parameters (21 MB in float32), most of them the text
    encoder's 49,408-token embedding table that the real tokenizer's vocabulary requires."""
    # Group norms of 4-6 channels, near SD's 10: one-channel groups (instance norm) would normalise
    # away the mean of each channel over the image, the very signal that carries a flat shape's colour.
    return {
        # 64 and 96 channels over 8x8 latents; cross-attention reads the 48-wide text embeddings.
        "unet": {**_unet_config(sample_size=8, channels=(64, 96), layers_per_block=1, cross_attention_dim=48),
                 "norm_num_groups": 16},
        "text_encoder": _text_config(hidden=48, intermediate=192, layers=4, heads=4),
        # Three levels downsample twice: 32 px images to 8x8 latents (SD's 8x would leave 4x4).
        "vae": {**_vae_config(sample_size=IMAGE_SIZE, channels=(16, 32, 64), layers_per_block=1),
                "norm_num_groups": 8},
    }


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does; every field is recorded with the weights.

    Attributes:
        seed: Seeds the weights, the data and the noise.
        vae_steps, vae_batch, vae_lr: The autoencoder stage (L1 + L2 reconstruction plus a small KL
            term); small batches, many steps: on a CPU budget more updates beat larger batches.
        steps, batch, lr: The joint UNet + text encoder stage (AdamW, warm-up then cosine decay).
        warmup: Linear learning-rate warm-up steps of each stage.
        caption_dropout: Share of empty captions, which teach the unconditional prediction CFG needs.
        min_snr_gamma: Min-SNR loss weighting (Hang et al., 2023): down-weights the easy low-noise
            steps, which converges several times faster than the plain loss on a short budget.
        threads: torch CPU threads. One by default: on a shared 2-core machine two threads spin-wait
            on each other and run these small kernels many times slower.
    """

    seed: int = 0
    vae_steps: int = 1600
    vae_batch: int = 16
    vae_lr: float = 2e-3
    steps: int = 1500
    batch: int = 64
    lr: float = 1.5e-3
    warmup: int = 50
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    threads: int = 1


@dataclass(frozen=True)
class TrainResult:
    """A trained pipeline and how long each stage took (seconds)."""

    pipeline: StableDiffusionPipeline
    config: TrainConfig
    vae_seconds: float
    denoiser_seconds: float
    final_loss: float

    def describe(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "vae_seconds": round(self.vae_seconds, 1),
                "denoiser_seconds": round(self.denoiser_seconds, 1), "final_loss": round(self.final_loss, 5)}


def train(config: TrainConfig, log: Log = print) -> TrainResult:
    """Train the autoencoder, then the UNet and text encoder; return the assembled pipeline."""
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    components = build_components(shapes_configs(), seed=config.seed)
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    generator = torch.Generator().manual_seed(config.seed)

    start = time.perf_counter()
    train_vae(vae, config, rng, generator, log)
    vae_seconds = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = load_clip_tokenizer()
    loss = train_denoiser(unet, text_encoder, vae, tokenizer, config, rng, generator, log)
    denoiser_seconds = time.perf_counter() - start

    for module in components.values():
        module.eval().requires_grad_(False)
    pipeline = assemble_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    return TrainResult(pipeline, config, vae_seconds, denoiser_seconds, loss)


def save(pipeline: StableDiffusionPipeline, folder: Path) -> None:
    """``save_pretrained`` with safetensors, but the tokenizer as SD-1.x ships it (``vocab.json`` and
    ``merges.txt``, 1.5 MB): transformers 5 would write a 3.6 MB ``tokenizer.json`` instead."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    tokenizer = Path(folder) / "tokenizer"
    shutil.rmtree(tokenizer)
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "LICENSE"):
        shutil.copyfile(CLIP_TOKENIZER_DIR / name, tokenizer / name)


def image_batch(rng: np.random.Generator, n: int) -> tuple[Tensor, list[Any]]:
    """``n`` random scenes and their renders as a ``(n, 3, 32, 32)`` tensor in [-1, 1]."""
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes


def train_vae(vae: AutoencoderKL, config: TrainConfig, rng: np.random.Generator,
              generator: torch.Generator, log: Log) -> None:
    """Reconstruction training, then the latent scaling factor that gives the UNet unit-variance inputs."""
    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = _cosine(optimiser, config.warmup, config.vae_steps)
    started = time.perf_counter()
    for step in range(config.vae_steps):
        images, _ = image_batch(rng, config.vae_batch)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        error = recon - images
        loss = error.abs().mean() + error.pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        _report(log, "vae", step, config.vae_steps, loss.item(), started)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images, _ = image_batch(rng, 512)
        std = vae.encode(images).latent_dist.sample(generator).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    log(f"vae: latent std {std:.4f}, scaling factor {vae.config.scaling_factor}")


def train_denoiser(unet: nn.Module, text_encoder: nn.Module, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                   config: TrainConfig, rng: np.random.Generator, generator: torch.Generator,
                   log: Log) -> float:
    """Joint epsilon-prediction training of the UNet and the text encoder; returns the last loss."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items() if k != "set_alpha_to_one"})
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=config.min_snr_gamma) / snr
    token_ids = _TokenCache(tokenizer)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)
    schedule = _cosine(optimiser, config.warmup, config.steps)
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    average = math.nan
    for step in range(config.steps):
        images, scenes = image_batch(rng, config.batch)
        captions = ["" if rng.random() < config.caption_dropout else describe(s, rng) for s in scenes]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(token_ids(captions))[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        loss = (weights[timesteps] * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        average = loss.item() if math.isnan(average) else 0.98 * average + 0.02 * loss.item()
        _report(log, "denoiser", step, config.steps, average, started)
    return average


class _TokenCache:
    """Token ids of cleaned captions, memoised: the caption space is small and the tokenizer slow."""

    def __init__(self, tokenizer: CLIPTokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            self.cache.update(zip(missing, tokenize(self.tokenizer, missing), strict=True))
        return torch.stack([self.cache[c] for c in captions])


def _cosine(optimiser: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def _report(log: Log, stage: str, step: int, total: int, loss: float, started: float) -> None:
    if step == 0 or (step + 1) % 50 == 0 or step + 1 == total:
        elapsed = time.perf_counter() - started
        log(f"{stage}: step {step + 1}/{total}  loss {loss:.4f}  {elapsed:.0f}s ({elapsed / (step + 1):.2f}s/step)")
