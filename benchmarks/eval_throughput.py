"""Evaluation throughput on builtin:shapes: images per second for 1 and 2 processes.

Runs ``conceptedit eval builtin:shapes --suite shapes-explicit`` (all 24 explicit prompts,
``--seeds`` images each, one torch thread per process) single-process and under torchrun with
two processes, and reports images/s of the whole command (model loading included) next to the
number of images. Results go to ``benchmarks/results/eval_throughput.{json,md}``.

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
        started = time.perf_counter()
        done = subprocess.run(
            [*launcher, *args], capture_output=True, text=True, check=False, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        images = json.loads((Path(out) / "metrics.json").read_text())["suites"][0]["n"]
    return {
        "processes": processes,
        "images": images,
        "seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    args = parser.parse_args()
    rows = [measure(n, args.seeds) for n in (1, 2)]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Evaluation throughput on builtin:shapes (CPU, one torch thread per process)",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs. Whole command, model "
        "loading included; DDIM 25 steps, CFG 7.5, 32x32.",
        "",
        "| processes | images | seconds | images/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['processes']} | {r['images']} | {r['seconds']} | {r['images_per_second']} |" for r in rows]
    (RESULTS / "eval_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
