"""Denoising-trajectory latents for training methods: sampled once, kept lean, cached on disk.

A trajectory-loss method trains on noisy latents ``x_t`` taken from the model's own DDIM
(η = 0) sampling runs. Only the latents training will actually read are kept: the caller
says up front which (trajectory, step) pairs it needs -- training draws its schedule from a
seeded generator, so it knows -- and each latent is stored in half precision together with
its **own** timestep (the latent *before* step k is paired with t_k). Sampling stops at the
last step any kept latent needs, and trajectories nobody reads are never sampled.

The result is cached as safetensors, keyed by the model, prompts, seeds, sampler settings and
the requested pairs, so a second run with the same recipe and seed samples nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from conceptedit.engine.context import EditContext
from conceptedit.io.atomic import atomic_write_bytes


@dataclass(frozen=True)
class TrajectoryRequest:
    """What to sample.

    Attributes:
        prompts: One prompt per trajectory ("" for unconditional ones).
        seeds: One initial-noise seed per trajectory.
        needed: For each trajectory index, the DDIM step indices whose input latent is kept.
        guidance: Classifier-free guidance scale of the sampler (1 or less: conditional only).
        steps: DDIM steps of a full trajectory.
        weights: Which model samples: ``base`` (before the run) or ``edit_start``.
        batch_size: Trajectories sampled at once.
    """

    prompts: Sequence[str]
    seeds: Sequence[int]
    needed: Mapping[int, Sequence[int]]
    guidance: float = 3.0
    steps: int = 50
    weights: str = "base"
    batch_size: int = 8


@dataclass
class TrajectoryLatents:
    """Kept latents: ``latents[i]`` is trajectory ``index[i, 0]`` before DDIM step ``index[i, 1]``."""

    latents: Tensor  # [M, C, H, W], float16
    timesteps: Tensor  # [M], int64: the timestep each latent belongs to
    index: Tensor  # [M, 2], int64: (trajectory, step)
    sampled: bool  # False when read from the cache

    def lookup(self) -> dict[tuple[int, int], int]:
        return {(int(a), int(b)): i for i, (a, b) in enumerate(self.index.tolist())}


def ddim_timesteps(ctx: EditContext, steps: int) -> Tensor:
    """The DDIM timesteps (high to low) of the pipeline's noise schedule for ``steps`` steps."""
    return _scheduler(ctx, steps).timesteps.clone()


def _scheduler(ctx: EditContext, steps: int):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(
        ctx.adapter.pipeline.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    scheduler.set_timesteps(steps)
    return scheduler


def _cache_key(ctx: EditContext, request: TrajectoryRequest, shape: tuple[int, ...]) -> str:
    payload = {
        "model": ctx.run.base_fingerprint,
        "weights": request.weights,
        "prompts": list(request.prompts),
        "seeds": [int(s) for s in request.seeds],
        "needed": {str(k): sorted(int(s) for s in v) for k, v in sorted(request.needed.items()) if v},
        "guidance": request.guidance,
        "steps": request.steps,
        "shape": list(shape),
        "scheduler": dict(ctx.adapter.pipeline.scheduler.config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sample_trajectories(ctx: EditContext, request: TrajectoryRequest, label: str) -> TrajectoryLatents:
    """The requested latents, from the cache or by sampling (with a progress bar)."""
    shape = ctx.adapter.latent_shape(1)[1:]
    path = ctx.cache_path("trajectories", _cache_key(ctx, request, tuple(shape)))
    if path.is_file():
        data = load_file(str(path))
        return TrajectoryLatents(data["latents"], data["timesteps"], data["index"], sampled=False)
    wanted = sorted(k for k, v in request.needed.items() if v)
    timesteps = ddim_timesteps(ctx, request.steps)
    kept_latents: list[Tensor] = []
    kept_index: list[tuple[int, int]] = []
    batches = [wanted[i : i + request.batch_size] for i in range(0, len(wanted), request.batch_size)]
    total_steps = sum(max(max(request.needed[j]) for j in batch) + 1 for batch in batches)
    with (
        torch.no_grad(),
        ctx.reference_weights(request.weights),  # type: ignore[arg-type]
        ctx.run.reporter.task(f"{ctx.label}: sample {label} trajectories ({len(wanted)})", total_steps) as bar,
    ):
        empty = ctx.encode_prompts([""]).hidden
        for batch in batches:
            prompts = [request.prompts[j] for j in batch]
            cond = ctx.encode_prompts(prompts).hidden
            latents = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(int(request.seeds[j]))) for j in batch]
            ).to(ctx.device)
            scheduler = _scheduler(ctx, request.steps)
            latents = latents * scheduler.init_noise_sigma
            last = max(max(request.needed[j]) for j in batch)
            for k in range(last + 1):
                for row, j in enumerate(batch):
                    if k in request.needed[j]:
                        kept_latents.append(latents[row].to("cpu", torch.float16))
                        kept_index.append((j, k))
                if k == last:
                    bar.advance()
                    break
                t = timesteps[k]
                eps = _guided_noise(ctx, latents, t, cond, empty, request.guidance)
                latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
                bar.advance()
    index = torch.tensor(kept_index, dtype=torch.long).reshape(-1, 2)
    result = TrajectoryLatents(
        latents=torch.stack(kept_latents) if kept_latents else torch.zeros(0, *shape, dtype=torch.float16),
        timesteps=timesteps[index[:, 1]].long() if len(index) else torch.zeros(0, dtype=torch.long),
        index=index,
        sampled=True,
    )
    tensors = {"latents": result.latents, "timesteps": result.timesteps, "index": result.index}
    atomic_write_bytes(path, save(tensors, metadata={"label": label, "trajectories": str(len(wanted))}))
    return result


def _guided_noise(
    ctx: EditContext, latents: Tensor, t: Tensor, cond: Tensor, empty: Tensor, guidance: float
) -> Tensor:
    batch = latents.shape[0]
    steps = t.reshape(1).expand(batch).to(ctx.device)
    if guidance <= 1.0:
        return ctx.predict_noise(latents, steps, cond, frozen=True).float()
    both = ctx.predict_noise(
        torch.cat([latents, latents]),
        torch.cat([steps, steps]),
        torch.cat([cond, empty.expand(batch, -1, -1)]),
        frozen=True,
    ).float()
    eps_c, eps_0 = both.chunk(2)
    return eps_0 + guidance * (eps_c - eps_0)
