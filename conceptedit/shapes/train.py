"""Training ``builtin:shapes``: SD-1.x's architecture at toy size, on the shapes world, from a seed.

Three stages, as SD was built from separately trained parts: an ``AutoencoderKL`` (32x32 images to
8x8x4 latents); a CLIP text encoder, from scratch with the real SD-1.x tokenizer, taught to read
captions (which colour, shape, size, position and background a caption states, however it words
them), standing in for SD's pretrained CLIP; then the UNet on frozen text embeddings, with SD's
noise schedule, epsilon prediction and 10% empty captions (so classifier-free guidance works).
Trained jointly from scratch, the text encoder maps each of a concept's eight phrasings somewhere
different for most of the run, and the UNet learns shapes from the noise instead of the text.
A share of the captions of both later stages carries caption noise: random vocabulary tokens,
none of them a word the world's captions use, inserted before the caption or between its words.
Most of CLIP's 49,408 token rows are never trained here; without the noise an irrelevant token
(a typo, a random-token attack's control) is a random vector the encoder has never learnt to
ignore, and five of them halved the old model's red.

Images and captions come from one seeded generator, so a seed fixes the whole run (for a given
thread count: float sums depend on how work is split).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from conceptedit.models.builtin import (
    CLIP_EOS_ID,
    ComponentConfigs,
    _text_config,
    _unet_config,
    _vae_config,
    assemble_pipeline,
    build_components,
    sd_scheduler_config,
)
from conceptedit.models.tokenizer import CLIP_TOKENIZER_DIR, load_clip_tokenizer, tokenize
from conceptedit.shapes.noise import CaptionNoise
from conceptedit.shapes.world import (
    ATTRIBUTES,
    IMAGE_SIZE,
    Caption,
    Scene,
    describe,
    render,
    sample_scene,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTokenizer

Log = Callable[[str], None]
#: The UNet's keyword arguments besides latents and timesteps for a batch of captions (caption
#: noise drawn from the generator): the text rows, and for SDXL the added conditioning.
#: Features the text-encoder stage's probes read from a batch of token ids, per probe set: the rows
#: (stacked over captions) and how many rows each caption gave.
Readout = Callable[[Tensor], dict[str, tuple[Tensor, Tensor]]]
Condition = Callable[[Sequence[str], np.random.Generator], dict[str, Any]]


def shapes_configs() -> ComponentConfigs:
    """The component sizes: about 5.4M parameters (21 MB in float32), most of them the text
    encoder's 49,408-token embedding table that the real tokenizer's vocabulary requires."""
    # Group norms of 4-6 channels, near SD's 10: one-channel groups (instance norm) would normalise
    # away the mean of each channel over the image, the very signal that carries a flat shape's colour.
    return {
        # 64 and 96 channels over 8x8 latents; cross-attention reads the 48-wide text embeddings.
        "unet": {
            **_unet_config(sample_size=8, channels=(64, 96), layers_per_block=1, cross_attention_dim=48),
            "norm_num_groups": 16,
        },
        "text_encoder": _text_config(hidden=48, intermediate=192, layers=4, heads=4),
        # Three levels downsample twice: 32 px images to 8x8 latents (SD's 8x would leave 4x4).
        "vae": {**_vae_config(sample_size=IMAGE_SIZE, channels=(16, 32, 64), layers_per_block=1), "norm_num_groups": 8},
    }


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does; every field is recorded with the weights.

    Attributes:
        seed: Seeds the weights, the data and the noise.
        vae_steps, vae_batch, vae_lr: The autoencoder stage (L1 + L2 reconstruction plus a small KL
            term); small batches, many steps: on a CPU budget more updates beat larger batches. At
            1,600 steps and lr 2e-3 the autoencoder's hues varied from seed to seed by up to 30
            degrees (a red turned orange before the UNet ever saw it); 3,000 steps at 1e-3
            reconstructed every colour of 700 test scenes within 3 degrees.
        text_steps, text_batch, text_lr: The text encoder stage: a linear probe per attribute reads
            what a caption states from every end-of-text position (the padding the UNet attends to).
        steps, batch, lr: The UNet stage (AdamW, warm-up then cosine decay, as every stage).
        pool: Images rendered and encoded once for that stage, drawn from with fresh captions, noise
            and posterior samples every step: encoding each batch anew would cost an eighth of a step.
        warmup: Linear learning-rate warm-up steps of each stage.
        dark: Share of scenes on a dark background in every stage. The world's own share (a quarter)
            left the first model's autoencoder tinting dark backgrounds green and its UNet drawing red
            on them as magenta; the captions still say which background a scene has.
        noise_share: Share of the text encoder's and the UNet's captions given caption noise.
        noise_tokens: At most this many noise tokens per noisy caption (at least one).
        caption_dropout: Share of empty captions, which teach the unconditional prediction CFG needs.
        min_snr_gamma: Min-SNR loss weighting (Hang et al., 2023): down-weights the easy low-noise
            steps, which converges several times faster than the plain loss on a short budget.
        threads: torch CPU threads. One by default: on a shared 2-core machine two threads spin-wait
            on each other and run these small kernels many times slower.
    """

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    text_steps: int = 450
    text_batch: int = 128
    text_lr: float = 2e-3
    steps: int = 1900
    batch: int = 64
    lr: float = 1.5e-3
    pool: int = 32768
    warmup: int = 50
    dark: float = 0.4
    noise_share: float = 0.25
    noise_tokens: int = 6
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    threads: int = 1


@dataclass(frozen=True)
class TrainResult:
    """A trained pipeline, the seconds each stage took and the last smoothed losses."""

    pipeline: StableDiffusionPipeline
    config: TrainConfig
    seconds: dict[str, float]
    losses: dict[str, float]

    def describe(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "losses": {k: round(v, 5) for k, v in self.losses.items()},
        }


def train(config: TrainConfig, log: Log = print) -> TrainResult:
    """Train the autoencoder, the text encoder, then the UNet; return the assembled pipeline."""
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    components = build_components(shapes_configs(), seed=config.seed)
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = load_clip_tokenizer()
    token_ids = _TokenCache(tokenizer, CaptionNoise(tokenizer, config.noise_share, config.noise_tokens))
    seconds, losses = {}, {}

    start = time.perf_counter()
    losses["vae"] = train_vae(vae, config, rng, generator, log)
    seconds["vae"] = time.perf_counter() - start
    start = time.perf_counter()

    def read(ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        mask, counts = after_first_eot(ids)
        return {"rows": (text_encoder(ids)[0][mask], counts)}

    width = cast(Any, text_encoder).config.hidden_size
    losses["text_encoder"] = train_text_encoder([text_encoder], read, {"rows": width}, token_ids, config, rng, log)
    seconds["text_encoder"] = time.perf_counter() - start
    start = time.perf_counter()

    def condition(texts: Sequence[str], rng: np.random.Generator) -> dict[str, Any]:
        return {"encoder_hidden_states": text_encoder(token_ids(texts, rng))[0]}

    losses["unet"] = train_unet(unet, condition, vae, config, rng, generator, log)
    seconds["unet"] = time.perf_counter() - start

    for module in components.values():
        module.eval().requires_grad_(False)
    pipeline = assemble_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    return TrainResult(pipeline, config, seconds, losses)


def save(pipeline: StableDiffusionPipeline, folder: Path) -> None:
    """``save_pretrained`` with safetensors, but the tokenizer as SD-1.x ships it (``vocab.json`` and
    ``merges.txt``, 1.5 MB): transformers 5 would write a 3.6 MB ``tokenizer.json`` instead."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    tokenizer = Path(folder) / "tokenizer"
    shutil.rmtree(tokenizer)
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "LICENSE"):
        shutil.copyfile(CLIP_TOKENIZER_DIR / name, tokenizer / name)


def image_batch(rng: np.random.Generator, n: int, dark: float = 0.25) -> tuple[Tensor, list[Scene]]:
    """``n`` random scenes (a share ``dark`` on dark backgrounds) and their renders as a
    ``(n, 3, 32, 32)`` tensor in [-1, 1]."""
    scenes = [sample_scene(rng, dark) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes


def train_vae(
    vae: AutoencoderKL, config: TrainConfig, rng: np.random.Generator, generator: torch.Generator, log: Log
) -> float:
    """Reconstruction training, then the latent scaling factor that gives the UNet unit-variance
    inputs; returns the last loss."""
    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = _cosine(optimiser, config.warmup, config.vae_steps)
    started = time.perf_counter()
    average = math.nan
    for step in range(config.vae_steps):
        images, _ = image_batch(rng, config.vae_batch, config.dark)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        error = recon - images
        loss = error.abs().mean() + error.pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        average = _smooth(average, loss.item())
        _report(log, "vae", step, config.vae_steps, average, started)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images, _ = image_batch(rng, 512, config.dark)
        std = vae.encode(images).latent_dist.sample(generator).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    log(f"vae: latent std {std:.4f}, scaling factor {vae.config.scaling_factor}")
    return average


def caption_batch(
    rng: np.random.Generator, n: int, dropout: float, scenes: Sequence[Scene] | None = None, dark: float = 0.25
) -> list[Caption]:
    """Captions of ``scenes`` (default: ``n`` random ones), a share ``dropout`` of them empty."""
    scenes = scenes if scenes is not None else [sample_scene(rng, dark) for _ in range(n)]
    return [Caption("", {}) if rng.random() < dropout else describe(s, rng) for s in scenes]


def train_text_encoder(
    encoders: Sequence[nn.Module],
    read: Readout,
    widths: dict[str, int],
    token_ids: _TokenCache,
    config: TrainConfig,
    rng: np.random.Generator,
    log: Log,
) -> float:
    """Teach the text encoders what captions say: from the features ``read`` takes of each batch
    (``widths`` names them), linear probes (discarded afterwards) must tell each attribute's value
    or that it is unstated. Every phrasing of a concept so lands near its name, as a pretrained
    CLIP's would; the word positions, which no probe reads, keep what distinguishes the phrasings."""
    probes = nn.ModuleDict({key: attribute_probes(width) for key, width in widths.items()})
    parameters = [p for module in (*encoders, probes) for p in module.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=config.text_lr, weight_decay=0.01)
    schedule = _cosine(optimiser, config.warmup, config.text_steps)
    for encoder in encoders:
        encoder.train()
    started = time.perf_counter()
    average = math.nan
    correct = 0.0
    for step in range(config.text_steps):
        captions = caption_batch(rng, config.text_batch, config.caption_dropout, dark=config.dark)
        loss = torch.zeros(())
        correct = 0.0
        for key, (features, counts) in read(token_ids([c.text for c in captions], rng)).items():
            part, read_right = probe_loss(cast(nn.ModuleDict, probes[key]), features, captions, counts)
            loss = loss + part
            correct += read_right / len(widths)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        average = _smooth(average, loss.item())
        _report(log, "text encoder", step, config.text_steps, average, started)
    log(f"text encoder: probes read {correct:.1%} of the attributes right on the last batch")
    for encoder in encoders:
        encoder.eval().requires_grad_(False)
    return average


def after_first_eot(ids: Tensor) -> tuple[Tensor, Tensor]:
    """The mask of positions from the first end-of-text token on (the padding the UNet attends to
    reads the whole caption there) and its count per caption."""
    mask = (ids == CLIP_EOS_ID).cumsum(dim=1) > 0
    return mask, mask.sum(dim=1)


def attribute_probes(width: int) -> nn.ModuleDict:
    """One linear probe per attribute: its values, or "unstated" (class 0)."""
    return nn.ModuleDict({name: nn.Linear(width, len(values) + 1) for name, values in ATTRIBUTES.items()})


def probe_loss(
    probes: nn.ModuleDict, features: Tensor, captions: Sequence[Caption], counts: Tensor
) -> tuple[Tensor, float]:
    """Summed cross-entropy of every attribute's probe on ``features`` (``counts[i]`` rows per
    caption, in caption order) and the share of attributes read right."""
    loss = torch.zeros(())
    correct = 0.0
    for name, values in ATTRIBUTES.items():
        labels = torch.tensor([values.index(c.said[name]) + 1 if name in c.said else 0 for c in captions])
        logits = probes[name](features)
        targets = labels.repeat_interleave(counts)
        loss = loss + F.cross_entropy(logits, targets)
        correct += (logits.argmax(dim=1) == targets).float().mean().item() / len(ATTRIBUTES)
    return loss, correct


def train_unet(
    unet: nn.Module,
    condition: Condition,
    vae: AutoencoderKL,
    config: TrainConfig,
    rng: np.random.Generator,
    generator: torch.Generator,
    log: Log,
) -> float:
    """Epsilon-prediction training of the UNet on what ``condition`` makes of each step's captions
    (the frozen text encoders' output); returns the last smoothed loss."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items() if k != "set_alpha_to_one"})
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=config.min_snr_gamma) / snr
    optimiser = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = _cosine(optimiser, config.warmup, config.steps)
    started = time.perf_counter()
    scenes, mean, std = latent_pool(vae, rng, config.pool, config.dark)
    log(f"unet: encoded {config.pool} images in {time.perf_counter() - started:.0f}s")
    started = time.perf_counter()
    unet.train()
    average = math.nan
    for step in range(config.steps):
        index = rng.integers(config.pool, size=config.batch)
        captions = caption_batch(rng, config.batch, config.caption_dropout, [scenes[i] for i in index])
        latents = (
            mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        ) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            conditioning = condition([c.text for c in captions], rng)
        prediction = unet(noisy, timesteps, **conditioning).sample
        loss = (weights[timesteps] * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        average = _smooth(average, loss.item())
        _report(log, "unet", step, config.steps, average, started)
    return average


@torch.no_grad()
def latent_pool(
    vae: AutoencoderKL, rng: np.random.Generator, n: int, dark: float, batch: int = 256
) -> tuple[list[Scene], Tensor, Tensor]:
    """``n`` random scenes with the mean and standard deviation of their latent posteriors."""
    scenes: list[Scene] = []
    means, stds = [], []
    for start in range(0, n, batch):
        images, chunk = image_batch(rng, min(batch, n - start), dark)
        posterior = vae.encode(images).latent_dist
        scenes += chunk
        means.append(posterior.mean)
        stds.append(posterior.std)
    return scenes, torch.cat(means), torch.cat(stds)


class _TokenCache:
    """Token ids of cleaned captions, memoised (the caption space is small and the tokenizer slow),
    with caption noise added afresh on every call."""

    def __init__(self, tokenizer: CLIPTokenizer, noise: CaptionNoise) -> None:
        self.tokenizer = tokenizer
        self.noise = noise
        self.cache: dict[str, Tensor] = {}

    def __call__(self, captions: Sequence[str], rng: np.random.Generator) -> Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            self.cache.update(zip(missing, tokenize(self.tokenizer, missing), strict=True))
        return self.noise(torch.stack([self.cache[c] for c in captions]), rng)


def _cosine(optimiser: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def _smooth(average: float, value: float) -> float:
    return value if math.isnan(average) else 0.98 * average + 0.02 * value


def _report(log: Log, stage: str, step: int, total: int, loss: float, started: float) -> None:
    if step == 0 or (step + 1) % 50 == 0 or step + 1 == total:
        elapsed = time.perf_counter() - started
        log(f"{stage}: step {step + 1}/{total}  loss {loss:.4f}  {elapsed:.0f}s ({elapsed / (step + 1):.2f}s/step)")
