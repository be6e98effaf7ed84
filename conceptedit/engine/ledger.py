"""Which parameters a run changed, and what they were before.

The ledger keeps a copy (on the parameter's device) of each parameter the first time an edit is about to change it,
and a copy of its value at the start of each edit. That is all a run needs to save only the
changed tensors, and all a training method needs to run its frozen references by swapping a
few tensors into the one resident model instead of keeping extra model copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from conceptedit.api.backbone import BackboneAdapter


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (stable across processes and runs)."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class WeightLedger:
    """Original values of every parameter touched so far, and each edit's starting values."""

    def __init__(self, adapter: BackboneAdapter) -> None:
        self.adapter = adapter
        self.base: dict[str, Tensor] = {}
        self.edit_start: dict[str, Tensor] = {}

    def begin_edit(self) -> None:
        """Forget the previous edit's starting values."""
        self.edit_start = {}

    def touch(self, names: Iterable[str]) -> None:
        """Record base and edit-start copies of ``names`` before they change."""
        for name in names:
            param = self.adapter.get_parameter(name)
            first_time = name not in self.base
            if first_time:
                self.base[name] = param.detach().clone()
            if name not in self.edit_start:
                # Untouched until now, the parameter still holds its base value: share that copy.
                self.edit_start[name] = self.base[name] if first_time else param.detach().clone()

    def set(self, name: str, value: Tensor) -> None:
        """Write ``value`` into a parameter, recording its old value first."""
        self.touch([name])
        param = self.adapter.get_parameter(name)
        if value.shape != param.shape:
            raise ValueError(f"{name}: new value has shape {tuple(value.shape)}, parameter {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))

    def changed(self) -> dict[str, Tensor]:
        """Current values of the parameters that differ from base (bit for bit)."""
        out = {}
        for name, original in self.base.items():
            current = self.adapter.get_parameter(name).detach()
            if not torch.equal(current, original):
                out[name] = current.to("cpu", copy=True)
        return out

    def edit_start_digest(self) -> str:
        """sha256 over every parameter whose value at this edit's start differs from the base model.

        The model at an edit's start is the base model plus what earlier edits changed; those are
        exactly the recorded parameters whose edit-start (or, untouched by this edit, current)
        value is not the base value. Empty when no earlier edit changed anything.
        """
        digest = hashlib.sha256()
        for name in sorted(self.base):
            value = self.edit_start.get(name)
            if value is None:
                value = self.adapter.get_parameter(name).detach()
            if not torch.equal(value, self.base[name]):
                digest.update(f"{name}={tensor_digest(value)};".encode())
        return digest.hexdigest()

    def base_digests(self, names: Iterable[str]) -> dict[str, str]:
        return {name: tensor_digest(self.base[name]) for name in names}

    @contextmanager
    def reference(self, which: str, names: Iterable[str] | None = None) -> Iterator[None]:
        """Temporarily put ``base`` (run start) or ``edit_start`` values into the model.

        Swaps tensor storage pointers, so it costs no copies beyond the recorded values; use it
        under ``torch.no_grad()`` for frozen reference passes.
        """
        values = {"base": self.base, "edit_start": self.edit_start}.get(which)
        if values is None:
            raise ValueError(f"unknown reference {which!r}; use 'base' or 'edit_start'")
        chosen = list(values) if names is None else [n for n in names if n in values]
        saved: dict[str, Tensor] = {}
        try:
            for name in chosen:
                param = self.adapter.get_parameter(name)
                saved[name] = param.data
                param.data = values[name]
            yield
        finally:
            for name, data in saved.items():
                self.adapter.get_parameter(name).data = data
