"""Denoising-trajectory latents for training methods: sampled once, kept lean, cached on disk.

A trajectory-loss method trains on noisy latents ``x_t`` taken from the model's own DDIM
(η = 0) sampling runs. Only the latents training will actually read are kept: the caller
says up front which (trajectory, step) pairs it needs -- training draws its schedule from a
seeded generator, so it knows -- and each latent is stored in half precision together with
its **own** timestep (the latent *before* step k is paired with t_k). Sampling stops at the
last step any kept latent needs, and trajectories nobody reads are never sampled.

The result is cached as safetensors, keyed by the model, prompts, seeds, sampler settings and
the requested pairs, so a second run with the same recipe and seed samples nothing.

**Frozen targets.** A request may also name frozen-model predictions it needs at every kept
latent (:class:`FrozenTarget`: which reference weights, which text condition). The latents come
from a fixed plan and the reference weights do not train, so these predictions are fixed: they
are computed once, when the latents are sampled, and stored in float16 beside them in the same
file (``target.<name>``). A guided walk's conditional and unconditional predictions at a kept
latent are by-products of sampling it and are taken from the walk (at the latent before its
float16 rounding); the others come from one batched frozen pass over the stored latents. The key
then also names the targets and, where ``edit_start`` weights are involved, the model at the
edit's start (``ctx.edit_start_fingerprint``), so a different stage-1 edit gives another file.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from conceptedit.api.context import EditContext
from conceptedit.engine.schedules import needed_steps
from conceptedit.errors import EditError
from conceptedit.io.atomic import atomic_write_bytes


@dataclass(frozen=True)
class FrozenTarget:
    """A frozen model's prediction wanted at every kept latent of a request, at the latent's own timestep.

    Attributes:
        weights: Whose prediction: ``base`` (the model before the run) or ``edit_start`` (before this edit).
        prompt: Its text condition: None = each trajectory's own prompt; a string = the same for every
            trajectory ("" for the unconditional prediction); a sequence = one per trajectory.
    """

    weights: Literal["base", "edit_start"]
    prompt: str | Sequence[str] | None = None

    def prompts(self, own: Sequence[str]) -> list[str]:
        """The condition of each trajectory, given the trajectories' own prompts."""
        if self.prompt is None:
            return list(own)
        if isinstance(self.prompt, str):
            return [self.prompt] * len(own)
        if len(self.prompt) != len(own):
            raise ValueError(f"a frozen target names {len(self.prompt)} prompts for {len(own)} trajectories")
        return list(self.prompt)


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
        batch_size: Trajectories sampled at once (and latents per batch of the frozen-target pass).
        targets: Frozen predictions to store at every kept latent, by name.
    """

    prompts: Sequence[str]
    seeds: Sequence[int]
    needed: Mapping[int, Sequence[int]]
    guidance: float = 3.0
    steps: int = 50
    weights: str = "base"
    batch_size: int = 8
    targets: Mapping[str, FrozenTarget] = field(default_factory=dict)


@dataclass
class TrajectoryLatents:
    """Kept latents: ``latents[i]`` is trajectory ``index[i, 0]`` before DDIM step ``index[i, 1]``."""

    latents: Tensor  # [M, C, H, W], float16
    timesteps: Tensor  # [M]: the timestep each latent belongs to (int64 for DDIM, float for the flow sampler)
    index: Tensor  # [M, 2], int64: (trajectory, step)
    sampled: bool  # False when read from the cache
    targets: dict[str, Tensor] = field(default_factory=dict)  # name -> [M, C, H, W] float16, row for row

    def lookup(self) -> dict[tuple[int, int], int]:
        return {(int(a), int(b)): i for i, (a, b) in enumerate(self.index.tolist())}


def ddim_timesteps(ctx: EditContext, steps: int) -> Tensor:
    """The sampler's timesteps (high to low) for ``steps`` steps: DDIM's on the pipeline's noise schedule
    (the flow sampler's on FLUX)."""
    return ctx.adapter.sampler(steps).timesteps.clone()


def _cache_key(ctx: EditContext, request: TrajectoryRequest, shape: tuple[int, ...]) -> str:
    payload: dict[str, object] = {
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
    if request.targets:  # absent otherwise, so caches written before targets existed stay valid
        payload["targets"] = {
            name: {"weights": target.weights, "prompts": target.prompts(request.prompts)}
            for name, target in sorted(request.targets.items())
        }
    if "edit_start" in {request.weights, *(target.weights for target in request.targets.values())}:
        payload["edit_start"] = ctx.edit_start_fingerprint  # earlier edits (stage 1) shape these weights
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
        targets = {name: data[f"target.{name}"] for name in request.targets}
        return TrajectoryLatents(data["latents"], data["timesteps"], data["index"], sampled=False, targets=targets)
    wanted = sorted(k for k, v in request.needed.items() if v)
    timesteps = ddim_timesteps(ctx, request.steps)
    kept_latents, kept_index, from_walk = _walk(ctx, request, wanted, tuple(shape), label)
    index = torch.tensor(kept_index, dtype=torch.long).reshape(-1, 2)
    # A finished latent (step index == steps) has left the schedule: it is paired with t = 0.
    with_final = torch.cat([timesteps, timesteps.new_zeros(1)])
    result = TrajectoryLatents(
        latents=torch.stack(kept_latents) if kept_latents else torch.zeros(0, *shape, dtype=torch.float16),
        timesteps=with_final[index[:, 1]] if len(index) else torch.zeros(0, dtype=timesteps.dtype),
        index=index,
        sampled=True,
    )
    for name, target in request.targets.items():
        result.targets[name] = _frozen_target(ctx, request, result, name, target, from_walk, label)
    tensors = {"latents": result.latents, "timesteps": result.timesteps, "index": result.index}
    tensors |= {f"target.{name}": value for name, value in result.targets.items()}
    atomic_write_bytes(path, save(tensors, metadata={"label": label, "trajectories": str(len(wanted))}))
    return result


def _walk(
    ctx: EditContext, request: TrajectoryRequest, wanted: list[int], shape: tuple[int, ...], label: str
) -> tuple[list[Tensor], list[tuple[int, int]], dict[tuple[str, int, int], Tensor]]:
    """Sample the ``wanted`` trajectories: the kept latents (float16), their (trajectory, step) and the
    requested targets the walk predicts anyway, by (target, trajectory, step)."""
    kept_latents: list[Tensor] = []
    kept_index: list[tuple[int, int]] = []
    # Targets the walk computes anyway: name -> trajectory -> which of its predictions (0: cond, 1: uncond).
    walked = {name: _walk_source(request, target) for name, target in request.targets.items()}
    record = any(walked.values())
    from_walk: dict[tuple[str, int, int], Tensor] = {}
    batches = [wanted[i : i + request.batch_size] for i in range(0, len(wanted), request.batch_size)]
    total_steps = sum(max(max(request.needed[j]) for j in batch) + 1 for batch in batches)
    with (
        torch.no_grad(),
        ctx.reference_weights(request.weights),  # type: ignore[arg-type]
        ctx.progress.task(f"{ctx.label}: sample {label} trajectories ({len(wanted)})", total_steps) as bar,
    ):
        empty = ctx.encode_prompts([""]).hidden
        for batch in batches:

            def keep(k: int, eps_c: Tensor, eps_0: Tensor | None, batch: list[int] = batch) -> None:
                for row, j in enumerate(batch):
                    if k not in request.needed[j]:
                        continue
                    for name, sources in walked.items():
                        pick = (eps_c, eps_0)[sources[j]] if j in sources else None
                        if pick is not None:
                            from_walk[name, j, k] = pick[row].to("cpu", torch.float16)

            cond = ctx.encode_prompts([request.prompts[j] for j in batch]).hidden
            noise = seeded_noise(shape, [request.seeds[j] for j in batch]).to(ctx.device)
            last = max(max(request.needed[j]) for j in batch)
            walk = ddim_walk(ctx, noise, cond, empty, request.guidance, request.steps, last, keep if record else None)
            for k, latents in walk:
                for row, j in enumerate(batch):
                    if k in request.needed[j]:
                        kept_latents.append(latents[row].to("cpu", torch.float16))
                        kept_index.append((j, k))
                bar.advance()
    return kept_latents, kept_index, from_walk


def _walk_source(request: TrajectoryRequest, target: FrozenTarget) -> dict[int, int]:
    """For each trajectory whose walk predicts ``target`` anyway, which prediction: 0 the conditional
    one, 1 the unconditional one (guided walks only). Another model's prediction is never a by-product."""
    if target.weights != request.weights:
        return {}
    sources = {}
    for j, prompt in enumerate(target.prompts(request.prompts)):
        if prompt == request.prompts[j]:
            sources[j] = 0
        elif prompt == "" and request.guidance > 1.0:
            sources[j] = 1
    return sources


def _frozen_target(
    ctx: EditContext,
    request: TrajectoryRequest,
    kept: TrajectoryLatents,
    name: str,
    target: FrozenTarget,
    from_walk: Mapping[tuple[str, int, int], Tensor],
    label: str,
) -> Tensor:
    """``target`` at every kept latent, float16: the walk's by-products, the rest in one batched frozen pass
    over the stored latents (as training reads them)."""
    rows = kept.index.tolist()
    out = torch.zeros(kept.latents.shape, dtype=torch.float16)
    missing = []
    for i, (j, k) in enumerate(rows):
        found = from_walk.get((name, j, k))
        if found is None:
            missing.append(i)
        else:
            out[i] = found
    prompts = target.prompts(request.prompts)
    if missing:
        needed = [prompts[rows[i][0]] for i in missing]
        unique = list(dict.fromkeys(needed))
        size = request.batch_size
        with (
            torch.no_grad(),
            ctx.reference_weights(target.weights),
            ctx.progress.task(f"{ctx.label}: frozen {name} targets of {label} latents", len(missing)) as bar,
        ):
            hidden = ctx.encode_prompts(unique).hidden
            slot = {prompt: s for s, prompt in enumerate(unique)}
            for start in range(0, len(missing), size):
                part = missing[start : start + size]
                prediction = ctx.predict_noise(
                    kept.latents[part].to(ctx.device, torch.float32),
                    kept.timesteps[part].to(ctx.device),
                    hidden[[slot[needed[start + i]] for i in range(len(part))]],
                    frozen=True,
                )
                out[part] = prediction.to("cpu", torch.float16)
                bar.advance(len(part))
    if not bool(torch.isfinite(out).all()):
        raise EditError(
            f"{ctx.label}: the frozen {name} predictions at the {label} latents do not fit in float16; "
            "set training.frozen_targets: recompute"
        )
    return out


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """One standard-normal latent per seed, each from its own CPU generator (device independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def ddim_walk(
    ctx: EditContext,
    noise: Tensor,
    cond: Tensor,
    empty: Tensor,
    guidance: float,
    steps: int,
    last: int,
    predictions: Callable[[int, Tensor, Tensor | None], None] | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Deterministic DDIM (η = 0) from ``noise``: yields ``(k, latents before step k)`` for k = 0..last.

    It runs whatever weights the model holds when each step is taken (wrap it in
    ``ctx.reference_weights`` for a frozen reference) and needs ``torch.no_grad()``. ``last``
    may equal ``steps``: the finished latent. The one sampler behind cached trajectories and
    methods that sample with the model being trained. ``predictions(k, conditional,
    unconditional)`` receives the model's outputs at the latents before step k (unconditional:
    None for an unguided walk), so frozen targets need not run them again.
    """
    scheduler = ctx.adapter.sampler(steps)
    timesteps = scheduler.timesteps
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow samplers start from unit noise (σ = 1)
    for k in range(last + 1):
        yield k, latents
        if k == last:
            return
        t = timesteps[k]
        output, eps_c, eps_0 = _guided_noise(ctx, latents, t, cond, empty, guidance)  # ε, v or flow
        if predictions is not None:
            predictions(k, eps_c, eps_0)
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

    def target(self, name: str, draw: int, device: torch.device) -> Tensor:
        """The stored frozen target ``name`` (float32) at one draw's latents, in :meth:`take`'s order."""
        if name not in self.kept.targets:
            raise KeyError(f"no frozen target {name!r} was requested with these latents ({sorted(self.kept.targets)})")
        rows = [self._rows[(j, k)] for j, k in self.plan[draw].reshape(-1, 2).tolist()]
        return self.kept.targets[name][rows].to(device, torch.float32)


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
    targets: Mapping[str, FrozenTarget] | None = None,
) -> PlannedLatents:
    """Sample (or read from the cache) exactly the latents ``plan`` reads, with the frozen ``targets`` at
    each (:meth:`PlannedLatents.target`); see :func:`sample_trajectories`."""
    request = TrajectoryRequest(
        prompts=prompts,
        seeds=seeds,
        needed=needed_steps(plan),
        guidance=guidance,
        steps=steps,
        weights=weights,
        targets=dict(targets or {}),
    )
    return PlannedLatents(plan, sample_trajectories(ctx, request, label))


def _guided_noise(
    ctx: EditContext, latents: Tensor, t: Tensor, cond: Tensor, empty: Tensor, guidance: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The guided output and the conditional and unconditional outputs it combines (None unguided)."""
    batch = latents.shape[0]
    steps = t.reshape(1).expand(batch).to(ctx.device)
    if guidance <= 1.0:
        eps = ctx.predict_noise(latents, steps, cond, frozen=True).float()
        return eps, eps, None
    both = ctx.predict_noise(
        torch.cat([latents, latents]),
        torch.cat([steps, steps]),
        torch.cat([cond, empty.expand(batch, -1, -1)]),
        frozen=True,
    ).float()
    eps_c, eps_0 = both.chunk(2)
    return eps_0 + guidance * (eps_c - eps_0), eps_c, eps_0
