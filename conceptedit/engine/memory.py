"""Memory: measuring a block's peak (resident set on CPU, allocator peak on CUDA) and keeping it low
(returning freed heap to the system, parking weights a phase does not use)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

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


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def map_large_allocations(threshold: int = 128 * 1024) -> None:
    """Serve heap blocks of ``threshold`` bytes and more by ``mmap``, so freeing one returns it.

    glibc starts at this threshold but raises it to 32 MiB as large blocks are freed; from then
    on every activation of a training step comes from the heap, which keeps the pages after the
    step (measured: 0.5 GiB per SD-1.4 forward pass that never returns). Fixing the threshold
    keeps resident memory at what tensors use, for a few percent more page faults.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)


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


class ParkedModules:
    """Weights of modules a phase does not run, written to a temporary safetensors file and freed.

    A training loop over the UNet never calls the text encoder or the VAE (prompts were encoded
    before it), yet on SD-1.4 they hold 0.8 GB. Parking gives that memory back for the loop; the
    weights come back bit for bit on exit, or earlier through :meth:`restore` when something
    asks for a parked module after all.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self._folder: Path | None = None
        self._slots: dict[str, tuple[nn.Module, str, str]] = {}

    def __enter__(self) -> ParkedModules:
        if not self.modules:
            return self
        tensors: dict[str, torch.Tensor] = {}
        first_key: dict[int, str] = {}  # a tensor shared by two modules is saved once
        for prefix, module in self.modules.items():
            for sub_name, sub in module.named_modules():
                for attr, tensor in [*sub._parameters.items(), *sub._buffers.items()]:
                    if tensor is None:
                        continue
                    key = first_key.setdefault(id(tensor), ".".join(x for x in (prefix, sub_name, attr) if x))
                    self._slots[f"{prefix}/{sub_name}/{attr}"] = (sub, attr, key)
                    tensors[key] = tensor.detach().contiguous()
        self._folder = Path(tempfile.mkdtemp(prefix="conceptedit-parked-"))
        save_file(tensors, str(self._folder / "weights.safetensors"))
        del tensors
        for sub, attr, _ in self._slots.values():
            tensor = getattr(sub, attr)
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        release_freed_memory()
        return self

    @property
    def parked(self) -> bool:
        return self._folder is not None

    def restore(self) -> None:
        """Put every parked tensor back (a no-op when nothing is parked)."""
        if self._folder is None:
            return
        # Each tensor is read with plain file reads straight into a fresh buffer. A memory-mapped load
        # keeps the file's pages mapped, and so resident, until the file closes: at SD-1.4 size the
        # text encoder and VAE were then in memory twice, 0.8 GiB above the training's peak. A fresh
        # buffer is also aligned: safetensors' own tensors may sit at any byte offset, and CPU kernels
        # on unaligned weights round differently in the last bit (measured on SDXL's text encoder 2).
        copies: dict[str, torch.Tensor] = {}
        with open(self._folder / "weights.safetensors", "rb") as fh:
            header, start = _safetensors_header(fh)
            for sub, attr, key in self._slots.values():
                target = getattr(sub, attr)
                if key not in copies:  # a tensor shared by two modules is read once
                    copies[key] = _read_tensor(fh, header[key], start).to(target.device)
                target.data = copies[key]
        shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(fh: io.BufferedIOBase) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, byte range) and where its data starts."""
    (size,) = struct.unpack("<Q", fh.read(8))
    return json.loads(fh.read(size)), 8 + size


def _read_tensor(fh: io.BufferedIOBase, info: dict[str, Any], start: int) -> torch.Tensor:
    """One tensor of a safetensors file, read into a new CPU tensor (no memory map)."""
    out = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    raw = out.reshape(-1).view(torch.uint8).numpy()
    if raw.nbytes != end - begin:
        raise OSError(f"parked tensor is {end - begin} bytes on disk, {raw.nbytes} expected")
    fh.seek(start + begin)
    if fh.readinto(raw.data) != raw.nbytes:
        raise OSError("parked weights file is truncated")
    return out
