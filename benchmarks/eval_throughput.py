"""Evaluation throughput on builtin:shapes: images per second for 1 and 2 processes, next to plain diffusers.

Runs ``conceptedit eval builtin:shapes --suite shapes-explicit`` (every explicit prompt, ``--seeds``
images each, one torch thread per process) single-process and under torchrun with two processes,
and, in the same run, plain diffusers: ``StableDiffusionPipeline.from_pretrained`` on the same
folder called on the same prompts and seeds with the same steps, guidance and batch (one seeded
generator per image, as the evaluation does), in a process of its own. It reports images/s of each
whole command (model loading included). Results go to ``benchmarks/results/eval_throughput.{json,md}``.

    python benchmarks/eval_throughput.py [--seeds 8]

``--sd14`` measures generation at SD-1.4 size instead (builtin:sd14-random, a few images): the
evaluation's sampler (:func:`conceptedit.evaluation.sampling.sample`: prompts encoded by the adapter,
the pipeline called on embeddings, latents decoded as the pipeline decodes them) against the plain
``StableDiffusionPipeline`` call on the same pipeline object, same prompts, seeds, steps, guidance,
size and batch, alternating in one process (paired runs; the faster of each kind is kept). Results go
to ``benchmarks/results/eval_throughput_sd14[_cuda].{json,md}``; ``--device cuda`` runs it on a GPU.

    python benchmarks/eval_throughput.py --sd14 [--device cuda]
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


#: SD-1.4-size generation: prompts (one image each), DDIM steps, guidance, size, repetitions of each kind.
SD14_PROMPTS = ["a photo of a cat on a sofa", "a watercolour of a lighthouse at dusk"]
SD14_STEPS, SD14_SIZE, SD14_REPEATS = 10, 256, 2


def measure_sd14(device: str) -> dict[str, Any]:
    """conceptedit's evaluation sampler vs the plain pipeline call at SD-1.4 size, paired in one process."""
    import torch

    from conceptedit.evaluation.sampling import sample
    from conceptedit.models.backbone import resolve_backbone
    from conceptedit.models.builtin import build_sd14_random
    from conceptedit.plugins import get_host

    pipe = build_sd14_random(device=device)
    pipe.set_progress_bar_config(disable=True)
    adapter = resolve_backbone(pipe, get_host().registry.backbones)
    seeds = list(range(len(SD14_PROMPTS)))

    def ours() -> None:
        hidden = adapter.encode_prompts(SD14_PROMPTS).hidden.to(adapter.dtype)
        sample(pipe, adapter, hidden, seeds, steps=SD14_STEPS, guidance=GUIDANCE, height=SD14_SIZE, width=SD14_SIZE)

    def plain() -> None:
        pipe(
            SD14_PROMPTS,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            num_inference_steps=SD14_STEPS,
            guidance_scale=GUIDANCE,
            height=SD14_SIZE,
            width=SD14_SIZE,
            output_type="pil",
        )

    times: dict[str, list[float]] = {"conceptedit": [], "plain": []}
    for _ in range(SD14_REPEATS):
        for name, run in (("plain", plain), ("conceptedit", ours)):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    images = len(SD14_PROMPTS)
    rows = {name: _row(1, images, min(seconds)) for name, seconds in times.items()}
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {
        "machine": {"platform": platform.platform(), "device": device, "device_name": name},
        "threads": torch.get_num_threads(),
        "settings": {"steps": SD14_STEPS, "guidance": GUIDANCE, "size": SD14_SIZE, "batch": images},
        "seconds_each": {k: [round(v, 2) for v in seconds] for k, seconds in times.items()},
        **rows,
    }


def write_sd14(result: dict[str, Any]) -> None:
    device = result["machine"]["device"]
    stem = "eval_throughput_sd14" if device == "cpu" else f"eval_throughput_sd14_{device}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    s, plain, ours = result["settings"], result["plain"], result["conceptedit"]
    lines = [
        f"# Generation throughput at SD-1.4 size (builtin:sd14-random, {device.upper()})",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['device_name']}, "
        f"{result['threads']} torch threads. {s['batch']} images per call, DDIM {s['steps']} steps, CFG "
        f"{s['guidance']}, {s['size']}x{s['size']}; the faster of {SD14_REPEATS} runs of each, alternating in one "
        "process. conceptedit = the evaluation's sampler (adapter encodes the prompts, pipeline on "
        "embeddings, decode); plain = `StableDiffusionPipeline.__call__` on the same pipeline object.",
        "",
        "| sampler | images | seconds | images/s | x plain diffusers |",
        "|---|---|---|---|---|",
        f"| plain diffusers | {plain['images']} | {plain['seconds']} | "
        f"{plain['images'] / plain['seconds']:.4f} | 1.00 |",
        f"| conceptedit evaluation sampler | {ours['images']} | {ours['seconds']} | "
        f"{ours['images'] / ours['seconds']:.4f} | {plain['seconds'] / ours['seconds']:.2f} |",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--sd14", action="store_true", help="generation at SD-1.4 size instead of builtin:shapes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where --sd14 runs")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the plain-diffusers child
    args = parser.parse_args()
    if args.sd14:
        write_sd14(measure_sd14(args.device))
        return
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
