"""Evaluation throughput on builtin:shapes: images per second for 1 and 2 processes, next to plain diffusers.

Runs ``conceptedit eval builtin:shapes --suite shapes-explicit`` (every explicit prompt, ``--seeds``
images each, one torch thread per process) single-process and under torchrun with two processes,
and, in the same run, plain diffusers: ``StableDiffusionPipeline.from_pretrained`` on the same
folder called on the same prompts and seeds with the same steps, guidance and batch (one seeded
generator per image, as the evaluation does), in a process of its own. It reports images/s of each
whole command (model loading included). Results go to ``benchmarks/results/eval_throughput.{json,md}``.

    python benchmarks/eval_throughput.py [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: The evaluation's sampler defaults (``EvaluateSpec``), which the plain-diffusers run copies.
STEPS, GUIDANCE, BATCH = 25, 7.5, 16


def plain_diffusers(seeds: int) -> int:
    """Sample what the evaluation samples with a bare ``StableDiffusionPipeline``; returns the image count."""
    import torch
    from diffusers import StableDiffusionPipeline

    from conceptedit.shapes.model import SHAPES_MODEL_DIR
    from conceptedit.shapes.world import explicit_prompts

    pipe = StableDiffusionPipeline.from_pretrained(
        str(SHAPES_MODEL_DIR), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pairs = [(prompt.text, seed) for prompt in explicit_prompts() for seed in range(seeds)]
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        pipe(
            [text for text, _ in chunk],
            generator=generators,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="np",
        )
    return len(pairs)


def measure_plain(seeds: int) -> dict[str, Any]:
    seconds, stdout = _timed([sys.executable, __file__, "--plain", "--seeds", str(seeds)])
    return _row(1, int(stdout.strip().splitlines()[-1]), seconds)


def _timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of ``command``, one torch thread per process."""
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return seconds, done.stdout


def _row(processes: int, images: int, seconds: float) -> dict[str, Any]:
    return {
        "processes": processes,
        "images": images,
        "seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 2),
    }


def measure(processes: int, seeds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        args = [
            "-m",
            "conceptedit",
            "eval",
            "builtin:shapes",
            "--suite",
            "shapes-explicit",
            "--option",
            f"seeds={seeds}",
            "--steps",
            str(STEPS),
            "--guidance",
            str(GUIDANCE),
            "--device",
            "cpu",
            "--out",
            out,
            "-q",
        ]
        launcher = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(processes),
                "--master_port",
                "29531",
            ]
            if processes > 1
            else [sys.executable]
        )
        seconds, _ = _timed([*launcher, *args])
        images = json.loads((Path(out) / "metrics.json").read_text())["suites"][0]["n"]
    return _row(processes, images, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the plain-diffusers child
    args = parser.parse_args()
    if args.plain:
        import torch

        torch.set_num_threads(1)
        print(plain_diffusers(args.seeds))
        return
    plain = measure_plain(args.seeds)
    rows = [measure(n, args.seeds) for n in (1, 2)]
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    result = {
        "machine": machine,
        "runs": rows,
        "plain_diffusers": plain,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Evaluation throughput on builtin:shapes (CPU, one torch thread per process)",
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs. Whole command, model "
        f"loading included; DDIM {STEPS} steps, CFG {GUIDANCE}, batch {BATCH}, 32x32. Plain diffusers: "
        "`StableDiffusionPipeline` on the same prompts, seeds and settings, generating only (no judging, "
        "no report), in the same run.",
        "",
        "| command | processes | images | seconds | images/s | x plain diffusers |",
        "|---|---|---|---|---|---|",
    ]
    base = plain["images_per_second"]
    for label, r in [("plain diffusers", plain), *(("conceptedit eval", r) for r in rows)]:
        lines.append(
            f"| {label} | {r['processes']} | {r['images']} | {r['seconds']} | {r['images_per_second']} | "
            f"{r['images_per_second'] / base:.2f} |"
        )
    (RESULTS / "eval_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
