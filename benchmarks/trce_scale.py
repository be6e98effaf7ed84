"""TRCE at SD-1.4 scale (builtin:sd14-random): speed, memory and cache size, next to the reference layout.

Each part runs in its own process so peak memory is that part's alone:

* ``stage1``  -- 300 prompt pairs (20 concepts x 15 templates), prior cached: conceptedit's
  ``trce_eot`` vs the reference layout (77-token encoding two prompts at a time, per-pair deep
  copies of the K/V layers, a per-pair loop over 4 token rows, one ``torch.inverse`` per layer),
  timed in the same process, with the largest difference between the two W'.
* ``stage2``  -- seconds per step and peak resident memory of ``trce_steer`` (one resident UNet,
  references by tensor swapping) and of the reference layout (three resident fp32 UNets), on
  the same latents, timesteps and prompts.
* ``cache``   -- trajectory-cache bytes per trajectory for the paper's schedule (100 malicious
  trajectories, 2,000 unconditional, 300 steps) vs the reference's files (all 50 steps, fp32,
  noise predictions included).

    python benchmarks/trce_scale.py                 # everything; writes benchmarks/results/trce_scale.{json,md}
    python benchmarks/trce_scale.py --part stage1   # one part, printed as JSON
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COCO = ROOT.parent / "shared" / "data" / "prompts" / "rohitgandikota__erasing" / "data" / "coco_30k.csv"
LATENT = (4, 64, 64)


def _recipe(edits: list[dict[str, Any]]) -> dict[str, Any]:
    templates = [
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
    return {
        "schema_version": 1,
        "model": "builtin:sd14-random",
        "device": "cpu",
        "seed": 0,
        "concepts": {
            "sexual": {"file": str(ROOT / "recipes" / "concepts" / "sexual.json"), "limit": 20, "templates": templates}
        },
        "edits": edits,
    }


def _stage1_edit(captions: str, limit: int) -> dict[str, Any]:
    return {
        "method": "trce_eot",
        "params": {"concepts": "sexual", "eta": 1e-4, "prior": {"captions": captions, "limit": limit}},
    }


# --------------------------------------------------------------------------- stage 1


def part_stage1(captions: int) -> dict[str, Any]:
    import conceptedit
    from conceptedit.engine.memory import PeakMemory
    from conceptedit.models.builtin import build_sd14_random
    from conceptedit.recipe.concepts import expand_concepts
    from conceptedit.recipe.loader import load_recipe

    recipe = _recipe([_stage1_edit(str(COCO), captions)])
    pipe = build_sd14_random()
    original = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".attn2.to_" in n}
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
    _rmtree(RESULTS / "tmp-stage1")
    _restore(pipe, original)

    loaded = load_recipe(recipe)
    pairs = expand_concepts(loaded.recipe.concepts["sexual"], None)
    prior = _cached_prior(captions, pipe.text_encoder.config.hidden_size)  # the prior conceptedit's run used
    with PeakMemory() as ref_mem:
        started = time.perf_counter()
        ref32, ref64 = _reference_stage1(pipe, [(p.source, p.target) for p in pairs], prior, eta=1e-4)
        ref_seconds = time.perf_counter() - started

    def worst(reference: dict[str, torch.Tensor]) -> float:
        return max(float((ours[n].double() - ref).abs().max() / ref.abs().max()) for n, ref in reference.items())

    return {
        "pairs": len(pairs),
        "matrices": len(ref64),
        "prior_captions": captions,
        "prior_build_seconds": round(prior_seconds, 2),
        "conceptedit_edit_seconds": round(edit_seconds, 2),
        "conceptedit_apply_seconds": round(ours_seconds, 2),
        "reference_layout_seconds": round(ref_seconds, 2),
        "speedup": round(ref_seconds / edit_seconds, 1),
        "max_relative_difference_vs_reference_sums_fp64_inverse": worst(ref64),
        "max_relative_difference_vs_reference_fp32_inverse": worst(ref32),
        "max_relative_difference_fp32_vs_fp64_inverse_within_reference": max(
            float((ref32[n] - ref64[n]).abs().max() / ref64[n].abs().max()) for n in ref64
        ),
        "peak_rss_gib": {"conceptedit": _gib(ours_mem.peak_rss_bytes), "reference": _gib(ref_mem.peak_rss_bytes)},
    }


def _cached_prior(captions: int, dim: int) -> torch.Tensor:
    """The prior conceptedit's run cached: ``dim`` wide, built from ``captions`` captions, newest first."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from conceptedit.engine.context import default_cache_dir

    files = sorted((default_cache_dir() / "priors").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        with safe_open(str(path), "pt") as fh:
            meta, shape = fh.metadata(), fh.get_slice("prior").get_shape()
        if meta.get("prompts") == str(captions) and shape == [dim, dim]:
            return load_file(str(path))["prior"]
    raise SystemExit(f"no cached {dim}x{dim} prior over {captions} captions")


def _reference_stage1(
    pipe: Any, pairs: list[tuple[str, str]], prior: torch.Tensor, eta: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The reference code's layout: per-pair 77-token encodes, deep copies and row loops; fp32 inverse."""
    tok, enc, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]
    projections = [(f"{n}.to_{w}.weight", getattr(m, f"to_{w}")) for w in ("v", "k") for n, m in layers]
    rows_weight = [0.0, 1.0, 0.0, 0.0]  # [SoT, first EoT, last EoT, keyword]: TRCE's defaults
    contexts, values = [], [[] for _ in projections]
    for malicious, safe in pairs:
        ids = tok([malicious, safe], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = enc(ids.input_ids)[0]
        eot = (ids.input_ids == tok.eos_token_id).int().argmax(1).tolist()
        copies = [copy.deepcopy(module) for _, module in projections]  # the reference restores each layer per pair
        positions_m = [0, eot[0], 76, eot[0]]
        positions_s = [0, eot[1], 76, 76]
        contexts.append(torch.stack([hidden[0, i] for i in positions_m]))
        with torch.no_grad():
            for j, layer in enumerate(copies):
                values[j].append(torch.stack([layer(hidden[1, i]) for i in positions_s]))
    n = len(pairs)
    fp32, fp64 = {}, {}
    for j, (name, module) in enumerate(projections):
        w = module.weight.detach().double()
        mat1 = eta * w @ prior
        mat2 = eta * prior.clone()
        for ctx_rows, val_rows in zip(contexts, values[j], strict=True):
            for r, weight in enumerate(rows_weight):
                c, v = ctx_rows[r][:, None].double(), val_rows[r][:, None].double()
                mat1 += weight * (v @ c.T) / n
                mat2 += weight * (c @ c.T) / n
        # The reference inverts in fp32; the same sums inverted in fp64 give the exact answer.
        fp32[name] = (mat1.float() @ torch.inverse(mat2.float())).double()
        fp64[name] = mat1 @ torch.inverse(mat2)
    return fp32, fp64


def _restore(pipe: Any, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if name in weights:
                param.copy_(weights[name])


# --------------------------------------------------------------------------- stage 2


#: Activation strategies: conceptedit's defaults for SD-1.4 (one sample per call, rebuilt in
#: backward, block checkpointing, text encoder and VAE parked) and the reference's (each trained
#: pass back-propagated on its own, nothing checkpointed, every module resident).
STRATEGIES: dict[str, dict[str, Any]] = {
    "lean": {"micro_batch": 1, "gradient_checkpointing": True, "park_idle_modules": True},
    "reference": {"micro_batch": 1, "gradient_checkpointing": False, "park_idle_modules": False},
}


def part_stage2(layout: str, steps: int, strategy: str) -> dict[str, Any]:
    """One trce_steer configuration; ``layout`` is ``lean`` (conceptedit) or ``three`` (reference)."""
    import conceptedit
    from conceptedit.engine.memory import PeakMemory

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
    recipe = _recipe([_stage1_edit(str(COCO), 50), stage2])
    recipe["concepts"]["sexual"]["limit"] = 1
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
    }


_STEP_TIMES: dict[str, float] = {"mean": float("nan")}


def _time_steps() -> None:
    """Record the wall time of each optimiser step through the public lifecycle hook."""
    from conceptedit import hookimpl
    from conceptedit.plugins import get_host

    stamps: list[float] = []

    class StepTimer:
        @hookimpl
        def conceptedit_before_edit(self, index: int) -> None:
            if index == 1:
                stamps.clear()

        @hookimpl
        def conceptedit_on_train_step(self, step: int) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) > 1:
                gaps = [b - a for a, b in itertools.pairwise(stamps)]
                _STEP_TIMES["mean"] = sum(gaps) / len(gaps)

    get_host().register(StepTimer(), name="step-timer")


def _install_three_unet_layout() -> None:
    """Replace trce_steer's reference passes with two extra resident fp32 UNets (the reference's layout)."""
    import conceptedit_builtin.trce_steer as steer

    original_prepare = steer.TrceSteer.prepare_training

    def prepare(self: Any, ctx: Any) -> None:
        original_prepare(self, ctx)
        unet = ctx.adapter.unet
        with torch.no_grad(), ctx.reference_weights("base"):
            self.original_unet = copy.deepcopy(unet).requires_grad_(False)
        with torch.no_grad(), ctx.reference_weights("edit_start"):
            self.stage1_unet = copy.deepcopy(unet).requires_grad_(False)

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
        ctx.reference_weights = lambda which, names=None: use(  # type: ignore[method-assign]
            self.original_unet if which == "base" else self.stage1_unet
        )
        adapter.predict_noise = routed  # type: ignore[method-assign]
        try:
            return steer.TrceSteer._lean_loss(self, ctx, step)
        finally:
            adapter.predict_noise = real  # type: ignore[method-assign]
            ctx.reference_weights = ctx_ref  # type: ignore[method-assign]

    steer.TrceSteer._lean_loss = steer.TrceSteer.trajectory_loss  # type: ignore[attr-defined]
    steer.TrceSteer.prepare_training = prepare  # type: ignore[method-assign]
    steer.TrceSteer.trajectory_loss = loss  # type: ignore[method-assign]


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
    recipe = _recipe([stage2])
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
    per_latent = 2 * LATENT[0] * LATENT[1] * LATENT[2] + 3 * 8  # fp16 latent + index + timestep
    reference_per_trajectory = (1 + 2 * 50) * LATENT[0] * LATENT[1] * LATENT[2] * 4  # noise + 50 x (latent, eps), fp32
    for path in new:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
            kept = fh.get_slice("latents").get_shape()[0]
        label = meta["label"]
        trajectories = 100 if label == "malicious" else 2000
        sampled = int(meta["trajectories"])
        ours = kept * per_latent / trajectories
        out[label] = {
            "trajectories_in_set": trajectories,
            "trajectories_sampled": sampled,
            "latents_kept": kept,
            "bytes_per_trajectory_sd14": round(ours),
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


def _run_part(args: list[str], reuse: bool) -> dict[str, Any]:
    """Run one part in a fresh process; its JSON is kept under results/trce_scale.parts/ for --reuse."""
    saved = RESULTS / "trce_scale.parts" / ("_".join(a.lstrip("-") for a in args) + ".json")
    if reuse and saved.is_file():
        return json.loads(saved.read_text())
    print(f"  running {' '.join(args)} ...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"part {args} failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["stage1", "stage2", "cache"])
    parser.add_argument("--layout", choices=["lean", "three"], default="lean")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="lean")
    parser.add_argument("--captions", type=int, default=300)
    parser.add_argument("--reuse", action="store_true", help="reuse parts already measured (results/trce_scale.parts)")
    args = parser.parse_args()
    if args.part == "stage1":
        print(json.dumps(part_stage1(args.captions)))
        return
    if args.part == "stage2":
        _time_steps()
        print(json.dumps(part_stage2(args.layout, args.steps, args.strategy)))
        return
    if args.part == "cache":
        print(json.dumps(part_cache()))
        return
    # The reference's layout as it runs, and the same three UNets given conceptedit's activation
    # strategy, which isolates what the one-UNet layout saves.
    steps = str(args.steps)
    stage2 = [
        _run_part(["--part", "stage2", "--layout", layout, "--strategy", strategy, "--steps", steps], args.reuse)
        for layout, strategy in (("lean", "lean"), ("three", "reference"), ("three", "lean"))
    ]
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "stage1": _run_part(["--part", "stage1", "--captions", str(args.captions)], args.reuse),
        "stage2": stage2,
        "trajectory_cache": _run_part(["--part", "cache"], args.reuse),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trce_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "trce_scale.md").write_text(render(results))
    print(render(results))


def render(r: dict[str, Any]) -> str:
    s1, (lean, three, three_lean) = r["stage1"], r["stage2"]
    lines = [
        "# TRCE at SD-1.4 scale (builtin:sd14-random, CPU)",
        "",
        f"Machine: {r['machine']['platform']}, torch {r['machine']['torch']}, {r['machine']['threads']} threads.",
        "",
        "| measure | conceptedit | reference layout | ratio |",
        "|---|---|---|---|",
        f"| stage 1, {s1['pairs']} pairs, {s1['matrices']} matrices, prior cached (s) | "
        f"{s1['conceptedit_edit_seconds']} | {s1['reference_layout_seconds']} | {s1['speedup']}x faster |",
        f"| stage 1 W' vs the reference layout's sums solved in fp64 (max relative difference) | "
        f"{s1['max_relative_difference_vs_reference_sums_fp64_inverse']:.1e} | | |",
        f"| stage 1 W' vs the reference layout's fp32 `torch.inverse` (max relative difference) | "
        f"{s1['max_relative_difference_vs_reference_fp32_inverse']:.1e} | | |",
        f"| stage 2 seconds per step | {lean['seconds_per_step']} | {three['seconds_per_step']} | |",
        f"| stage 2 peak RSS while training (GiB) | {lean['peak_rss_gib_training']} | "
        f"{three['peak_rss_gib_training']} | "
        f"{lean['peak_rss_gib_training'] / three['peak_rss_gib_training']:.0%} |",
        f"| stage 2 peak RSS, three UNets given conceptedit's activation strategy (GiB) | "
        f"{lean['peak_rss_gib_training']} | {three_lean['peak_rss_gib_training']} | "
        f"{lean['peak_rss_gib_training'] / three_lean['peak_rss_gib_training']:.0%} |",
    ]
    for label, c in r["trajectory_cache"].items():
        lines.append(
            f"| trajectory cache, {label} (bytes per trajectory) | {c['bytes_per_trajectory_sd14']:,} | "
            f"{c['reference_bytes_per_trajectory']:,} | {c['fraction_of_reference']:.1%} |"
        )
    lines += [
        "",
        f"Stage 1 prior: {s1['prior_captions']} COCO captions x 77 tokens, built once in "
        f"{s1['prior_build_seconds']} s and cached. Stage 2, {lean['steps']} steps, one sample per UNet call: "
        "conceptedit = one resident UNet (references by swapping the tensors they differ in), each call's graph "
        "rebuilt in backward one at a time, block checkpointing, text encoder and VAE parked on disk while "
        "training; reference layout = three resident fp32 UNets (trained, original, stage 1), nothing "
        "checkpointed, every module resident, each pass back-propagated on its own. The last row gives the "
        "three-UNet layout conceptedit's activation strategy, so the difference is the layout alone.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
