"""LoRA exports of a run: the ``lora`` (diffusers/PEFT) and ``kohya`` (A1111, ComfyUI) formats.

Both write each changed weight matrix's difference from the base as a low-rank product::

    ΔW = W_edited − W_base  ≈  up @ down        up: (out, r)   down: (r, in)

A convolution kernel (out, in, kh, kw) is factored as the matrix (out, in·kh·kw), and its factors
are stored as LoRA convolutions store them: ``down`` as an (r, in, kh, kw) kernel, ``up`` as a
1×1 (out, r, 1, 1) kernel.

Rank. The factors come from the SVD of ΔW, taken in float64 and split evenly (``up = U·√S``,
``down = √S·Vᵀ``, so neither factor holds all the scale). The rank of each matrix is chosen by
one of two options:

* ``rank: r``: r, or the change's own rank when that is smaller. The own rank is counted down to
  the rounding of the weights: the smallest k past which the dropped part of ΔW is no larger than
  ε·‖W_edited‖_F (ε: the weights' rounding unit, 1.2e-7 for float32), i.e. no larger than what
  storing the edited weights in their own type already changes. A UCE edit of n prompts has rank
  about n, however large the matrix. At or above it the factors reproduce the edit exactly, up to
  that rounding and the float32 rounding of the factors themselves.
* ``max_error: e`` (default 1e-3): the smallest rank whose relative reconstruction error
  ``‖ΔW − up·down‖_F / ‖ΔW‖_F`` is at most e (capped at the own rank, so ``max_error: 0`` gives
  the exact factors). The error is relative to the *change* ΔW, not to the weight: 1e-3 keeps
  all but 0.1% of the edit in every matrix. The report also gives each matrix's error relative to
  ``‖W_edited‖_F``, the error a user of the weights sees, which is smaller by ‖ΔW‖/‖W_edited‖.

Every error reported is measured on the factors as stored (float32), in float64 arithmetic; it
can therefore sit slightly above the SVD's own figure (by about 1e-7 of the change).

What a LoRA cannot carry. A LoRA file holds low-rank updates of linear and convolution weights
of the UNet and the text encoder, nothing else: a changed bias, norm, embedding or other 1-D
tensor, or a change to another component, is left out, and the report's notes name them (the
``delta``, ``diffusers`` and ``single-file`` formats carry every tensor). A run that changed none
of the tensors a LoRA can hold cannot be exported this way at all. Inference-time guards are
code, not weights: :func:`conceptedit.export` copies their files beside the LoRA and says so.

Layouts.

* ``lora``: ``pytorch_lora_weights.safetensors``, the file ``pipe.load_lora_weights(folder)``
  looks for, with diffusers' PEFT keys ``unet.<module>.lora_A.weight`` (down) and
  ``.lora_B.weight`` (up), ``text_encoder.text_model.<module>...`` for the text encoder. Its
  ``lora_adapter_metadata`` header gives each component's LoRA config explicitly: every module's
  alpha equals its rank, so every module's scale alpha/r is 1 whatever the ranks.
* ``kohya``: one ``<run name>.safetensors`` with kohya-ss's keys
  ``lora_unet_<module path, "." → "_">.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
  (``lora_te_text_model_...`` for the text encoder). Loaders scale each module by alpha/rank;
  one alpha is written for all modules (the most common rank) and a module of another rank has
  its factors multiplied by √(rank/alpha) each, so its product is still exactly ΔW. One shared
  alpha on purpose: diffusers (0.42) misreads per-module alphas of attention and text-encoder
  modules in kohya files.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from safetensors.torch import save
from torch import Tensor, nn

from conceptedit.api.export import Exporter, ExportOptions, ExportReport, ExportSource
from conceptedit.errors import ExportError
from conceptedit.io.atomic import atomic_write_bytes
from conceptedit.io.edit_file import canonical_safetensors

#: What ``pipe.load_lora_weights(folder)`` loads from a folder (diffusers' own file name).
LORA_FILE = "pytorch_lora_weights.safetensors"
#: The components a Stable Diffusion LoRA reaches, and their kohya key prefixes.
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
DEFAULT_MAX_ERROR = 1e-3
#: The factors' storage type: float32 rounding (~6e-8 relative) bounds how exact a factor can be.
FACTOR_DTYPE = torch.float32
ERROR_DEFINITION = (
    "relative_error = ‖ΔW − up·down‖_F / ‖ΔW‖_F with ΔW = W_edited − W_base (the share of the change lost); "
    "relative_to_weight = ‖ΔW − up·down‖_F / ‖W_edited‖_F (the error in the weight itself); both measured "
    "on the stored float32 factors in float64"
)
_TINY = torch.finfo(torch.float64).tiny
_LISTED = 8  # left-out tensors named in a note; the rest are counted (all are in details)


class LoraOptions(ExportOptions):
    """How the rank of each matrix is chosen: ``rank`` or ``max_error``, not both (default ``max_error: 1e-3``)."""

    rank: int | None = Field(
        default=None, ge=1, description="the rank of every factor (less where a change has lower rank)"
    )
    max_error: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="per matrix, the smallest rank whose error ‖ΔW − up·down‖/‖ΔW‖ is at most this",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> LoraOptions:
        if self.rank is not None and self.max_error is not None:
            raise ValueError("give either rank or max_error, not both")
        if self.rank is None and self.max_error is None:
            self.max_error = DEFAULT_MAX_ERROR
        return self


# --------------------------------------------------------------------------- factorisation


@dataclass
class LowRank:
    """ΔW ≈ up @ down (matrix shapes: up (out, r), down (r, in·kh·kw)), the factors as stored.

    Attributes:
        up: (out, r), float32.
        down: (r, in·kh·kw), float32.
        rank: r.
        delta_rank: The rank of ΔW down to the edited weights' rounding (:func:`numerical_rank`).
        relative_error: ‖ΔW − up·down‖_F / ‖ΔW‖_F.
        relative_to_weight: ‖ΔW − up·down‖_F / ‖W_edited‖_F.
    """

    up: Tensor
    down: Tensor
    rank: int
    delta_rank: int
    relative_error: float
    relative_to_weight: float


def tail_norms(singular: Tensor) -> Tensor:
    """``tails[k]``: ‖ΔW − ΔW_k‖_F, ΔW_k the best rank-k approximation (the singular values past k),
    for k = 0 … len(singular)."""
    energy = singular.double().pow(2)
    return torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)]).sqrt()


def tail_errors(singular: Tensor) -> Tensor:
    """``errors[k]``: ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F, the relative error of the best rank-k factors."""
    tails = tail_norms(singular)
    return tails / tails[0].clamp_min(_TINY)


def numerical_rank(singular: Tensor, weight_norm: float, eps: float) -> int:
    """The rank of a change as far as its weights can tell: the smallest k whose dropped part
    ‖ΔW − ΔW_k‖_F is at most ``eps · weight_norm`` (``eps``: the weights' own rounding unit, float32:
    1.2e-7; ``weight_norm``: ‖W_edited‖_F). Past it, what is left is as small as rounding the edited
    weights to their type already makes it. At least 1 for a change that is not zero."""
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return 0
    within = (tail_norms(singular) <= eps * weight_norm).nonzero()
    return max(int(within[0]), 1)


def choose_rank(singular: Tensor, own: int, *, rank: int | None, max_error: float | None) -> int:
    """The rank of one matrix's factors: ``rank`` capped at the change's own rank ``own``
    (:func:`numerical_rank`), or the smallest rank whose relative error (:func:`tail_errors`) is at
    most ``max_error`` (never more than ``own``: ``max_error: 0`` gives ``own``)."""
    if rank is not None:
        return min(rank, own)
    if max_error is None:
        raise ValueError("choose_rank needs rank or max_error")
    meets = (tail_errors(singular)[1 : own + 1] <= max_error).nonzero()
    return min(int(meets[0]) + 1, own) if meets.numel() else own


def rounding_unit(dtype: torch.dtype) -> float:
    """The relative rounding of a tensor type (float32: 1.2e-7; never below float64's)."""
    return max(torch.finfo(dtype).eps if dtype.is_floating_point else 0.0, torch.finfo(torch.float64).eps)


def factorise(edited: Tensor, base: Tensor, *, rank: int | None, max_error: float | None) -> LowRank:
    """ΔW = edited − base (a conv kernel flattened to (out, in·kh·kw)) as balanced low-rank factors."""
    w_edited = edited.detach().to("cpu", torch.float64).reshape(edited.shape[0], -1)
    delta = w_edited - base.detach().to("cpu", torch.float64).reshape(base.shape[0], -1)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    own = numerical_rank(s, float(w_edited.norm()), rounding_unit(edited.dtype))
    k = choose_rank(s, own, rank=rank, max_error=max_error)
    root = s[:k].sqrt()
    up = (u[:, :k] * root).to(FACTOR_DTYPE).contiguous()
    down = (root[:, None] * vh[:k]).to(FACTOR_DTYPE).contiguous()
    residual = (delta - up.double() @ down.double()).norm()
    return LowRank(
        up=up,
        down=down,
        rank=k,
        delta_rank=own,
        relative_error=float(residual / delta.norm().clamp_min(_TINY)),
        relative_to_weight=float(residual / w_edited.norm().clamp_min(_TINY)),
    )


# --------------------------------------------------------------------------- what a LoRA can hold


def _module(pipeline: Any, name: str) -> nn.Module | None:
    component, _, path = name.partition(".")
    model = getattr(pipeline, component, None)
    if component not in KOHYA_PREFIX or not isinstance(model, nn.Module) or not path.endswith(".weight"):
        return None
    try:
        return model.get_submodule(path.removesuffix(".weight"))
    except AttributeError:
        return None


def lora_holds(pipeline: Any, name: str) -> bool:
    """Whether a LoRA can carry a change of tensor ``name``: the weight of a linear layer or of an
    ungrouped 2-D convolution, in the UNet or the text encoder."""
    module = _module(pipeline, name)
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def split_changes(source: ExportSource) -> tuple[list[str], list[str]]:
    """(the changed tensors a LoRA carries, the changed tensors it leaves out), by name."""
    carried: list[str] = []
    left_out: list[str] = []
    for name in sorted(source.edited):
        if torch.equal(source.edited[name].cpu(), source.base[name].cpu()):
            continue  # unchanged after all: nothing to carry
        (carried if lora_holds(source.pipeline, name) else left_out).append(name)
    return carried, left_out


def _listed(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def _available(source: ExportSource) -> str | None:
    carried, left_out = split_changes(source)
    if carried:
        return None
    what = f"it changed only {_listed(left_out)}" if left_out else "it changed no weight"
    return (
        "a LoRA holds changes to the linear and convolution weights of the UNet and text encoder, and "
        f"{what}; use the delta or diffusers format (or single-file, on SD-1.x)"
    )


def lora_module_path(name: str) -> tuple[str, str]:
    """(component, module path as LoRA files name it) of a weight's edit-file name.

    Text-encoder paths get CLIP's ``text_model.`` prefix when the installed transformers flattened
    it away (5.x): LoRA files and their loaders use the prefixed names, and diffusers drops the
    prefix again when the text encoder it loads into has none.
    """
    component, _, path = name.removesuffix(".weight").partition(".")
    if component == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path
    return component, path


# --------------------------------------------------------------------------- writing


@dataclass
class Factored:
    """Every carried matrix's factors, with the figures the report gives."""

    factors: dict[str, LowRank]
    shapes: dict[str, tuple[int, ...]]
    left_out: list[str]
    details: dict[str, Any]


def factor_source(source: ExportSource) -> Factored:
    """Factor each changed matrix a LoRA holds, under the options' rank rule."""
    options = source.options
    if not isinstance(options, LoraOptions):
        options = LoraOptions.model_validate(options.model_dump())
    carried, left_out = split_changes(source)
    factors = {
        name: factorise(source.edited[name], source.base[name], rank=options.rank, max_error=options.max_error)
        for name in carried
    }
    shapes = {name: tuple(source.edited[name].shape) for name in carried}
    details = _figures(factors, shapes, options)
    details["left_out"] = {name: _relative_change(source, name) for name in left_out}
    return Factored(factors, shapes, left_out, details)


def _figures(factors: dict[str, LowRank], shapes: dict[str, tuple[int, ...]], options: LoraOptions) -> dict[str, Any]:
    rule = {"rank": options.rank} if options.rank is not None else {"max_error": options.max_error}
    ranks = [f.rank for f in factors.values()]
    return {
        "rank_rule": rule,
        "error_definition": ERROR_DEFINITION,
        "matrices": {
            name: {
                "shape": list(shapes[name]),
                "rank": f.rank,
                "delta_rank": f.delta_rank,
                "relative_error": f.relative_error,
                "relative_to_weight": f.relative_to_weight,
            }
            for name, f in factors.items()
        },
        "ranks": {"min": min(ranks, default=0), "max": max(ranks, default=0)},
        "max_relative_error": max((f.relative_error for f in factors.values()), default=0.0),
        "max_relative_to_weight": max((f.relative_to_weight for f in factors.values()), default=0.0),
        "stored_values": sum(f.up.numel() + f.down.numel() for f in factors.values()),
        "replaced_values": sum(math.prod(shape) for shape in shapes.values()),
    }


def _relative_change(source: ExportSource, name: str) -> float:
    edited, base = source.edited[name].double(), source.base[name].double()
    return float((edited - base).norm() / edited.norm().clamp_min(_TINY))


def _kernels(low: LowRank, shape: tuple[int, ...], scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(down, up) shaped as the layer's LoRA stores them: a conv's down keeps the kernel, its up is 1×1."""
    rank = low.rank
    down = low.down.reshape(rank, *shape[1:]) if len(shape) > 2 else low.down
    up = low.up.reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    if scale != 1.0:
        down, up = down * scale, up * scale
    return down.contiguous(), up.contiguous()


def _notes(factored: Factored, fmt: str) -> list[str]:
    """What the file leaves out and how much of the change it lost (guards: the orchestrator says)."""
    notes = []
    left_out = factored.left_out
    if left_out:
        notes.append(
            f"Left out of the {fmt} file: {len(left_out)} changed tensor(s) a LoRA cannot hold (biases, norms, "
            "embeddings, other 1-D tensors, components other than the UNet and text encoder): "
            f"{_listed(left_out)}. A model loaded with this LoRA keeps their base values; the delta, diffusers and "
            "single-file formats carry them."
        )
    worst = factored.details["max_relative_error"]
    low, high = factored.details["ranks"]["min"], factored.details["ranks"]["max"]
    ranks = f"rank {low}" if low == high else f"ranks {low}–{high}"
    notes.append(
        f"{len(factored.factors)} weight matrices as low-rank factors ({ranks}); the largest part of a change lost "
        f"to the rank limit is {worst:.3g} of that change (‖ΔW − up·down‖/‖ΔW‖). Load it at strength 1: other "
        "strengths scale the edit."
    )
    return notes


def _report(factored: Factored, fmt: str, file: str, usage: str) -> ExportReport:
    return ExportReport(
        files=[file],
        notes=_notes(factored, fmt),
        details={"usage": usage, **factored.details},
    )


def _write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    ordered = {key: tensors[key] for key in sorted(tensors)}
    atomic_write_bytes(path, canonical_safetensors(save(ordered, metadata=metadata)))


def _base_line(source: ExportSource) -> str:
    model = str(source.base_model.get("id", "BASE"))
    if model.startswith("builtin:"):
        return f'import conceptedit\n\npipe = conceptedit.load_model("{model}").pipeline  # the base model\n'
    return (
        "from diffusers import StableDiffusionPipeline\n\n"
        f'pipe = StableDiffusionPipeline.from_pretrained("{model}")  # the base model the edit was made from\n'
    )


# --------------------------------------------------------------------------- lora (diffusers/PEFT)


def peft_config(paths: dict[str, int]) -> dict[str, Any]:
    """One component's LoRA config for diffusers' ``lora_adapter_metadata``: every module's alpha is
    its rank (scale 1). ``paths``: module path (as PEFT matches it, a suffix of the full name) → rank."""
    common = Counter(paths.values()).most_common(1)[0][0]
    other = {path: rank for path, rank in paths.items() if rank != common}
    return {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "target_modules": sorted(paths),
    }


def _export_lora(source: ExportSource, folder: Path) -> ExportReport:
    factored = factor_source(source)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for name, low in factored.factors.items():
        component, path = lora_module_path(name)
        down, up = _kernels(low, factored.shapes[name])
        tensors[f"{component}.{path}.lora_A.weight"] = down
        tensors[f"{component}.{path}.lora_B.weight"] = up
        # PEFT matches config names as suffixes: without text_model. they fit either CLIP layout
        ranks.setdefault(component, {})[path.removeprefix("text_model.")] = low.rank
    metadata = {f"{component}.{key}": value for component, r in ranks.items() for key, value in peft_config(r).items()}
    _write(folder / LORA_FILE, tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)})
    usage = _base_line(source) + 'pipe.load_lora_weights("path/to/this/export")\npipe.fuse_lora()  # optional\n'
    return _report(factored, "lora", LORA_FILE, usage)


def load_lora(pipeline: Any, path: Path, **kwargs: Any) -> None:
    """``pipeline.load_lora_weights(path)``, without diffusers' warning that a LoRA holding no
    text-encoder layers has none (true of every UNet-only edit, and alarming in an export's output)."""
    try:
        import peft  # noqa: F401  (diffusers' LoRA loader needs it)
    except ImportError as exc:
        raise ExportError("loading a LoRA with diffusers needs the peft package: pip install peft") from exc
    quiet = logging.getLogger("diffusers.loaders.lora_base")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        pipeline.load_lora_weights(str(path), **kwargs)
    finally:
        quiet.setLevel(level)


def fused(pipeline: Any) -> Any:
    """The loaded LoRA baked into the weights and its PEFT wrappers removed: plain modules under
    their own names again, holding base + up·down."""
    pipeline.fuse_lora(components=[c for c in KOHYA_PREFIX if getattr(pipeline, c, None) is not None])
    pipeline.unload_lora_weights()
    return pipeline


def _reload_lora(base: Any, folder: Path) -> Any:
    load_lora(base, folder, weight_name=LORA_FILE)
    return fused(base)


# --------------------------------------------------------------------------- kohya (A1111, ComfyUI)


def kohya_key(name: str) -> str:
    """kohya-ss's module key of a weight's edit-file name:
    ``unet.down_blocks.0.attentions.0.proj_in.weight`` → ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    component, path = lora_module_path(name)
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def kohya_file(source: ExportSource) -> str:
    """``<run name>.safetensors`` (A1111 and ComfyUI list a LoRA by its file name)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.run_dir.name).strip("._") or "conceptedit"
    return f"{stem}.safetensors"


def _export_kohya(source: ExportSource, folder: Path) -> ExportReport:
    factored = factor_source(source)
    ranks = [low.rank for low in factored.factors.values()]
    alpha = Counter(ranks).most_common(1)[0][0]
    tensors: dict[str, Tensor] = {}
    for name, low in factored.factors.items():
        key = kohya_key(name)
        # loaders scale up·down by alpha/rank: fold rank/alpha back in, half into each factor
        down, up = _kernels(low, factored.shapes[name], math.sqrt(low.rank / alpha))
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=FACTOR_DTYPE)
    file = kohya_file(source)
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(alpha) if len(set(ranks)) == 1 else "Dynamic",
        "ss_network_alpha": str(alpha),
        "ss_output_name": file.removesuffix(".safetensors"),
    }
    _write(folder / file, tensors, metadata)
    factored.details["alpha"] = alpha
    stem = file.removesuffix(".safetensors")
    usage = (
        f"# A1111 / Forge: copy {file} into models/Lora and add <lora:{stem}:1> to the prompt.\n"
        "# ComfyUI: copy it into models/loras; LoraLoader with strength 1 for model and clip.\n"
        + _base_line(source)
        + f'pipe.load_lora_weights("path/to/this/export/{file}")\n'
    )
    return _report(factored, "kohya", file, usage)


def _reload_kohya(base: Any, folder: Path) -> Any:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ExportError(f"{folder}: expected one kohya .safetensors file, found {[f.name for f in files]}")
    load_lora(base, files[0])
    return fused(base)


LORA = Exporter(
    "lora",
    f"{LORA_FILE}: the edit as a diffusers/PEFT LoRA (pipe.load_lora_weights(folder)); options rank or max_error",
    _export_lora,
    Options=LoraOptions,
    available=_available,
    reload=_reload_lora,
)
KOHYA = Exporter(
    "kohya",
    "<run>.safetensors: the edit as a kohya-ss LoRA for A1111, Forge and ComfyUI; options rank or max_error",
    _export_kohya,
    Options=LoraOptions,
    available=_available,
    reload=_reload_kohya,
)
