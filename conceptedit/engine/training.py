"""The training loop every trajectory-loss method runs inside.

The engine, not the method, owns the optimiser, gradient accumulation, clipping, mixed
precision and device placement (through accelerate, so the same recipe runs on a CPU, a
GPU or under ``accelerate launch``), resumable checkpoints, the loss log and the checks
that stop a run when a loss stops being finite. A method contributes which parameters
train and a dictionary of loss terms per micro-batch; a training group sums several
methods' terms with their weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from conceptedit.api.method import EditMethod
from conceptedit.api.params import TrainingConfig
from conceptedit.engine.context import EditContext, RunContext
from conceptedit.engine.memory import ParkedModules, map_large_allocations, release_freed_memory
from conceptedit.errors import TrainingError
from conceptedit.io.atomic import atomic_dir

KEEP_CHECKPOINTS = 2


@dataclass
class Member:
    """One method inside a training loop (a lone training edit is a group of one)."""

    ctx: EditContext
    method: EditMethod
    weight: float = 1.0


@dataclass
class TrainingReport:
    """What a training loop did."""

    steps: int
    resumed_from: int
    trained: list[str]
    last_losses: dict[str, float]
    log: Path


# Split into pieces, the loop's order (set-up, each step, checkpoints, tear-down) would be read across
# five functions; long on purpose, so it reads top to bottom as nanoGPT's does.
def train(
    members: list[Member], config: TrainingConfig, run: RunContext, label: str, resume: bool = False
) -> TrainingReport:
    """Train ``members`` together for ``config.steps`` steps on the sum of their weighted losses."""
    adapter = run.adapter
    params: dict[str, nn.Parameter] = {}
    for member in members:
        names = list(member.method.trainable_parameters(member.ctx))
        if not names:
            raise TrainingError(f"{member.ctx.label}: the method declares no trainable parameters")
        for name in names:
            params[name] = adapter.get_parameter(name)
    names = sorted(params)
    run.ledger.touch(names)
    map_large_allocations()
    for member in members:
        member.method.prepare_training(member.ctx)
    release_freed_memory()

    checkpoint_root = run.run_dir / "checkpoints" / _slug(label)
    log_path = run.run_dir / "logs" / f"{_slug(label)}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    components = sorted({name.split(".", 1)[0] for name in names})

    idle = {}
    if config.park_idle_modules:
        pipeline_modules = getattr(run.pipeline, "components", {})
        idle = {k: m for k, m in pipeline_modules.items() if isinstance(m, nn.Module) and k not in components}
    with (
        ParkedModules(idle) as parked,
        _only_these_train(adapter.components(), params.values(), config.gradient_checkpointing),
    ):
        run.parked = parked
        accelerator = Accelerator(cpu=run.device.type == "cpu", mixed_precision=config.mixed_precision)
        optimizer = _optimizer(config, [params[n] for n in names])
        modules = {c: adapter.components()[c] for c in components}
        prepared = accelerator.prepare(*modules.values(), optimizer)
        *wrapped, optimizer = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
        run.training_modules = dict(zip(modules, wrapped, strict=True))
        start = 0
        if resume:
            start = _load_latest(checkpoint_root, names, params, optimizer, members)
        _truncate_log(log_path, start)
        last: dict[str, float] = {}
        try:
            with run.reporter.task(f"{label}: train", config.steps) as bar:
                bar.advance(start)
                for step in range(start + 1, config.steps + 1):
                    last = _step(members, config, accelerator, optimizer, [params[n] for n in names], step, label)
                    if config.zero_grad:
                        optimizer.zero_grad(set_to_none=True)
                    lr = float(optimizer.param_groups[0]["lr"])
                    if accelerator.is_main_process:
                        with log_path.open("a", encoding="utf-8") as fh:
                            fh.write(json.dumps({"step": step, "lr": lr, **last, "time": time.time()}) + "\n")
                        run.host.pm.hook.conceptedit_on_train_step(ctx=members[0].ctx, step=step, losses=last, lr=lr)
                    bar.advance(info=f"loss {last['total']:.4g}")
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                        if accelerator.is_main_process:
                            _save_checkpoint(checkpoint_root, step, names, params, optimizer, members)
                        accelerator.wait_for_everyone()
        finally:
            run.training_modules = {}
            run.parked = None
            accelerator.free_memory()
    return TrainingReport(config.steps, start, names, last, log_path)


def _step(
    members: list[Member],
    config: TrainingConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    step: int,
    label: str,
) -> dict[str, float]:
    totals: dict[str, float] = {}
    total = 0.0
    grouped = len(members) > 1
    for _ in range(config.grad_accum):
        loss: Tensor | None = None
        for member in members:
            with accelerator.autocast():
                terms = member.method.trajectory_loss(member.ctx, step)
            if not terms:
                raise TrainingError(f"{member.ctx.label}: trajectory_loss returned no loss terms at step {step}")
            for key, value in terms.items():
                number = float(value.detach().float().mean())
                if not math.isfinite(number):
                    raise TrainingError(
                        f"{member.ctx.label}: loss term {key!r} is {number} at step {step}; the run stopped. "
                        "Lower the learning rate, use float32, or check the method's inputs."
                    )
                name = f"{member.ctx.label}/{key}" if grouped else key
                totals[name] = totals.get(name, 0.0) + number / config.grad_accum
                contribution = member.weight * value
                loss = contribution if loss is None else loss + contribution
        assert loss is not None
        total += float(loss.detach()) / config.grad_accum
        accelerator.backward(loss / config.grad_accum)
    if config.max_grad_norm is not None:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    totals["total"] = total
    return totals


def _optimizer(config: TrainingConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


@contextmanager
def _only_these_train(modules: dict[str, nn.Module], trainable: object, checkpointing: bool) -> Iterator[None]:
    """Freeze everything but ``trainable`` for the block; restore flags and modes after."""
    wanted = {id(p) for p in trainable}  # type: ignore[attr-defined]
    saved = [(p, p.requires_grad) for m in modules.values() for p in m.parameters()]
    modes = {name: m.training for name, m in modules.items()}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        for m in modules.values():
            if checkpointing and hasattr(m, "enable_gradient_checkpointing"):
                cast(Any, m).enable_gradient_checkpointing()
            m.train()
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for name, m in modules.items():
            if checkpointing and hasattr(m, "disable_gradient_checkpointing"):
                cast(Any, m).disable_gradient_checkpointing()
            m.train(modes[name])


# --------------------------------------------------------------------------- checkpoints


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _save_checkpoint(
    root: Path,
    step: int,
    names: list[str],
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    members: list[Member],
) -> None:
    """Parameters, optimiser state and RNG state of ``step``, as safetensors (no pickle)."""
    target = root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(tmp / "trainable.safetensors"))
        state = optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, dict[str, float]] = {}
        for idx, slots in state["state"].items():
            for key, value in slots.items():
                if isinstance(value, Tensor):
                    tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        for k, member in enumerate(members):
            tensors[f"rng.member.{k}"] = member.ctx.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "step": str(step),
            "names": json.dumps(names),
            "param_groups": json.dumps(state["param_groups"]),
            "scalars": json.dumps(scalars),
        }
        save_file(tensors, str(tmp / "state.safetensors"), metadata=meta)
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _load_latest(
    root: Path,
    names: list[str],
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    members: list[Member],
) -> int:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    if not done:
        return 0
    latest = done[-1]
    from safetensors import safe_open

    with safe_open(str(latest / "state.safetensors"), "pt") as fh:
        meta = fh.metadata()
        state_tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    if json.loads(meta["names"]) != names:
        raise TrainingError(f"checkpoint {latest} trains other parameters than this recipe; start a fresh run")
    weights = load_file(str(latest / "trainable.safetensors"))
    with torch.no_grad():
        for name in names:
            params[name].copy_(weights[name])
    slots: dict[int, dict[str, object]] = {}
    for key, value in state_tensors.items():
        if key.startswith("state."):
            _, idx, slot = key.split(".", 2)
            slots.setdefault(int(idx), {})[slot] = value
    for idx, extra in json.loads(meta["scalars"]).items():
        slots.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": slots, "param_groups": json.loads(meta["param_groups"])})
    for k, member in enumerate(members):
        member.ctx.generator.set_state(state_tensors[f"rng.member.{k}"])
    torch.set_rng_state(state_tensors["rng.torch"])
    return int(meta["step"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
