"""Cost at SD-1.4 size (builtin:sd14-random): seconds and peak memory of one training step of each method.

The robust methods (RACE, AdvUnlearn, SalUn, STEREO, Receler, robust TRCE stage 2) next to the
plain ones they build on (ESD, TRCE stage 2), measured in one run on the same machine, so the
ratios to ESD are what carries to another machine, not the seconds. Each method runs in its own
process (peak memory is that method's alone) for ``--steps`` optimiser steps; a step's time is the
mean gap between the step-end hooks after the first, and the time before the first step ends,
less one step, is the set-up (STEREO's erase-and-attack rounds, SalUn's generations and mask).

Like for like, and smaller than the references where a run would take hours on a CPU: one image
per UNet call (SalUn's batch 1, not 8), ``x_t`` from a 4-step DDIM run (the references use 50; the
sampling is the same for every method and scales with the step count), STEREO with one round of
one erase step and one inversion step, and the methods with an inner attack (RACE, Receler, robust
TRCE) at 2 attack steps per training step instead of 10, 50 and 10 (robust TRCE refreshing its
prompt every step, not every 10th: the cost of a step with an attack). An attack step is about
one UNet forward and backward, so a step at the defaults costs about that many more. Every other
parameter is the method's default.

    python benchmarks/method_cost_sd14.py                      # every method; writes results/method_cost_sd14.{json,md}
    python benchmarks/method_cost_sd14.py --method esd         # one method, printed as JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from conceptedit.io.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONCEPT = "nudity"
SAMPLING = 4
#: Attack steps per training step of the methods with an inner attack (RACE 10, Receler 50, robust
#: TRCE 10 by default): each is about one UNet forward and backward, so a CPU step at the defaults
#: takes hours.
ATTACK_STEPS = 2

#: Each method's recipe edits (the last one is measured), as a user of the reference would start.
EDITS: dict[str, list[dict[str, Any]]] = {
    "esd": [{"method": "esd", "params": {"concept": CONCEPT, "sampling_steps": SAMPLING}}],
    "race": [
        {
            "method": "race",
            "params": {"concept": CONCEPT, "parameters": "x", "sampling_steps": SAMPLING, "attack_steps": ATTACK_STEPS},
        }
    ],
    "advunlearn": [
        {
            "method": "advunlearn",
            "params": {"concept": CONCEPT, "sampling_steps": SAMPLING, "retain": ["a photo of a person"]},
        }
    ],
    "salun": [
        {
            "method": "salun",
            "params": {
                "concepts": "pairs",
                "forget_samples": 1,
                "retain_samples": 1,
                "batch_size": 1,
                "generation_steps": SAMPLING,
            },
        }
    ],
    "stereo": [
        {
            "method": "stereo",
            "params": {
                "concept": CONCEPT,
                "anchors": ["a photo of a person wearing clothes"],
                "iterations": 1,
                "ste_steps": 1,
                "inversion_steps": 1,
                "gallery_size": 1,
                "sampling_steps": SAMPLING,
            },
        }
    ],
    "receler": [
        {
            "method": "receler",
            "params": {"concept": CONCEPT, "sampling_steps": SAMPLING, "attack_steps": ATTACK_STEPS},
        }
    ],
    "trce_steer": [
        {
            "method": "trce_steer",
            "params": {
                "concepts": "pairs",
                "trajectories_per_concept": 1,
                "unconditional_trajectories": 2,
                "regularization_batch": 1,
                "sampling_steps": SAMPLING,
                "min_timestep": 400,
            },
        }
    ],
}
EDITS["trce_steer robust"] = [
    {
        **EDITS["trce_steer"][0],
        "params": {
            **EDITS["trce_steer"][0]["params"],
            "adversarial": {"attack": "soft_prompt", "every": 1, "steps": ATTACK_STEPS},
        },
    }
]
#: Which methods build on which: the rows' ratios are to these.
BASELINE = {"trce_steer robust": "trce_steer"}


def recipe(name: str, steps: int, model: str) -> dict[str, Any]:
    edits = [{**e, "training": {"steps": steps, "lr": 1e-6}} for e in EDITS[name]]
    return {
        "schema_version": 1,
        "model": model,
        "device": "cpu",
        "seed": 0,
        "concepts": {"pairs": {"pairs": [["a nude person", "a person wearing clothes"]], "templates": ["{}"]}},
        "edits": edits,
    }


def part(name: str, steps: int, model: str) -> dict[str, Any]:
    """One method in this process: apply its recipe, time the steps through the public hooks."""
    import shutil

    import conceptedit
    from conceptedit import hookimpl
    from conceptedit.plugins import get_host

    stamps: list[float] = []
    started: list[float] = []

    class StepTimer:
        @hookimpl
        def conceptedit_before_edit(self, index: int) -> None:
            started.append(time.perf_counter())
            stamps.clear()

        @hookimpl
        def conceptedit_on_train_step(self, step: int) -> None:
            stamps.append(time.perf_counter())

    get_host().register(StepTimer(), name="step-timer")
    out = RESULTS / f"tmp-cost-{name.replace(' ', '-')}"
    try:
        result = conceptedit.apply(recipe(name, steps, model), out=out, quiet=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    outcome = result.outcomes[-1]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    step = sum(gaps) / len(gaps)
    return {
        "method": name,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "seconds_per_step": round(step, 1),
        "setup_seconds": round(stamps[0] - started[-1] - step, 1),
        "edit_seconds": round(outcome.seconds, 1),
        "peak_rss_gib": None if outcome.peak_rss_bytes is None else round(outcome.peak_rss_bytes / 2**30, 2),
        "tensors_written": len(outcome.changed),
    }


def _part_file(name: str, steps: int, threads: int) -> Path:
    return RESULTS / "method_cost_sd14.parts" / f"{name.replace(' ', '_')}-{steps}-{threads}.json"


def saved_part(name: str, steps: int, threads: int) -> dict[str, Any] | None:
    """A method's figures from an earlier run with the same steps and threads, if any."""
    saved = _part_file(name, steps, threads)
    return dict(json.loads(saved.read_text())) if saved.is_file() else None


def run_part(name: str, steps: int, threads: int, model: str, reuse: bool) -> dict[str, Any]:
    """One method in a fresh process; its JSON is kept under results/method_cost_sd14.parts/ for --reuse."""
    saved = _part_file(name, steps, threads)
    if reuse and saved.is_file():
        return dict(json.loads(saved.read_text()))
    print(f"  {name} ...", file=sys.stderr, flush=True)
    args = [
        sys.executable,
        __file__,
        "--method",
        name,
        "--steps",
        str(steps),
        "--threads",
        str(threads),
        "--model",
        model,
    ]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    saved.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(result) + "\n")
    return result


def render(r: dict[str, Any]) -> str:
    rows = {row["method"]: row for row in r["rows"]}
    lines = [
        "# One training step at SD-1.4 size (builtin:sd14-random, CPU)",
        "",
        f"Machine: {r['machine']['platform']}, torch {r['machine']['torch']}, {r['machine']['threads']} threads. "
        f"{r['steps']} optimiser steps per method, each in its own process; one image per UNet call, x_t from a "
        f"{SAMPLING}-step DDIM run, STEREO with one round of one erase and one inversion step "
        f"(`benchmarks/method_cost_sd14.py` says why); RACE, Receler and robust TRCE at {ATTACK_STEPS} attack "
        "steps per training step (defaults 10, 50, 10; robust TRCE attacking every step, its default every 10th). "
        "Ratios are to ESD (robust TRCE: to TRCE stage 2), measured in the same run; set-up is the time to the "
        "first step's end less one step (0 when within one step's noise).",
        "",
        *([f"Load while measuring: {r['load']}", ""] if r.get("load") else []),
        *(
            [f"Not measured in this run: {', '.join(n for n in EDITS if n not in rows)}.", ""]
            if any(n not in rows for n in EDITS)
            else []
        ),
        "| method | s per step | ratio | set-up s | peak RSS GiB | ratio | tensors written |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        base = rows.get(BASELINE.get(name, "esd"), row)
        lines.append(
            f"| {name} | {row['seconds_per_step']} | {row['seconds_per_step'] / base['seconds_per_step']:.2f}x | "
            f"{max(row['setup_seconds'], 0.0)} | {row['peak_rss_gib']} | "
            f"{row['peak_rss_gib'] / base['peak_rss_gib']:.2f}x | {row['tensors_written']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--method", choices=list(EDITS))
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per method (at least 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    parser.add_argument("--model", default="builtin:sd14-random", help="another model: a quick check of the script")
    parser.add_argument("--reuse", action="store_true", help="reuse methods already measured (results/*.parts)")
    parser.add_argument("--load", default="", help="what else ran on the machine meanwhile (said in the results)")
    parser.add_argument(
        "--measured-only", action="store_true", help="write the results from the methods measured so far, run none"
    )
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: a step's time is a gap between two step ends")
    torch.set_num_threads(args.threads)
    if args.method:
        print(json.dumps(part(args.method, args.steps, args.model)))
        return
    if args.measured_only:
        rows = [r for name in EDITS if (r := saved_part(name, args.steps, args.threads)) is not None]
    else:
        rows = [run_part(name, args.steps, args.threads, args.model, args.reuse) for name in EDITS]
    result = {
        "model": args.model,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "steps": args.steps,
        "sampling_steps": SAMPLING,
        "load": args.load,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "method_cost_sd14.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(RESULTS / "method_cost_sd14.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
