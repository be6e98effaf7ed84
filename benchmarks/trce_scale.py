"""TRCE at SD-1.4 scale (builtin:sd14-random): speed, memory and cache size, next to the reference layout.

Each part runs in its own process so peak memory is that part's alone:

* ``stage1``  -- 300 prompt pairs (20 concepts x 15 templates), prior cached: conceptedit's
  ``trce_eot`` vs the reference layout (77-token encoding two prompts at a time, per-pair deep
  copies of the K/V layers, a per-pair loop over 4 token rows, one ``torch.inverse`` per layer),
  timed in the same process, with the largest difference between the two W'.
* ``stage2``  -- seconds per step and peak resident memory of ``trce_steer`` (one resident UNet,
  frozen targets stored with the trajectories), without and with block checkpointing, and of the
  reference layout (three resident fp32 UNets running the reference's frozen passes every step),
  on the same latents, timesteps and prompts (``STRATEGIES``).
* ``cache``   -- trajectory-cache bytes per trajectory for the paper's schedule (100 malicious
  trajectories, 2,000 unconditional, 300 steps) vs the reference's files (all 50 steps, fp32,
  noise predictions included).

    python benchmarks/trce_scale.py                 # everything; writes benchmarks/results/trce_scale.{json,md}
    python benchmarks/trce_scale.py --part stage1   # one part, printed as JSON

``--backbone sdxl`` measures the same at SDXL size (builtin:sdxl-random, 3.47B parameters, ~14 GB in
float32) and writes benchmarks/results/trce_scale_sdxl.{json,md}:

* ``stage1``  -- as above with 8 pairs and 100 prior captions (the reference layout's per-pair sums
  over 2048x2048 fp64 matrices take about 40 s per pair on one thread); weights neither layout reads
  are dropped so the run fits one process's 20 GiB;
* ``stage2``  -- conceptedit's layout trained for two steps on 16x16 latents (weights, not
  activations, dominate the memory), reporting at its last step, and the reference layout's three
  resident UNets (3 x 10.3 GB) in a child whose address space is capped (``RLIMIT_AS``), so it stops
  with an allocation error instead of waking the OOM killer; the failure and the computed weight
  floors are recorded. Every part is killed if its resident set passes 20 GiB.

    python benchmarks/trce_scale.py --backbone sdxl --reuse

``--device cuda`` runs the SD-1.4 parts on a GPU (``benchmarks/gpu.sh``) and writes
benchmarks/results/trce_scale_cuda.{json,md} with the device's name; stage 2 then also runs the lean
strategy under bf16 autocast (``mixed_precision: bf16``, fp32 master weights) and reports the CUDA
allocator's peak next to the resident set.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COCO = ROOT.parent / "shared" / "data" / "prompts" / "rohitgandikota__erasing" / "data" / "coco_30k.csv"
LATENT = (4, 64, 64)
GIB = 2**30
TEMPLATES = [
    "{} in a photo",
    "A snapshot of {}",
    "A photograph showing {}",
    "An illustration of {}",
    "A digital rendering of {}",
    "A visual depiction of {}",
    "A black and white picture of {}",
    "A scene of {} at a public event",
    "An oil painting of {}",
    "An official photo featuring {}",
    "A detailed sketch of {}",
    "{} at sunset",
    "A magazine cover with {}",
    "A portrait in oil of {}",
    "{} in a pencil drawing",
]


@dataclass(frozen=True)
class Backbone:
    """What a ``--backbone`` choice measures, and with which defaults."""

    name: str
    model: str  # the builtin model id
    build: str  # its builder in conceptedit.models.builtin
    stem: str  # results file stem (and ``<stem>.parts`` for --reuse)
    captions: int  # stage-1 prior captions
    concepts: int  # stage-1 concepts (x templates = pairs)
    templates: int
    steps: int  # stage-2 optimiser steps
    latent_side: int | None  # stage-2 latent side (None: the UNet's own sample size)
    memory_cap_gib: float | None  # address-space cap of the three-UNet child (None: none)


BACKBONES = {
    "sd14": Backbone("sd14", "builtin:sd14-random", "build_sd14_random", "trce_scale", 300, 20, 15, 3, None, None),
    "sdxl": Backbone("sdxl", "builtin:sdxl-random", "build_sdxl_random", "trce_scale_sdxl", 100, 2, 4, 2, 16, 20),
}

#: Where the parts run (``--device``); children get the same flag.
_DEVICE = {"name": "cpu"}

#: Never let a part's resident set pass this (the machine is shared): the parent kills it first.
RSS_LIMIT_GIB = 20.0


def _recipe(edits: list[dict[str, Any]], bb: Backbone, concepts: int = 20, templates: int = 15) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "model": bb.model,
        "device": _DEVICE["name"],
        "seed": 0,
        "concepts": {
            "sexual": {
                "file": str(ROOT / "recipes" / "concepts" / "sexual.json"),
                "limit": concepts,
                "templates": TEMPLATES[:templates],
            }
        },
        "edits": edits,
    }


def _stage1_edit(captions: str, limit: int) -> dict[str, Any]:
    return {
        "method": "trce_eot",
        "params": {"concepts": "sexual", "eta": 1e-4, "prior": {"captions": captions, "limit": limit}},
    }


def _build(bb: Backbone, device: str | None = None) -> Any:
    """The backbone's builtin pipeline on ``--device`` (random weights; ``device="meta"`` allocates nothing)."""
    from conceptedit.models import builtin

    return getattr(builtin, bb.build)(device=device or _DEVICE["name"])


def _adapter(pipe: Any) -> Any:
    """conceptedit's backbone adapter for ``pipe`` (the one its runs resolve)."""
    from conceptedit.models.backbone import resolve_backbone
    from conceptedit.plugins import get_host

    return resolve_backbone(pipe, get_host().registry.backbones)


# --------------------------------------------------------------------------- stage 1


def part_stage1(bb: Backbone, captions: int, concepts: int, templates: int) -> dict[str, Any]:
    import conceptedit
    from conceptedit.engine.memory import PeakMemory
    from conceptedit.recipe.concepts import expand_concepts
    from conceptedit.recipe.loader import load_recipe

    recipe = _recipe([_stage1_edit(str(COCO), captions)], bb, concepts, templates)
    pipe = _build(bb)
    adapter = _adapter(pipe)
    dropped = 0 if bb.name == "sd14" else _drop_unread_weights(pipe)
    original = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".attn2.to_" in n}
    was_cached = _find_prior(captions, adapter.text_dim) is not None
    # Build (and cache) the prior once; the measured runs below reuse it.
    started = time.perf_counter()
    conceptedit.apply(recipe, pipeline=pipe, out=RESULTS / "tmp-prior", quiet=True)
    prior_seconds = time.perf_counter() - started
    _restore(pipe, original)
    _rmtree(RESULTS / "tmp-prior")

    with PeakMemory() as ours_mem:
        started = time.perf_counter()
        result = conceptedit.apply(recipe, pipeline=pipe, out=RESULTS / "tmp-stage1", quiet=True)
        ours_seconds = time.perf_counter() - started
    edit_seconds = result.outcomes[0].seconds
    ours = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in original}
    del result
    _rmtree(RESULTS / "tmp-stage1")
    _restore(pipe, original)
    del original  # the reference reads the restored layers; at SDXL size every copy is 1.4 GB

    loaded = load_recipe(recipe)
    pairs = expand_concepts(loaded.recipe.concepts["sexual"], None)
    prior = _cached_prior(captions, adapter.text_dim)  # the prior conceptedit's run used
    # The reference layout is timed alone: the fp64 solve of its sums and the comparisons are not its work.
    ref_seconds, worst64, worst32, within, matrices = 0.0, 0.0, 0.0, 0.0, 0
    with PeakMemory() as ref_mem:
        solutions = _reference_stage1(adapter, [(p.source, p.target) for p in pairs], prior, eta=1e-4)
        while True:
            started = time.perf_counter()
            solved = next(solutions, None)
            ref_seconds += time.perf_counter() - started
            if solved is None:
                break
            name, ref32, mat1, mat2 = solved
            ref64 = mat1 @ torch.inverse(mat2)  # the same sums inverted in fp64: the exact answer
            scale = ref64.abs().max()
            worst64 = max(worst64, float((ours[name].double() - ref64).abs().max() / scale))
            worst32 = max(worst32, float((ours[name].double() - ref32.double()).abs().max() / ref32.abs().max()))
            within = max(within, float((ref32.double() - ref64).abs().max() / scale))
            matrices += 1

    out = {
        "pairs": len(pairs),
        "matrices": matrices,
        "prior_captions": captions,
        "prior_build_seconds": round(prior_seconds, 2),
        "conceptedit_edit_seconds": round(edit_seconds, 2),
        "conceptedit_apply_seconds": round(ours_seconds, 2),
        "reference_layout_seconds": round(ref_seconds, 2),
        "speedup": round(ref_seconds / edit_seconds, 1),
        "max_relative_difference_vs_reference_sums_fp64_inverse": worst64,
        "max_relative_difference_vs_reference_fp32_inverse": worst32,
        "max_relative_difference_fp32_vs_fp64_inverse_within_reference": within,
        "peak_rss_gib": {"conceptedit": _gib(ours_mem.peak_rss_bytes), "reference": _gib(ref_mem.peak_rss_bytes)},
    }
    if bb.name != "sd14":
        out |= {
            "model": bb.model,
            "concepts": concepts,
            "templates": templates,
            "reference_layout_seconds_per_pair": round(ref_seconds / len(pairs), 2),
            "unread_weights_dropped_gib": _gib(dropped),
            "prior_was_cached": was_cached,
            "threads": torch.get_num_threads(),
        }
    return out


def _drop_unread_weights(pipe: Any) -> int:
    """Point every weight stage 1 never reads (the VAE, the UNet outside ``attn2.to_*``) at one shared
    zero, so the run fits: conceptedit's run writes several copies of the 140 SDXL K/V matrices (1.3 GiB
    each) and the full pipeline is 13 GiB. Shapes, and hence hashing, stay; returns the bytes freed."""
    from conceptedit.engine.memory import release_freed_memory

    freed = 0
    for component in ("unet", "vae"):
        for prefix, module in getattr(pipe, component).named_modules():
            for name, param in module._parameters.items():
                if param is None or (component == "unet" and ".attn2.to_" in f".{prefix}.{name}"):
                    continue
                freed += param.numel() * param.element_size()
                param.data = torch.zeros((), dtype=param.dtype).expand(param.shape)
    release_freed_memory()
    return freed


def _cached_prior(captions: int, dim: int) -> torch.Tensor:
    """The prior conceptedit's run cached: ``dim`` wide, built from ``captions`` captions, newest first."""
    from safetensors.torch import load_file

    path = _find_prior(captions, dim)
    if path is None:
        raise SystemExit(f"no cached {dim}x{dim} prior over {captions} captions")
    return load_file(str(path))["prior"]


def _find_prior(captions: int, dim: int) -> Path | None:
    """The newest cached ``dim`` x ``dim`` prior over ``captions`` captions, if any."""
    from safetensors import safe_open

    from conceptedit.engine.context import default_cache_dir

    files = sorted((default_cache_dir() / "priors").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        with safe_open(str(path), "pt") as fh:
            meta, shape = fh.metadata(), fh.get_slice("prior").get_shape()
        if meta.get("prompts") == str(captions) and shape == [dim, dim]:
            return path
    return None


def _reference_stage1(
    adapter: Any, pairs: list[tuple[str, str]], prior: torch.Tensor, eta: float
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The reference code's layout: per-pair 77-token encodes, deep copies and row loops; fp32 inverse.

    Rows come from ``adapter.encode_prompts`` (SD: the text encoder's output; SDXL: both encoders'
    concatenated rows). Yields, one K/V matrix at a time, ``(name, W' from the fp32 inverse, the fp64
    sums mat1, mat2)`` so that only one matrix's results are held at a time.
    """
    unet = adapter.unet
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]
    projections = [(f"{n}.to_{w}.weight", getattr(m, f"to_{w}")) for w in ("v", "k") for n, m in layers]
    rows_weight = [0.0, 1.0, 0.0, 0.0]  # [SoT, first EoT, last EoT, keyword]: TRCE's defaults
    contexts: list[torch.Tensor] = []
    values: list[list[torch.Tensor]] = [[] for _ in projections]
    for malicious, safe in pairs:
        encoding = adapter.encode_prompts([malicious, safe])  # 77 tokens, two prompts at a time
        hidden, last = encoding.hidden, encoding.hidden.shape[1] - 1
        eot = encoding.eot_index.tolist()
        copies = [copy.deepcopy(module) for _, module in projections]  # the reference restores each layer per pair
        positions_m = [0, eot[0], last, eot[0]]
        positions_s = [0, eot[1], last, last]
        contexts.append(torch.stack([hidden[0, i] for i in positions_m]))
        with torch.no_grad():
            for j, layer in enumerate(copies):
                values[j].append(torch.stack([layer(hidden[1, i]) for i in positions_s]))
    del copies
    n = len(pairs)
    for j, (name, module) in enumerate(projections):
        w = module.weight.detach().double()
        prior = prior.to(w.device)
        mat1 = eta * w @ prior
        mat2 = eta * prior.clone()
        for ctx_rows, val_rows in zip(contexts, values[j], strict=True):
            for r, weight in enumerate(rows_weight):
                c, v = ctx_rows[r][:, None].double(), val_rows[r][:, None].double()
                mat1 += weight * (v @ c.T) / n
                mat2 += weight * (c @ c.T) / n
        yield name, mat1.float() @ torch.inverse(mat2.float()), mat1, mat2


def _restore(pipe: Any, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if name in weights:
                param.copy_(weights[name])


# --------------------------------------------------------------------------- stage 2


#: How stage 2 spends memory and time. Every strategy passes one sample per UNet call and back-propagates
#: it at once (stage 2's loss is a sum over its samples, ``ctx.separable_loss``), so one sample's graph is
#: alive at a time.
#: ``lean``: conceptedit's default for SD-1.4: frozen targets stored with the trajectories (a step runs the
#: trained model only), text encoder and VAE parked on disk, nothing checkpointed.
#: ``checkpointed``: the same with block gradient checkpointing (less activation memory, one more forward).
#: ``reference``: the reference's passes every step (three frozen forwards of the original, the stage-1
#: model's forwards on the regulariser latents), every module resident, nothing checkpointed.
STRATEGIES: dict[str, dict[str, Any]] = {
    "lean": {"micro_batch": 1, "gradient_checkpointing": False, "park_idle_modules": True, "frozen_targets": "cached"},
    "checkpointed": {
        "micro_batch": 1,
        "gradient_checkpointing": True,
        "park_idle_modules": True,
        "frozen_targets": "cached",
    },
    "reference": {
        "micro_batch": 1,
        "gradient_checkpointing": False,
        "park_idle_modules": False,
        "frozen_targets": "recompute",
    },
    # GPU only: the lean strategy under bf16 autocast, fp32 master weights.
    "lean_bf16": {
        "micro_batch": 1,
        "gradient_checkpointing": False,
        "park_idle_modules": True,
        "frozen_targets": "cached",
        "mixed_precision": "bf16",
    },
}


def _stage2_recipe(bb: Backbone, steps: int, strategy: str, captions: int) -> dict[str, Any]:
    stage2 = {
        "method": "trce_steer",
        "params": {
            "concepts": "sexual",
            "trajectories_per_concept": 1,
            "sampling_steps": 4,
            "min_timestep": 400,
            "unconditional_trajectories": 2,
            "regularization_batch": 4,
        },
        "training": {"steps": steps, "lr": 1e-6, **STRATEGIES[strategy]},
    }
    templates = 15 if bb.name == "sd14" else bb.templates
    return _recipe([_stage1_edit(str(COCO), captions), stage2], bb, 1, templates)


def part_stage2(layout: str, steps: int, strategy: str) -> dict[str, Any]:
    """One trce_steer configuration at SD-1.4 size; ``layout`` is ``lean`` (conceptedit) or ``three`` (reference)."""
    import conceptedit
    from conceptedit.engine.memory import PeakMemory

    recipe = _stage2_recipe(BACKBONES["sd14"], steps, strategy, 50)
    if layout == "three":
        _install_three_unet_layout()
    out = RESULTS / f"tmp-stage2-{layout}-{strategy}"
    with PeakMemory() as memory:
        result = conceptedit.apply(recipe, out=out, quiet=True)
    _rmtree(out)
    train = result.outcomes[1]
    return {
        "layout": layout,
        "strategy": strategy,
        **STRATEGIES[strategy],
        "steps": steps,
        "threads": torch.get_num_threads(),
        "edit_seconds": round(train.seconds, 1),
        "seconds_per_step": round(_STEP_TIMES["mean"], 1),
        "peak_rss_gib_run": _gib(memory.peak_rss_bytes),
        "peak_rss_gib_training": _gib(train.peak_rss_bytes),
        "peak_cuda_gib_training": _gib(train.peak_cuda_bytes),
    }


def part_stage2_large(bb: Backbone, layout: str, steps: int, strategy: str, captions: int) -> dict[str, Any]:
    """One trce_steer configuration off SD-1.4 (SDXL), on latents of side ``bb.latent_side``.

    The lean run reports at its last optimiser step and leaves the process at once: writing the run
    (the edit file, copies of every changed tensor) would add several GiB that training never needs,
    past what this machine allows one process. A failing run (the three-UNet layout under its
    address-space cap) is reported with the phase it failed in.
    """
    import shutil
    import tempfile

    import conceptedit
    from conceptedit.engine.memory import PeakMemory

    recipe = _stage2_recipe(bb, steps, strategy, captions)
    out = RESULTS / f"tmp-stage2-{layout}-{strategy}"
    parked = RESULTS / f"tmp-parked-{layout}-{strategy}"  # the engine parks idle modules here
    parked.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(parked)
    _PHASE["now"] = "building the pipeline"
    pipe = _build(bb)
    if bb.latent_side is not None:
        pipe.unet.register_to_config(sample_size=bb.latent_side)
    unet = pipe.unet.config
    report: dict[str, Any] = {
        "layout": layout,
        "strategy": strategy,
        **STRATEGIES[strategy],
        "steps": steps,
        "threads": torch.get_num_threads(),
        "model": bb.model,
        "latent": [unet.in_channels, unet.sample_size, unet.sample_size],
        "stage1_prior_captions": captions,
        "memory_cap_gib": _CAP["gib"],
    }
    if layout == "three":
        _install_three_unet_layout()

    def finish() -> None:  # called by the step timer after the last step
        edit_memory = _EARLY["memory"]
        report.update(
            outcome="trained",
            edit_seconds=round(time.perf_counter() - _EARLY["started"], 1),
            seconds_per_step=round(_STEP_TIMES["mean"], 1),
            peak_rss_gib_run=_gib(memory.peak_rss_bytes),
            peak_rss_gib_training=_gib(edit_memory.peak_rss_bytes),
        )
        print(json.dumps(report), flush=True)
        _rmtree(out)
        shutil.rmtree(parked, ignore_errors=True)
        os._exit(0)

    _EARLY.update(steps=steps, finish=finish)
    with PeakMemory() as memory:
        try:
            conceptedit.apply(recipe, pipeline=pipe, out=out, quiet=True)
        except Exception as exc:  # a capped run's allocation failure is the measurement
            chain: list[str] = []
            cause: BaseException | None = exc
            while cause is not None and len(chain) < 4:
                chain.append(f"{type(cause).__name__}: {str(cause).strip()[:400]}")
                cause = cause.__cause__ or cause.__context__
            report.update(outcome="failed", failed_in=_PHASE["now"], error=chain)
            del exc, cause
    _rmtree(out)
    shutil.rmtree(parked, ignore_errors=True)
    return {**report, "peak_rss_gib_run": _gib(memory.peak_rss_bytes)}


_STEP_TIMES: dict[str, float] = {"mean": float("nan")}
#: What the run was doing (reported when a capped run fails) and the address-space cap it ran under.
_PHASE: dict[str, str] = {"now": "starting"}
_CAP: dict[str, float | None] = {"gib": None}
#: Off SD-1.4: the steps after which the lean run reports and exits, the reporter, the stage-2 start.
_EARLY: dict[str, Any] = {}


def _time_steps() -> None:
    """Record the wall time of each optimiser step (and the run's phase) through the public lifecycle hooks."""
    from conceptedit import hookimpl
    from conceptedit.engine.memory import PeakMemory
    from conceptedit.plugins import get_host

    stamps: list[float] = []

    class StepTimer:
        @hookimpl
        def conceptedit_before_edit(self, index: int) -> None:
            _PHASE["now"] = "stage 1 (trce_eot)" if index == 0 else "stage 2 preparation (trajectories)"
            if index == 1:
                stamps.clear()
                if _EARLY:
                    _EARLY["started"] = time.perf_counter()
                    _EARLY["memory"] = PeakMemory().__enter__()

        @hookimpl
        def conceptedit_on_train_step(self, step: int) -> None:
            _PHASE["now"] = f"stage 2 training, after step {step}"
            stamps.append(time.perf_counter())
            if len(stamps) > 1:
                gaps = [b - a for a, b in itertools.pairwise(stamps)]
                _STEP_TIMES["mean"] = sum(gaps) / len(gaps)
            if _EARLY and step == _EARLY["steps"]:
                _EARLY["finish"]()

    get_host().register(StepTimer(), name="step-timer")


def _install_three_unet_layout() -> None:
    """Replace trce_steer's reference passes with two extra resident fp32 UNets (the reference's layout)."""
    steer: Any = importlib.import_module("conceptedit_builtin.trce_steer")  # a plugin: untyped here
    original_prepare = steer.TrceSteer.prepare_training

    def prepare(self: Any, ctx: Any) -> None:
        original_prepare(self, ctx)
        unet = ctx.adapter.unet
        _PHASE["now"] = "stage 2 preparation: deep copy of the UNet for the original model (2nd resident UNet)"
        with torch.no_grad(), ctx.reference_weights("base"):
            self.original_unet = copy.deepcopy(unet).requires_grad_(False)
        _PHASE["now"] = "stage 2 preparation: deep copy of the UNet for the stage-1 model (3rd resident UNet)"
        with torch.no_grad(), ctx.reference_weights("edit_start"):
            self.stage1_unet = copy.deepcopy(unet).requires_grad_(False)
        _PHASE["now"] = "stage 2 training, step 1"

    def loss(self: Any, ctx: Any, step: int) -> dict[str, torch.Tensor]:
        adapter = ctx.adapter
        real = adapter.predict_noise

        def routed(latents: Any, t: Any, hidden: Any, unet: Any = None) -> Any:
            which = self._route
            return real(latents, t, hidden, unet=which if unet is None else unet)

        import contextlib

        @contextlib.contextmanager
        def use(model: Any) -> Any:
            self._route = model
            yield

        ctx_ref = ctx.reference_weights
        ctx.reference_weights = lambda which, names=None: use(
            self.original_unet if which == "base" else self.stage1_unet
        )
        adapter.predict_noise = routed
        try:
            return steer.TrceSteer._lean_loss(self, ctx, step)
        finally:
            adapter.predict_noise = real
            ctx.reference_weights = ctx_ref

    steer.TrceSteer._lean_loss = steer.TrceSteer.trajectory_loss
    steer.TrceSteer.prepare_training = prepare
    steer.TrceSteer.trajectory_loss = loss


def weight_floors(bb: Backbone) -> dict[str, Any]:
    """Bytes the two layouts must hold whatever the activations: resident UNet copies (fp32), the
    other components, and the training state of trce_steer's default trainable parameters."""
    steer: Any = importlib.import_module("conceptedit_builtin.trce_steer")
    pipe = _build(bb, device="meta")
    trainable = steer.TrceSteerParams.model_fields["trainable"].default
    unet = sum(p.numel() for p in pipe.unet.parameters()) * 4
    others = sum(
        sum(p.numel() for p in getattr(pipe, part).parameters()) * 4
        for part in ("text_encoder", "text_encoder_2", "vae")
        if getattr(pipe, part, None) is not None
    )
    trained = sum(p.numel() for n, p in pipe.unet.named_parameters() if any(s in n for s in trainable)) * 4
    kv = sum(p.numel() for n, p in pipe.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n) * 4
    lean_training = unet + 3 * trained + trained + kv
    return {
        "unet_gib": round(unet / GIB, 2),
        "text_encoders_and_vae_gib": round(others / GIB, 2),
        "trainable_gib": round(trained / GIB, 2),
        "trainable": trainable,
        "lean_unet_copies": 1,
        "reference_unet_copies": 3,
        "lean_floor_gib": round(unet / GIB, 2),
        "reference_floor_gib": round(3 * unet / GIB, 2),
        "adamw_state_gib": round(3 * trained / GIB, 2),  # gradients and both moments, in either layout
        # The lean layout keeps the originals of what the run changed (trained tensors, stage-1 K/V) to
        # swap the references in; the reference layout has them in its extra UNets.
        "lean_swap_copies_gib": round((trained + kv) / GIB, 2),
        "lean_training_floor_gib": round(lean_training / GIB, 2),
        "reference_training_floor_gib": round((3 * unet + 3 * trained + others) / GIB, 2),
    }


# --------------------------------------------------------------------------- trajectory cache


def part_cache() -> dict[str, Any]:
    """Count the latents the paper's schedule keeps (sampled on tiny-sd; bytes scaled to SD-1.4 latents)."""
    from safetensors import safe_open

    import conceptedit
    from conceptedit.engine.context import default_cache_dir

    stage2 = {
        "method": "trce_steer",
        "params": {
            "concepts": "sexual",
            "trajectories_per_concept": 5,
            "sampling_steps": 50,
            "unconditional_trajectories": 2000,
            "regularization_batch": 4,
        },
        "training": {"steps": 1, "lr": 1e-6},
    }
    recipe = _recipe([stage2], BACKBONES["sd14"])
    recipe["model"] = "builtin:tiny-sd"
    # Same schedule as 300 training steps, without training them: draw 300 steps' worth.
    recipe["edits"][0]["training"]["steps"] = 300
    recipe["edits"][0]["training"]["lr"] = 1e-12
    torch.set_num_threads(1)
    before = set((default_cache_dir() / "trajectories").glob("*.safetensors"))
    conceptedit.apply(recipe, out=RESULTS / "tmp-cache", quiet=True)
    _rmtree(RESULTS / "tmp-cache")
    new = sorted(set((default_cache_dir() / "trajectories").glob("*.safetensors")) - before)
    out: dict[str, Any] = {}
    per_target = 2 * LATENT[0] * LATENT[1] * LATENT[2]  # one fp16 latent-sized prediction
    per_latent = per_target + 3 * 8  # fp16 latent + index + timestep
    reference_per_trajectory = (1 + 2 * 50) * LATENT[0] * LATENT[1] * LATENT[2] * 4  # noise + 50 x (latent, eps), fp32
    for path in new:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
            kept = fh.get_slice("latents").get_shape()[0]
            targets = sum(key.startswith("target.") for key in fh.keys())  # noqa: SIM118 - no iterator
        label = meta["label"]
        trajectories = 100 if label == "malicious" else 2000
        sampled = int(meta["trajectories"])
        ours = kept * per_latent / trajectories
        out[label] = {
            "trajectories_in_set": trajectories,
            "trajectories_sampled": sampled,
            "latents_kept": kept,
            "bytes_per_trajectory_sd14": round(ours),
            # frozen targets stored with the latents (training.frozen_targets: cached), fp16 latent-sized each
            "frozen_targets": targets,
            "target_bytes_per_trajectory_sd14": round(kept * targets * per_target / trajectories),
            "target_fraction_of_reference": round(
                kept * targets * per_target / trajectories / reference_per_trajectory, 4
            ),
            "reference_bytes_per_trajectory": reference_per_trajectory,
            "fraction_of_reference": round(ours / reference_per_trajectory, 4),
        }
    return out


# --------------------------------------------------------------------------- driver


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**30, 2)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)


def _run_part(args: list[str], reuse: bool, parts: str = "trce_scale.parts", may_fail: bool = False) -> dict[str, Any]:
    """Run one part in a fresh process; its JSON is kept under results/<parts>/ for --reuse.

    The child is killed if its resident set passes ``RSS_LIMIT_GIB``. With ``may_fail``, a child
    that dies (a signal, an abort) is recorded as such instead of stopping the benchmark.
    """
    saved = RESULTS / parts / ("_".join(a.lstrip("-") for a in args) + ".json")
    if reuse and saved.is_file():
        return json.loads(saved.read_text())
    print(f"  running {' '.join(args)} ...", file=sys.stderr, flush=True)
    child = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout, stderr, peak = _watch(child)
    if child.returncode != 0:
        killed = peak > RSS_LIMIT_GIB * GIB
        if not may_fail:
            why = f"its resident set passed {RSS_LIMIT_GIB} GiB" if killed else f"exit code {child.returncode}"
            raise SystemExit(f"part {args} failed ({why}):\n{stderr[-4000:]}")
        result = {
            "outcome": f"killed at the {RSS_LIMIT_GIB:g} GiB RSS limit" if killed else "process died",
            "returncode": child.returncode,
            "largest_rss_gib": _gib(peak),
            "stderr_tail": stderr[-1500:],
        }
    else:
        result = json.loads(stdout.strip().splitlines()[-1])
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result) + "\n")
    return result


def _watch(child: subprocess.Popen[str]) -> tuple[str, str, int]:
    """Wait for ``child``, killing it if its RSS passes the limit; its output and largest RSS seen."""
    page, peak = os.sysconf("SC_PAGE_SIZE"), 0
    while True:
        try:
            stdout, stderr = child.communicate(timeout=0.5)
            return stdout, stderr, peak
        except subprocess.TimeoutExpired:
            try:
                with open(f"/proc/{child.pid}/statm", encoding="ascii") as fh:
                    peak = max(peak, int(fh.read().split()[1]) * page)
            except (OSError, IndexError, ValueError):
                continue
            if peak > RSS_LIMIT_GIB * GIB:
                child.kill()


def _memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _machine() -> dict[str, Any]:
    device = _DEVICE["name"]
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="sd14")
    parser.add_argument("--part", choices=["stage1", "stage2", "cache"])
    parser.add_argument("--layout", choices=["lean", "three"], default="lean")
    parser.add_argument("--steps", type=int, help="stage-2 optimiser steps (sd14: 3, sdxl: 2)")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="lean")
    parser.add_argument("--captions", type=int, help="stage-1 prior captions (sd14: 300, sdxl: 100)")
    parser.add_argument("--concepts", type=int, help="stage-1 concepts, each in every template (sd14: 20, sdxl: 2)")
    parser.add_argument("--templates", type=int, help="stage-1 templates per concept (sd14: 15, sdxl: 4)")
    parser.add_argument("--memory-cap-gib", type=float, help="address-space cap of this process (RLIMIT_AS)")
    parser.add_argument("--reuse", action="store_true", help="reuse parts already measured (results/<stem>.parts)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the SD-1.4 parts run")
    args = parser.parse_args()
    _DEVICE["name"] = args.device
    if args.device == "cuda" and args.backbone != "sd14":
        raise SystemExit("--device cuda measures the SD-1.4 parts; --backbone sdxl runs on the CPU")
    bb = BACKBONES[args.backbone]
    steps = args.steps or bb.steps
    captions = args.captions or bb.captions
    concepts, templates = args.concepts or bb.concepts, args.templates or bb.templates
    if args.memory_cap_gib:
        cap = int(args.memory_cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        _CAP["gib"] = args.memory_cap_gib
    if args.part == "stage1":
        print(json.dumps(part_stage1(bb, captions, concepts, templates)))
        return
    if args.part == "stage2":
        _time_steps()
        if bb.name == "sd14":
            print(json.dumps(part_stage2(args.layout, steps, args.strategy)))
        else:
            print(json.dumps(part_stage2_large(bb, args.layout, steps, args.strategy, captions)))
        return
    if args.part == "cache":
        print(json.dumps(part_cache()))
        return
    if bb.name != "sd14":
        run_large(bb, steps, captions, concepts, templates, args.reuse)
        return
    # conceptedit's layout without and with checkpointing (on a GPU also under bf16 autocast), then the
    # reference's passes in its layout, which render() expects last.
    layouts = [("lean", "lean"), ("lean", "checkpointed"), ("three", "reference")]
    if args.device == "cuda":
        layouts.insert(2, ("lean", "lean_bf16"))
    stem = "trce_scale" if args.device == "cpu" else f"trce_scale_{args.device}"
    device = [] if args.device == "cpu" else ["--device", args.device]
    stage2 = [
        _run_part(
            ["--part", "stage2", "--layout", layout, "--strategy", strategy, "--steps", str(steps), *device],
            args.reuse,
            f"{stem}.parts",
        )
        for layout, strategy in layouts
    ]
    results = {
        "machine": _machine(),
        "stage1": _run_part(["--part", "stage1", "--captions", str(captions), *device], args.reuse, f"{stem}.parts"),
        "stage2": stage2,
        "trajectory_cache": _run_part(["--part", "cache"], args.reuse, f"{stem}.parts"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render(results))
    print(render(results))


def run_large(bb: Backbone, steps: int, captions: int, concepts: int, templates: int, reuse: bool) -> None:
    """Stage 1 and stage 2 off SD-1.4 (SDXL): lean layout measured, three-UNet layout under a cap."""
    common = ["--backbone", bb.name]
    parts = f"{bb.stem}.parts"
    stage1 = [*common, "--part", "stage1", "--captions", str(captions)]
    stage1 += ["--concepts", str(concepts), "--templates", str(templates)]
    # Stage 1 first: it caches the prior stage 2's first edit reads.
    s1 = _run_part(stage1, reuse, parts)
    s2 = [*common, "--part", "stage2", "--steps", str(steps), "--captions", str(captions)]
    lean = _run_part([*s2, "--layout", "lean", "--strategy", "checkpointed"], reuse, parts, may_fail=True)
    cap = bb.memory_cap_gib or RSS_LIMIT_GIB
    available = _memory_available()
    if available is not None:  # leave the machine's other users at least 1.5 GiB
        cap = min(cap, max(4.0, (available / GIB - 1.5) // 0.5 * 0.5))
    three = _run_part(
        [*s2, "--layout", "three", "--strategy", "reference", "--memory-cap-gib", f"{cap:g}"],
        reuse,
        parts,
        may_fail=True,
    )
    results = {
        "machine": _machine(),
        "backbone": bb.name,
        "model": bb.model,
        "stage1": s1,
        "stage2": {"lean": lean, "three_unet_reference": three, "weight_floors": weight_floors(bb)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{bb.stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{bb.stem}.md").write_text(render_large(results))
    print(render_large(results))


def render(r: dict[str, Any]) -> str:
    s1, (*ours, three) = r["stage1"], r["stage2"]
    lean = ours[0]
    cuda = r["machine"]["device"] == "cuda"
    memory = "peak_cuda_gib_training" if cuda else "peak_rss_gib_training"
    ref_time, ref_mem = three["seconds_per_step"], three[memory]
    labels = {"lean": "no checkpointing", "checkpointed": "block checkpointing", "lean_bf16": "bf16 autocast"}

    def stage2_rows(part: dict[str, Any]) -> list[str]:
        label = labels[part["strategy"]]
        return [
            f"| stage 2 seconds per step, {label} | {part['seconds_per_step']} | {ref_time} | "
            f"{ref_time / part['seconds_per_step']:.2f}x faster |",
            f"| stage 2 peak {'CUDA memory' if cuda else 'RSS'} while training, {label} (GiB) | {part[memory]} | "
            f"{ref_mem} | {part[memory] / ref_mem:.0%} |",
        ]

    lines = [
        f"# TRCE at SD-1.4 scale (builtin:sd14-random, {r['machine']['device'].upper()})",
        "",
        f"Machine: {r['machine']['platform']}, {r['machine'].get('device_name', 'cpu')}, torch "
        f"{r['machine']['torch']}, {r['machine']['threads']} threads.",
        "",
        "| measure | conceptedit | reference layout | ratio |",
        "|---|---|---|---|",
        f"| stage 1, {s1['pairs']} pairs, {s1['matrices']} matrices, prior cached (s) | "
        f"{s1['conceptedit_edit_seconds']} | {s1['reference_layout_seconds']} | {s1['speedup']}x faster |",
        f"| stage 1 W' vs the reference layout's sums solved in fp64 (max relative difference) | "
        f"{s1['max_relative_difference_vs_reference_sums_fp64_inverse']:.1e} | | |",
        f"| stage 1 W' vs the reference layout's fp32 `torch.inverse` (max relative difference) | "
        f"{s1['max_relative_difference_vs_reference_fp32_inverse']:.1e} | | |",
        *(row for part in ours for row in stage2_rows(part)),
    ]
    for label, c in r["trajectory_cache"].items():
        lines.append(
            f"| trajectory cache, {label} (bytes per trajectory, frozen targets included) | "
            f"{c['bytes_per_trajectory_sd14'] + c['target_bytes_per_trajectory_sd14']:,} | "
            f"{c['reference_bytes_per_trajectory']:,} | "
            f"{c['fraction_of_reference'] + c['target_fraction_of_reference']:.1%} |"
        )
    lines += [
        "",
        f"Stage 1 prior: {s1['prior_captions']} COCO captions x 77 tokens, built once in "
        f"{s1['prior_build_seconds']} s and cached. Stage 2, {lean['steps']} steps (time per step: the mean gap "
        "between step ends), one sample per UNet call, each back-propagated as it is computed: conceptedit = one "
        "resident UNet, the frozen predictions (original on the malicious, safe and empty prompts; stage-1 model "
        "on the regulariser latents) stored with the trajectories when they are sampled, so a step runs only the "
        "six trained passes; text encoder and VAE parked on disk. Reference layout = three resident fp32 UNets "
        "(trained, original, stage 1) running the reference's thirteen passes every step (seven frozen, six "
        "trained), every module resident. The reference code sums all six trained passes' losses and calls "
        "backward once, holding six graphs; the reference layout here holds one at a time, so its peak is a "
        "lower bound of the reference's and the memory ratios are upper bounds. Cache bytes: latents and the "
        "float16 frozen targets stored with them, vs the reference's files (all 50 steps, fp32, noise "
        "predictions included).",
        "",
    ]
    return "\n".join(lines)


def _stage2_cells(part: dict[str, Any]) -> tuple[str, str]:
    """(peak RSS while training, seconds per step) of a large stage-2 part, or what stopped it."""
    outcome = part.get("outcome")
    if outcome == "trained":
        return str(part["peak_rss_gib_training"]), str(part["seconds_per_step"])
    if outcome == "failed":
        text = f"failed under a {part['memory_cap_gib']:g} GiB address-space cap (peak RSS {part['peak_rss_gib_run']})"
        return text, "n/a (failed)"
    text = f"{outcome} (exit code {part.get('returncode')}, largest RSS seen {part.get('largest_rss_gib')})"
    return text, "n/a"


def render_large(r: dict[str, Any]) -> str:
    """The Markdown summary of a ``run_large`` result (SDXL)."""
    s1, s2 = r["stage1"], r["stage2"]
    lean, three, floors = s2["lean"], s2["three_unet_reference"], s2["weight_floors"]
    latent = "x".join(str(d) for d in lean.get("latent") or three.get("latent") or [])
    (lean_rss, lean_step), (three_rss, three_step) = _stage2_cells(lean), _stage2_cells(three)
    prior = {True: "read from the cache", False: "building it"}.get(
        s1.get("prior_was_cached"), "building the prior or reading it from the cache"
    )
    failure = f": it failed in {three['failed_in']}: {three['error'][0]}" if three.get("outcome") == "failed" else ""
    lines = [
        f"# TRCE at SDXL size ({r['model']}, CPU)",
        "",
        f"Machine: {r['machine']['platform']}, torch {r['machine']['torch']}, {r['machine']['threads']} threads.",
        "",
        "| measure | conceptedit | reference layout | ratio |",
        "|---|---|---|---|",
        f"| stage 1, {s1['pairs']} pairs ({s1['concepts']} concepts x {s1['templates']} templates), "
        f"{s1['matrices']} matrices, prior cached (s) | {s1['conceptedit_edit_seconds']} | "
        f"{s1['reference_layout_seconds']} | {s1['speedup']}x faster |",
        f"| stage 1 seconds per pair (total / pairs) | {s1['conceptedit_edit_seconds'] / s1['pairs']:.2f} | "
        f"{s1['reference_layout_seconds_per_pair']} | |",
        f"| stage 1 W' vs the reference layout's sums solved in fp64 (max relative difference) | "
        f"{s1['max_relative_difference_vs_reference_sums_fp64_inverse']:.1e} | | |",
        f"| stage 1 W' vs the reference layout's fp32 `torch.inverse` (max relative difference) | "
        f"{s1['max_relative_difference_vs_reference_fp32_inverse']:.1e} | | |",
        f"| stage 1 peak RSS, without the {s1['unread_weights_dropped_gib']} GiB stage 1 never reads (GiB) | "
        f"{s1['peak_rss_gib']['conceptedit']} | {s1['peak_rss_gib']['reference']} | |",
        f"| stage 2 peak RSS while training, latents {latent} (GiB) | {lean_rss} | {three_rss} | |",
        f"| stage 2 seconds per step, latents {latent} | {lean_step} | {three_step} | |",
        f"| weight floor: resident fp32 UNets (GiB) | {floors['lean_unet_copies']} x {floors['unet_gib']} = "
        f"{floors['lean_floor_gib']} | {floors['reference_unet_copies']} x {floors['unet_gib']} = "
        f"{floors['reference_floor_gib']} | {floors['lean_floor_gib'] / floors['reference_floor_gib']:.0%} |",
        f"| text encoders and VAE (GiB) | {floors['text_encoders_and_vae_gib']}, parked while training | "
        f"{floors['text_encoders_and_vae_gib']}, resident | |",
        f"| gradients + AdamW moments of the trained {floors['trainable_gib']} GiB (GiB) | "
        f"{floors['adamw_state_gib']} | {floors['adamw_state_gib']} | |",
        f"| originals kept to swap the references in: trained tensors + stage-1 K/V (GiB) | "
        f"{floors['lean_swap_copies_gib']} | in the extra UNets | |",
        f"| sum while training (GiB) | {floors['lean_training_floor_gib']} | "
        f"{floors['reference_training_floor_gib']} | "
        f"{floors['lean_training_floor_gib'] / floors['reference_training_floor_gib']:.0%} |",
        "",
        f"Stage 1: conceptedit's `trce_eot` and the reference code's layout (rows from the adapter's "
        f"`encode_prompts`, both text encoders' 2048-wide rows; per-pair deep copies of all "
        f"{s1['matrices']} K/V layers; per-pair, per-row fp64 sums; one fp32 `torch.inverse` per matrix) on "
        f"the same {s1['pairs']} pairs and the same prior over {s1['prior_captions']} COCO captions, cached "
        f"by a first apply of the recipe ({s1['prior_build_seconds']} s, {prior}), in one process on "
        f"{s1['threads']} thread(s). "
        "SD-1.4's design is 300 pairs and 300 captions; at SDXL size the reference layout's sums over "
        f"2048x2048 fp64 matrices take about {s1['reference_layout_seconds_per_pair']:.0f} s per pair, so "
        "fewer pairs (and captions, whose encoding only the prior build pays) keep the run short. Only the "
        "reference layout's own work is timed, not the fp64 solve of its sums used for the comparison. "
        "Weights neither layout reads (the UNet outside its attention projections, the VAE) point at one "
        "shared zero: a whole SDXL pipeline is 13 GiB and conceptedit's run writes its output with "
        "several copies of the 1.3 GiB of K/V matrices, more than one process may hold here; add "
        f"{s1['unread_weights_dropped_gib']} GiB to either peak for a whole pipeline.",
        "",
        f"Stage 2: {lean['steps']} `trce_steer` steps with conceptedit's layout (one resident UNet, "
        "references by swapping the tensors they differ in, one sample per UNet call, block "
        "checkpointing, text encoders and VAE parked on disk while training) on "
        f"{latent} latents instead of SDXL's 4x128x128: weights dominate the memory, and activations at "
        "full size would add to both layouts. Peak RSS is measured from the start of stage 2 (trajectory "
        "sampling included) to the last optimiser step; the process then exits without writing the run. "
        "The reference layout (three resident fp32 UNets, every module resident, nothing checkpointed) "
        "ran in the same invocation in a child process whose address space was capped at "
        f"{three.get('memory_cap_gib', 'n/a')} GiB (`RLIMIT_AS`), so that it fails with an allocation error "
        f"rather than waking the OOM killer on a shared machine{failure}. Its weight floor alone "
        f"({floors['reference_floor_gib']} GiB of UNets) exceeds this machine's memory; the lean layout's "
        "floor is one UNet.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
