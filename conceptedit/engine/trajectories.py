"""Denoising-trajectory latents for training methods: sampled once, kept lean, cached on disk.

A trajectory-loss method trains on noisy latents ``x_t`` taken from the model's own DDIM
(η = 0) sampling runs. Only the latents training will actually read are kept: the caller
says up front which (trajectory, step) pairs it needs -- training draws its schedule from a
seeded generator, so it knows -- and each latent is stored in half precision together with
its **own** timestep (the latent *before* step k is paired with t_k). Sampling stops at the
last step any kept latent needs, and trajectories nobody reads are never sampled.

The result is cached as safetensors, keyed by the model, prompts, seeds, sampler settings and
the requested pairs, so a second run with the same recipe and seed samples nothing.

:func:`ddim_walk` is the one sampler: the cache uses it with frozen weights, and methods that
sample with the model being trained (ESD's paper setting) call :func:`partial_ddim` directly.
:class:`PlannedLatents` pairs a training plan (:mod:`conceptedit.engine.schedules`) with the
latents it reads.

The sampler is the adapter's (``BackboneAdapter.sampler``): DDIM (η = 0) built from the pipeline's
scheduler config, ``prediction_type`` included, so ``scheduler.step`` reads the model's output as ε
or as v (SD-2.x 768) as the model was trained; on FLUX the pipeline's own flow-matching Euler
sampler on the same sigmas. Classifier-free guidance combines outputs with weights summing to one,
valid in every prediction type. Timesteps keep the sampler's dtype (integers for DDIM, the flow
sampler's fractional ``1000 σ``).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from conceptedit.api.context import EditContext
from conceptedit.engine.schedules import needed_steps
from conceptedit.io.atomic import atomic_write_bytes


@dataclass(frozen=True)
class TrajectoryRequest:
    """What to sample.

    Attributes:
        prompts: One prompt per trajectory ("" for unconditional ones).
        seeds: One initial-noise seed per trajectory.
        needed: For each trajectory index, the DDIM step indices whose input latent is kept
            (``steps`` itself keeps the finished latent, paired with timestep 0).
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
    timesteps: Tensor  # [M]: the timestep each latent belongs to (int64 for DDIM, float for the flow sampler)
    index: Tensor  # [M, 2], int64: (trajectory, step)
    sampled: bool  # False when read from the cache

    def lookup(self) -> dict[tuple[int, int], int]:
        return {(int(a), int(b)): i for i, (a, b) in enumerate(self.index.tolist())}


def ddim_timesteps(ctx: EditContext, steps: int) -> Tensor:
    """The sampler's timesteps (high to low) for ``steps`` steps: DDIM's on the pipeline's noise schedule
    (the flow sampler's on FLUX)."""
    return ctx.adapter.sampler(steps).timesteps.clone()


def _cache_key(ctx: EditContext, request: TrajectoryRequest, shape: tuple[int, ...]) -> str:
    payload = {
        "model": ctx.base_fingerprint,
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
    for j, steps in request.needed.items():
        bad = [int(k) for k in steps if not 0 <= int(k) <= request.steps]
        if bad:
            raise ValueError(
                f"{label} trajectory {j}: step indices {bad} are outside 0..{request.steps} "
                f"(a {request.steps}-step run; {request.steps} is the finished latent)"
            )
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
        ctx.progress.task(f"{ctx.label}: sample {label} trajectories ({len(wanted)})", total_steps) as bar,
    ):
        empty = ctx.encode_prompts([""]).hidden
        for batch in batches:
            prompts = [request.prompts[j] for j in batch]
            cond = ctx.encode_prompts(prompts).hidden
            noise = seeded_noise(shape, [request.seeds[j] for j in batch]).to(ctx.device)
            last = max(max(request.needed[j]) for j in batch)
            for k, latents in ddim_walk(ctx, noise, cond, empty, request.guidance, request.steps, last):
                for row, j in enumerate(batch):
                    if k in request.needed[j]:
                        kept_latents.append(latents[row].to("cpu", torch.float16))
                        kept_index.append((j, k))
                bar.advance()
    index = torch.tensor(kept_index, dtype=torch.long).reshape(-1, 2)
    # A finished latent (step index == steps) has left the schedule: it is paired with t = 0.
    with_final = torch.cat([timesteps, timesteps.new_zeros(1)])
    result = TrajectoryLatents(
        latents=torch.stack(kept_latents) if kept_latents else torch.zeros(0, *shape, dtype=torch.float16),
        timesteps=with_final[index[:, 1]] if len(index) else torch.zeros(0, dtype=timesteps.dtype),
        index=index,
        sampled=True,
    )
    tensors = {"latents": result.latents, "timesteps": result.timesteps, "index": result.index}
    atomic_write_bytes(path, save(tensors, metadata={"label": label, "trajectories": str(len(wanted))}))
    return result


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """One standard-normal latent per seed, each from its own CPU generator (device independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def ddim_walk(
    ctx: EditContext, noise: Tensor, cond: Tensor, empty: Tensor, guidance: float, steps: int, last: int
) -> Iterator[tuple[int, Tensor]]:
    """Deterministic DDIM (η = 0) from ``noise``: yields ``(k, latents before step k)`` for k = 0..last.

    It runs whatever weights the model holds when each step is taken (wrap it in
    ``ctx.reference_weights`` for a frozen reference) and needs ``torch.no_grad()``. ``last``
    may equal ``steps``: the finished latent. The one sampler behind cached trajectories and
    methods that sample with the model being trained.
    """
    scheduler = ctx.adapter.sampler(steps)
    timesteps = scheduler.timesteps
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow samplers start from unit noise (σ = 1)
    for k in range(last + 1):
        yield k, latents
        if k == last:
            return
        t = timesteps[k]
        output = _guided_noise(ctx, latents, t, cond, empty, guidance)  # ε, v or flow: the scheduler knows which
        latents = scheduler.step(output, t, latents).prev_sample  # DDIM's default η is 0


def partial_ddim(
    ctx: EditContext, noise: Tensor, cond: Tensor, empty: Tensor, guidance: float, steps: int, stop: int
) -> Tensor:
    """The latents after ``stop`` DDIM steps from ``noise``, with the weights the model holds now (no cache)."""
    with torch.no_grad():
        ((_, latents),) = deque(ddim_walk(ctx, noise, cond, empty, guidance, steps, stop), maxlen=1)
    return latents


@dataclass
class PlannedLatents:
    """A latent source: a training plan of (trajectory, step) pairs and the latents it reads.

    ``plan`` is ``[draws, 2]`` (one latent per draw) or ``[draws, n, 2]`` (n per draw).
    """

    plan: Tensor
    kept: TrajectoryLatents

    def __post_init__(self) -> None:
        self._rows = self.kept.lookup()

    def take(self, draw: int, device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
        """Latents (float32), their own timesteps and trajectory indices for one draw."""
        pairs = self.plan[draw].reshape(-1, 2).tolist()
        rows = [self._rows[(j, k)] for j, k in pairs]
        latents = self.kept.latents[rows].to(device, torch.float32)
        return latents, self.kept.timesteps[rows].to(device), [j for j, _ in pairs]


def sample_planned(
    ctx: EditContext,
    plan: Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance: float,
    steps: int,
    weights: str,
    label: str,
) -> PlannedLatents:
    """Sample (or read from the cache) exactly the latents ``plan`` reads; see :func:`sample_trajectories`."""
    request = TrajectoryRequest(
        prompts=prompts, seeds=seeds, needed=needed_steps(plan), guidance=guidance, steps=steps, weights=weights
    )
    return PlannedLatents(plan, sample_trajectories(ctx, request, label))


def _guided_noise(ctx: EditContext, latents: Tensor, t: Tensor, cond: Tensor, empty: Tensor, guidance: float) -> Tensor:
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
