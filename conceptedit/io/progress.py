"""Progress bars (rich) for the engine's long steps, silent when asked to be."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Task:
    """A handle to advance one bar and show extra fields (a loss, say)."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, steps: int = 1, **fields: object) -> None:
        if self._progress is not None and self._id is not None:
            self._progress.update(self._id, advance=steps, **fields)  # type: ignore[arg-type]


class Reporter:
    """Creates progress bars on stderr; ``quiet`` turns every bar into a no-op."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        """A bar for ``total`` steps (``None``: unknown length) shown while the block runs."""
        if self.quiet:
            yield Task(None, None)
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total, info="")
            yield Task(progress, task_id)
