"""Inference-time edits ("guards"): what the run saves for them and how they are put back.

An inference-time method (SLD, AdaVD, ...) changes no weights. Its artifact is a
:class:`Guard`: JSON settings plus optional small tensors, written to
``guards/NNN-<label>.safetensors`` in the run folder and listed, in recipe order, under
``guards`` in ``manifest.json``. Installing a guard is the method's own business
(:meth:`EditMethod.install_guard`: attention processors, UNet hooks); the engine only decides
*when*: ``apply`` installs every guard from the files it just wrote once all weight edits have
run -- so guards never change what a later edit trains on -- and :func:`conceptedit.load`
installs them from the same files, so a reloaded pipeline behaves exactly like the one
``apply`` returned.

Guards that depend on the denoising step (warm-up, momentum) read a :class:`DenoisingState`
attached to the pipeline: the engine wraps the pipeline's ``progress_bar`` (every diffusers
pipeline opens one around its denoising loop), which tells them when a generation starts and
whether they run inside one, without replacing the pipeline's ``__call__``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save

from conceptedit.api.edits import Guard
from conceptedit.errors import RunDirError, UnknownMethodError
from conceptedit.io.atomic import atomic_write_bytes
from conceptedit.io.edit_file import canonical_safetensors, read_tagged

if TYPE_CHECKING:
    from conceptedit.api.backbone import BackboneAdapter
    from conceptedit.plugins import PluginHost

GUARDS_DIR = "guards"
GUARD_FORMAT = "conceptedit.guard"
GUARD_FORMAT_VERSION = 1
_STATE_ATTR = "_conceptedit_denoising"


@dataclass
class SavedGuard:
    """A guard as read back from a run folder."""

    method: str
    label: str
    guard: Guard
    digest: str


def guard_file_name(index: int, label: str) -> str:
    """``NNN-label.safetensors``: the edit index first, so a folder listing is in recipe order."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "guard"
    return f"{index:03d}-{safe}.safetensors"


def write_guard(path: Path, *, method: str, label: str, guard: Guard) -> None:
    """Write ``guard`` atomically as a safetensors file whose metadata holds the settings as JSON."""
    try:
        config = json.dumps(guard.config, sort_keys=True)
    except TypeError as exc:
        raise RunDirError(f"method {method!r} returned a guard whose config is not JSON-serialisable: {exc}") from exc
    metadata = {
        "format": GUARD_FORMAT,
        "format_version": str(GUARD_FORMAT_VERSION),
        "method": method,
        "label": label,
        "config": config,
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(guard.tensors.items())}
    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def read_guard(path: Path) -> SavedGuard:
    """A guard file's method, label and contents; :class:`RunDirError` if it is not one."""
    if not path.is_file():
        raise RunDirError(f"guard file {path} is missing; the run folder is incomplete")
    data = path.read_bytes()
    tensors, raw = read_tagged(path, GUARD_FORMAT, GUARD_FORMAT_VERSION, "guard file")
    return SavedGuard(
        method=raw["method"],
        label=raw.get("label", raw["method"]),
        guard=Guard(json.loads(raw["config"]), tensors),
        digest=hashlib.sha256(data).hexdigest(),
    )


# ---------------------------------------------------------------------------- denoising state


@dataclass
class DenoisingState:
    """Where a pipeline's sampling loop is, for guards that work per step.

    Attributes:
        generation: Counts denoising loops started; a guard resets its per-image state
            (step counter, momentum) when this changes.
        depth: Denoising loops currently running (0 outside ``pipeline(...)``).
        suspended: While > 0 every guard passes its input through untouched (the base model
            in before/after comparisons).
        installed: One record per installed guard (method, label, file digest), in order.
    """

    generation: int = 0
    depth: int = 0
    suspended: int = 0
    installed: list[dict[str, str]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Inside a denoising loop."""
        return self.depth > 0

    @property
    def enabled(self) -> bool:
        """Guards should act (not suspended)."""
        return self.suspended == 0


class _DenoisingLoop:
    """The pipeline's progress bar, unchanged, plus bookkeeping on enter/exit (or iteration)."""

    def __init__(self, bar: Any, state: DenoisingState) -> None:
        self._bar = bar
        self._state = state

    def __enter__(self) -> Any:
        self._state.generation += 1
        self._state.depth += 1
        return self._bar.__enter__()

    def __exit__(self, *exc: object) -> Any:
        self._state.depth -= 1
        return self._bar.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        self._state.generation += 1
        self._state.depth += 1
        try:
            yield from self._bar
        finally:
            self._state.depth -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def denoising_state(pipeline: Any) -> DenoisingState:
    """The pipeline's :class:`DenoisingState`, attaching it (and the progress-bar wrapper) once."""
    state = pipeline.__dict__.get(_STATE_ATTR)
    if isinstance(state, DenoisingState):
        return state
    state = DenoisingState()
    original: Callable[..., Any] = pipeline.progress_bar

    def progress_bar(*args: Any, **kwargs: Any) -> _DenoisingLoop:
        return _DenoisingLoop(original(*args, **kwargs), state)

    setattr(pipeline, _STATE_ATTR, state)
    pipeline.progress_bar = progress_bar
    return state


@contextmanager
def suspend_guards(pipeline: Any) -> Iterator[None]:
    """Run the pipeline without its guards (they pass everything through) inside the block."""
    state = denoising_state(pipeline)
    state.suspended += 1
    try:
        yield
    finally:
        state.suspended -= 1


def installed_guards(pipeline: Any) -> list[dict[str, str]]:
    """The guards installed on ``pipeline``, in installation order (empty if none)."""
    state = pipeline.__dict__.get(_STATE_ATTR)
    return list(state.installed) if isinstance(state, DenoisingState) else []


# ---------------------------------------------------------------------------- installing


def saved_guard_files(run_dir: Path) -> list[Path]:
    """Guard files of a (staging) run folder, in recipe order."""
    folder = run_dir / GUARDS_DIR
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def install_guards(
    pipeline: Any,
    run_dir: Path,
    files: Sequence[str],
    *,
    host: PluginHost,
    adapter: BackboneAdapter,
    digests: Sequence[str | None] | None = None,
) -> list[dict[str, str]]:
    """Install the guards ``files`` (relative to ``run_dir``) on ``pipeline``, in order.

    Returns one record per guard (``file``, ``method``, ``label``, ``digest``) for the manifest.
    ``digests`` (from the manifest) must match the files. Refuses a guard file already
    installed on this pipeline: loading a run twice would apply its guidance twice.
    """
    state = denoising_state(pipeline)
    records = []
    expected = list(digests) if digests is not None else [None] * len(files)
    for name, digest in zip(files, expected, strict=True):
        saved = read_guard(run_dir / name)
        if digest is not None and digest != saved.digest:
            raise RunDirError(
                f"{run_dir}: guard {name} is not the file the run wrote (its digest differs from the manifest's); "
                "restore it or run the recipe again"
            )
        if any(r["digest"] == saved.digest for r in state.installed):
            raise RunDirError(
                f"{run_dir}: guard {name} ({saved.method}) is already installed on this pipeline; "
                "load the run into a freshly loaded base model"
            )
        try:
            method_cls = host.method(saved.method)
        except UnknownMethodError as exc:
            raise RunDirError(f"{run_dir}: guard {name} needs edit method {saved.method!r}: {exc}") from exc
        method_cls.install_guard(pipeline, saved.guard, adapter)
        record = {"file": name, "method": saved.method, "label": saved.label, "digest": saved.digest}
        state.installed.append(record)
        records.append(record)
    return records
