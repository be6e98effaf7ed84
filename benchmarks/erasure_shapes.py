"""Erasure benchmark on builtin:shapes: each recipe's erase rates next to what it preserved.

For each target concept (a colour and a shape) and each recipe (no edit, TRCE stage 1, TRCE
1+2, every other installed method with a configuration here, and a mix), the script applies
the recipe to a fresh copy of builtin:shapes, generates with fixed seeds, judges every image,
and reports explicit / implicit erase rates, preserved accuracy, pixel change on unrelated
prompts and the edit's wall time. Results go to ``benchmarks/results/erasure_shapes.{json,md}``
and one before/after grid per recipe (PNG).

    python benchmarks/erasure_shapes.py               # full run
    python benchmarks/erasure_shapes.py --seeds 2     # quicker, fewer images per prompt
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import conceptedit
from conceptedit.evaluation.sampling import grid
from conceptedit.plugins import get_host
from conceptedit.shapes.erasure import BaseImages, erase_concept_set, measure
from conceptedit.shapes.world import CONCEPTS, ERASE_NAMES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"red": "gray", "circle": "square"}  # concept -> what its prompts should draw instead
CAPTIONS = ROOT / "recipes" / "data" / "shapes_captions.txt"


def stage1(target: str) -> dict[str, Any]:
    """TRCE stage 1 as recipes/quickstart.yaml sets it for this model."""
    return {
        "method": "trce_eot",
        "name": f"trce_eot:{target}",
        "params": {
            "concepts": target,
            "eta": 0.04,
            "rows": {"eot": 1.0, "last_pad": 1.0},
            "prior": {"captions": str(CAPTIONS), "limit": None},
        },
    }


def stage2(target: str) -> dict[str, Any]:
    return {
        "method": "trce_steer",
        "name": f"trce_steer:{target}",
        "params": {
            "concepts": target,
            "prompt_template": "{}",
            "trajectories_per_concept": 1,
            "sampling_steps": 25,
            "unconditional_trajectories": 64,
            "guidance": 3.0,
        },
        "training": {"steps": 60, "lr": 2e-5},
    }


def peers(target: str) -> dict[str, list[dict[str, Any]]]:
    """One configuration per installed peer method, scaled to this 3M-parameter model (learning rates
    and step counts picked once on red and kept for every target; nothing tuned per target)."""
    kind = CONCEPTS[target].kind
    others = [c.name for c in CONCEPTS.values() if c.kind == kind and c.name != target]
    configs: dict[str, list[dict[str, Any]]] = {
        "esd": [
            {
                "method": "esd",
                "params": {"concept": target, "parameters": "x", "sampling_steps": 25},
                "training": {"steps": 100, "lr": 5e-5},
            }
        ],
        "ca": [
            {
                "method": "ca",
                "params": {"concepts": target, "generation_steps": 25, "generation_guidance": 5.0},
                "training": {"steps": 100, "lr": 3e-5},
            }
        ],
        # UCE and RECE edit word embeddings: they get the bare words ("red" -> "gray"), as for artists.
        "uce": [{"method": "uce", "params": {"concepts": f"{target}_words", "preserve": others}}],
        "rece": [
            {
                "method": "rece",
                "params": {"concepts": f"{target}_words", "preserve": others, "rounds": 1, "preserve_scale": 10.0},
            }
        ],
        # The shapes model settles colour and shape in its first steps: no warm-up.
        "sld": [{"method": "sld", "params": {"safety_concept": target, "preset": "medium", "warmup_steps": 0}}],
        "adavd": [{"method": "adavd", "params": {"erase": [target], "shift_center": 0.5}}],
    }
    installed = get_host().registry.methods
    return {name: edits for name, edits in configs.items() if name in installed}


def recipes() -> dict[str, list[dict[str, Any]]]:
    """Recipe edits per row label: no edit, TRCE 1 and 1+2, each installed peer, and mixes."""
    out: dict[str, list[dict[str, Any]]] = {"no edit": []}
    for target in TARGETS:
        out[f"TRCE stage 1 ({target})"] = [stage1(target)]
        out[f"TRCE 1+2 ({target})"] = [stage1(target), stage2(target)]
        for name, edits in peers(target).items():
            out[f"{name} ({target})"] = edits
    out["mix: TRCE red, then TRCE circle"] = [stage1("red"), stage1("circle")]
    if "esd" in get_host().registry.methods:
        out["mix: TRCE stage 1 red + ESD circle"] = [stage1("red"), *peers("circle")["esd"]]
    return out


def run(seeds: int, out: Path) -> dict[str, Any]:
    base_pipe = conceptedit.load_model("builtin:shapes").pipeline
    seed_list = list(range(seeds))
    bases = {t: BaseImages.generate(base_pipe, t, seed_list) for t in TARGETS}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="erasure-shapes-"))
    concepts = {t: erase_concept_set(t, anchor) for t, anchor in TARGETS.items()}
    for t, anchor in TARGETS.items():
        concepts[f"{t}_words"] = {"pairs": [[name, anchor] for name in ERASE_NAMES[t]]}
    try:
        for label, edits in recipes().items():
            pipe = conceptedit.load_model("builtin:shapes").pipeline
            seconds = 0.0
            if edits:
                recipe = {
                    "schema_version": 1,
                    "model": "builtin:shapes",
                    "device": "cpu",
                    "seed": 0,
                    "concepts": concepts,
                    "edits": edits,
                }
                started = time.perf_counter()
                conceptedit.apply(recipe, pipeline=pipe, out=work / "runs" / str(len(rows)), quiet=True)
                seconds = time.perf_counter() - started
            for base in bases.values():
                row = {"recipe": label, "edit_seconds": round(seconds, 2), **measure(pipe, base)}
                rows.append(row)
            _save_grid(label, pipe, base_pipe, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "seeds": seeds,
        "sampler": "DDIM 25 steps, CFG 5 (conceptedit.shapes.evaluate.SAMPLER)",
        "threads": torch.get_num_threads(),
        "targets": TARGETS,
        "rows": rows,
    }


def _save_grid(label: str, pipe: Any, base_pipe: Any, out: Path) -> None:
    from conceptedit.shapes.evaluate import generate

    prompts = [
        "a red circle",
        "a scarlet square",
        "a red triangle",
        "a blue circle",
        "a green square",
        "a yellow cross",
    ]
    seeds = [0] * len(prompts)
    before = [Image.fromarray(im) for im in generate(base_pipe, prompts, seeds)]
    after = [Image.fromarray(im) for im in generate(pipe, prompts, seeds)]
    slug = "".join(c if c.isalnum() else "_" for c in label).strip("_")
    out.mkdir(parents=True, exist_ok=True)
    grid([("base", before), ("edited", after)], min_cell=96).save(out / f"grid_{slug}.png")


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Erasure on builtin:shapes",
        "",
        f"{result['seeds']} seeds per prompt; {result['sampler']}. Erase rates: share of images in which the judge no "
        "longer finds the target. Preserved: judge accuracy on prompts without the target, relative to the base "
        "model. Unchanged: mean absolute pixel difference (0-1) from the base image, same prompt and seed. "
        "Each recipe is measured on both targets: on the target it did not erase, preserved includes prompts of "
        "the one it did ('a red square' is a preserve prompt for circle), so it drops by design. Peer settings are "
        "in peers() in the script, chosen once on red and kept for circle; TRCE's are recipes/quickstart.yaml's.",
        "",
        "| recipe | target | explicit erase | implicit erase | preserved | unchanged | edit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['recipe']} | {r['target']} | {r['explicit_erase']:.0%} | {r['implicit_erase']:.0%} | "
            f"{r['preserved']:.0%} | {r['unchanged_pixel_difference']:.3f} | {r['edit_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(doc: str) -> argparse.Namespace:
    """The options the shapes benchmarks share (seeds, results folder, threads); sets the threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def write_results(out: Path, stem: str, result: dict[str, Any], markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` in the results folder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)


def main() -> None:
    args = parse_args(__doc__ or "")
    result = run(args.seeds, args.out)
    write_results(args.out, "erasure_shapes", result, render(result))
    table = Table(title="erasure on builtin:shapes")
    for col in ("recipe", "target", "explicit erase", "implicit erase", "preserved", "unchanged", "edit s"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(
            r["recipe"],
            r["target"],
            f"{r['explicit_erase']:.0%}",
            f"{r['implicit_erase']:.0%}",
            f"{r['preserved']:.0%}",
            f"{r['unchanged_pixel_difference']:.3f}",
            str(r["edit_seconds"]),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
