"""Measuring peak memory of a block of work (resident set on CPU, allocator peak on CUDA)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
import threading
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_freed_memory() -> None:
    """Hand memory freed by tensors back to the operating system (glibc keeps it otherwise).

    After a phase that allocated and freed a lot (text encoding, trajectory sampling), the C heap
    can hold gigabytes that no tensor uses; trimming it keeps the next phase's peak honest.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # not glibc (musl, ...): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the lifetime peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager sampling RSS every ``interval`` seconds; CUDA peak from torch.

    Attributes after exit:
        peak_rss_bytes: Highest resident set size seen inside the block.
        peak_cuda_bytes: ``torch.cuda.max_memory_allocated`` inside the block, or None.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_rss_bytes = 0
        self.peak_cuda_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_bytes = max(self.peak_rss_bytes, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak_rss_bytes = current_rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_bytes = max(self.peak_rss_bytes, current_rss_bytes())
        if torch.cuda.is_available():
            self.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())
