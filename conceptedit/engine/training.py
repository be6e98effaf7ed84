"""The training loop every trajectory-loss method runs inside.

The engine, not the method, owns the optimiser, gradient accumulation, clipping, mixed
precision and device placement (through accelerate, so the same recipe runs on a CPU, a
GPU or under ``accelerate launch``), resumable checkpoints, the loss log and the checks
that stop a run when a loss stops being finite. A method contributes which parameters
train and a dictionary of loss terms per micro-batch; a training group sums several
methods' terms with their weights. A method may also add modules of its own (adapters such as
Receler's erasers, :meth:`~conceptedit.EditMethod.added_modules`): they train with the rest,
are checkpointed, never enter the weight ledger, and are saved after the last step as the guard
the method makes of them (:meth:`~conceptedit.EditMethod.trained_guard`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from conceptedit.api.method import EditMethod
from conceptedit.api.params import TrainingConfig
from conceptedit.engine.context import EditContext, RunContext
from conceptedit.engine.guards import GUARDS_DIR, guard_file_name, write_guard
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
    """What a training loop did: ``trained`` names the base parameters it changed, ``added`` the
    parameters of modules methods added, ``guards`` the files their trained guards went to."""

    steps: int
    resumed_from: int
    trained: list[str]
    last_losses: dict[str, float]
    log: Path
    added: list[str] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)


def train(
    members: list[Member], config: TrainingConfig, run: RunContext, label: str, resume: bool = False
) -> TrainingReport:
    """Train ``members`` together for ``config.steps`` steps on the sum of their weighted losses.

    Modules the methods add are attached for the whole loop (and taken off after it, also on
    failure); the guards the methods make of them are written once the last step is done.
    """
    with ExitStack() as stack:
        added = _added_parameters(members, run, stack)
        report = _train_loop(members, config, run, label, resume, added)
        report.guards = _write_trained_guards(members, run)
    return report


def _added_parameters(members: list[Member], run: RunContext, stack: ExitStack) -> list[dict[str, nn.Parameter]]:
    """Enter each member's ``added_modules`` context; per member, its modules' parameters by name."""
    added: list[dict[str, nn.Parameter]] = []
    for k, member in enumerate(members):
        mine: dict[str, nn.Parameter] = {}
        for key, module in stack.enter_context(member.method.added_modules(member.ctx)).items():
            if not isinstance(module, nn.Module):
                raise TrainingError(f"{member.ctx.label}: added module {key!r} is a {type(module).__name__}")
            mine |= {f"added.{k}.{key}.{path}": param for path, param in module.named_parameters()}
        added.append(mine)
    if any(added) and run.process_index is not None:
        raise TrainingError(
            "modules added by a method train outside the data-parallel wrapper, so their gradients "
            "would not be averaged across processes; run this recipe in one process"
        )
    return added


def _write_trained_guards(members: list[Member], run: RunContext) -> list[str]:
    """Each member's ``trained_guard``, saved as an inference guard is (run folder, ``guards/``)."""
    files = []
    for k, member in enumerate(members):
        guard = member.method.trained_guard(member.ctx)
        if guard is None:
            continue
        label = member.ctx.label if len(members) == 1 else f"{member.ctx.label}-{k}"  # group members share an index
        name = guard_file_name(member.ctx.index, label)
        write_guard(run.run_dir / GUARDS_DIR / name, method=member.method.name, label=member.ctx.label, guard=guard)
        files.append(f"{GUARDS_DIR}/{name}")
    return files


# Split into pieces, the loop's order (set-up, each step, checkpoints, tear-down) would be read across
# five functions; long on purpose, so it reads top to bottom as nanoGPT's does.
def _train_loop(
    members: list[Member],
    config: TrainingConfig,
    run: RunContext,
    label: str,
    resume: bool,
    added: list[dict[str, nn.Parameter]],
) -> TrainingReport:
    adapter = run.adapter
    params: dict[str, nn.Parameter] = {}
    for member, extra in zip(members, added, strict=True):
        names = list(member.method.trainable_parameters(member.ctx))
        if not names and not extra:
            raise TrainingError(f"{member.ctx.label}: the method declares no trainable parameters and adds no modules")
        for name in names:
            params[name] = adapter.get_parameter(name)
    base = sorted(params)  # the pipeline's own tensors: recorded by the ledger, saved in edit.safetensors
    run.ledger.touch(base)
    map_large_allocations()
    for member in members:
        member.method.prepare_training(member.ctx)
    held = HeldEntries.collect(members, params, run.ledger.edit_start)
    for extra in added:
        params |= extra
    names = sorted(params)
    release_freed_memory()

    checkpoint_root = run.run_dir / "checkpoints" / _slug(label)
    log_path = run.run_dir / "logs" / f"{_slug(label)}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    components = sorted({name.split(".", 1)[0] for name in base})

    idle = {}
    if config.park_idle_modules:
        pipeline_modules = getattr(run.pipeline, "components", {})
        # The denoiser runs every step even when only the text encoder trains (AdvUnlearn): never idle.
        running = {*components, adapter.denoiser_name}
        idle = {k: m for k, m in pipeline_modules.items() if isinstance(m, nn.Module) and k not in running}
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
                    trained = [params[n] for n in names]
                    last = _step(members, config, accelerator, optimizer, trained, step, label, held)
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
            # The optimiser's state and the gradients go before the parked modules come back, so that
            # un-parking them does not add to the training's peak (measured: 0.9 GiB at SD-1.4 size).
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
            accelerator.free_memory()
            release_freed_memory()
    return TrainingReport(config.steps, start, base, last, log_path, added=sorted(set(names) - set(base)))


def _step(
    members: list[Member],
    config: TrainingConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    step: int,
    label: str,
    held: HeldEntries | None = None,
) -> dict[str, float]:
    totals: dict[str, float] = {}
    total = 0.0
    grouped = len(members) > 1
    run = members[0].ctx.run
    for _ in range(config.grad_accum):
        loss: Tensor | None = None
        for member in members:
            # Terms a method computed with ctx.separable_loss are back-propagated as they are made.
            run.backward = lambda share, w=member.weight: accelerator.backward(w * share / config.grad_accum)
            run.applied_terms.clear()
            try:
                with accelerator.autocast():
                    terms = member.method.trajectory_loss(member.ctx, step)
            finally:
                run.backward = None
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
                total += member.weight * number / config.grad_accum
                if id(value) in run.applied_terms:
                    continue
                contribution = member.weight * value
                loss = contribution if loss is None else loss + contribution
        if loss is not None:
            accelerator.backward(loss / config.grad_accum)
    if held is not None:
        held.zero_gradients()
    if config.max_grad_norm is not None:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    if held is not None:
        held.restore()
    totals["total"] = total
    return totals


@dataclass
class HeldEntries:
    """Entries of trained parameters that methods' gradient masks keep at their edit-start values.

    ``held[name]`` is True where no method lets the entry train (the AND of the masks, inverted);
    ``start[name]`` is the parameter at the start of the edit (the ledger's copy).
    """

    params: dict[str, nn.Parameter]
    held: dict[str, Tensor]
    start: dict[str, Tensor]

    @classmethod
    def collect(
        cls, members: list[Member], params: dict[str, nn.Parameter], start: dict[str, Tensor]
    ) -> HeldEntries | None:
        """The members' :meth:`~conceptedit.EditMethod.gradient_masks`, checked; None when none gives one."""
        held: dict[str, Tensor] = {}
        for member in members:
            for name, mask in member.method.gradient_masks(member.ctx).items():
                if name not in params:
                    raise TrainingError(f"{member.ctx.label}: gradient mask for {name}, which it does not train")
                param = params[name]
                if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != param.shape:
                    raise TrainingError(
                        f"{member.ctx.label}: the gradient mask of {name} must be a bool tensor of shape "
                        f"{tuple(param.shape)}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                        f"{tuple(getattr(mask, 'shape', ()))}"
                    )
                frozen = ~mask.to(param.device)
                held[name] = held[name] | frozen if name in held else frozen
        held = {name: frozen for name, frozen in held.items() if bool(frozen.any())}
        return cls(params, held, {n: start[n] for n in held}) if held else None

    def zero_gradients(self) -> None:
        """Zero the held entries' gradients (before clipping and the step)."""
        for name, frozen in self.held.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.masked_fill_(frozen, 0)

    def restore(self) -> None:
        """Put the held entries back to their edit-start values (after the step: weight decay moved them)."""
        with torch.no_grad():
            for name, frozen in self.held.items():
                param = self.params[name]
                param.copy_(torch.where(frozen, self.start[name], param))


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
