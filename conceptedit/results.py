"""What a run reports back: per-edit outcomes and the run as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conceptedit.evaluation import SuiteResult


@dataclass
class EditOutcome:
    """One edit (or training group) after it ran.

    Attributes:
        label: The edit's name.
        method: Method name (``group`` for a training group).
        changed: Parameter names the edit wrote.
        seconds: Wall time.
        peak_rss_bytes: Highest resident memory of the process during the edit.
        peak_cuda_bytes: CUDA allocator peak during the edit, if on a GPU.
        details: Method- or loop-specific figures (training steps, last losses...).
    """

    label: str
    method: str
    changed: list[str]
    seconds: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "changed": len(self.changed),
            "seconds": round(self.seconds, 4),
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "details": self.details,
        }


@dataclass
class RunResult:
    """A finished (or dry) run.

    Attributes:
        run_dir: The run folder (None for a dry run).
        pipeline: The edited pipeline, still in memory.
        outcomes: One entry per recipe edit, in order.
        changed: Names of every parameter that differs from the base model.
        manifest: The manifest written to ``run_dir/manifest.json``.
        evaluation: The recipe's ``evaluate`` suites, scored (also in ``run_dir/metrics.json``).
    """

    run_dir: Path | None
    pipeline: Any
    outcomes: list[EditOutcome]
    changed: list[str]
    manifest: dict[str, Any]
    evaluation: list[SuiteResult] = field(default_factory=list)
