"""Attack benchmark on builtin:shapes: does an erasure hold when the prompt is attacked?

For each edit (the erasure benchmark's settings for red -> gray), the script applies it to a
fresh copy of builtin:shapes and runs the ``shapes-attack`` suite on the explicit red prompts
twice: with the UnlearnDiffAtk gradient attack and with its control, random prefix tokens under
the same generation budget. It reports the plain concept rate (no attack), both attack success
rates and the attack's wall time, to ``benchmarks/results/attack_shapes.{json,md}``.

    python benchmarks/attack_shapes.py              # 4 seeds per prompt, 16 attacked prompts per edit
    python benchmarks/attack_shapes.py --seeds 2
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from erasure_shapes import TARGETS, parse_args, peers, stage1, stage2, write_results
from rich.console import Console
from rich.table import Table

import conceptedit
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.evaluation.evaluate import evaluate
from conceptedit.plugins import get_host
from conceptedit.shapes.erasure import erase_concept_set
from conceptedit.shapes.world import ERASE_NAMES

TARGET = "red"
ATTACK = {"tokens": 5, "iterations": 40, "lr": 0.01, "check_every": 10}


def edits() -> dict[str, list[dict[str, Any]]]:
    """The edits to attack: TRCE stage 1 and 1+2, and each installed peer, as the erasure benchmark sets them."""
    return {
        "TRCE stage 1": [stage1(TARGET)],
        "TRCE 1+2": [stage1(TARGET), stage2(TARGET)],
        **peers(TARGET),
    }


def run(seeds: int) -> dict[str, Any]:
    host = get_host()
    base = conceptedit.load_model("builtin:shapes").pipeline
    anchor = TARGETS[TARGET]
    concepts = {
        TARGET: erase_concept_set(TARGET, anchor),
        f"{TARGET}_words": {"pairs": [[name, anchor] for name in ERASE_NAMES[TARGET]]},
    }
    work = Path(tempfile.mkdtemp(prefix="attack-shapes-"))
    rows = []
    try:
        for label, edit in edits().items():
            pipe = conceptedit.load_model("builtin:shapes").pipeline
            recipe = {
                "schema_version": 1,
                "model": "builtin:shapes",
                "device": "cpu",
                "seed": 0,
                "concepts": concepts,
                "edits": edit,
            }
            conceptedit.apply(recipe, pipeline=pipe, out=work / str(len(rows)), quiet=True)
            row: dict[str, Any] = {"edit": label}
            for strategy in ("random", "gradient"):
                options = {"target": TARGET, "seeds": seeds, "strategy": strategy, **ATTACK}
                spec = EvaluateSpec(suite="shapes-attack", options=options, steps=25, guidance=5.0, compare_base=False)
                started = time.perf_counter()
                (result,) = evaluate(pipe, [spec], host=host, base_pipeline=base)
                row[f"{strategy}_seconds"] = round(time.perf_counter() - started, 1)
                row["plain_shown"] = result.metrics["plain_shown"]
                row[f"{strategy}_asr"] = result.metrics["attack_success_rate"]
                row["prompts"] = result.n
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "target": TARGET,
        "seeds": seeds,
        "attack": ATTACK,
        "sampler": "DDIM 25 steps, CFG 5",
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Prompt attack on builtin:shapes",
        "",
        f"Target {result['target']} (erased toward gray); {result['rows'][0]['prompts']} attacked prompts per edit "
        f"(the explicit red prompts, {result['seeds']} seeds each); {result['sampler']}. Attack: UnlearnDiffAtk-style, "
        f"{result['attack']['tokens']} prefix tokens, {result['attack']['iterations']} Adam steps (lr "
        f"{result['attack']['lr']}), judged every {result['attack']['check_every']}; the control draws random prefix "
        "tokens for the same number of judged generations. Plain: share of images showing red without attack. "
        "ASR counts plain successes, as UnlearnDiffAtk does.",
        "",
        "| edit | plain shown | random-token ASR | UnlearnDiffAtk ASR | random s | attack s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['edit']} | {r['plain_shown']:.0%} | {r['random_asr']:.0%} | {r['gradient_asr']:.0%} | "
            f"{r['random_seconds']} | {r['gradient_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args(__doc__ or "")
    result = run(args.seeds)
    write_results(args.out, "attack_shapes", result, render(result))
    table = Table(title=f"prompt attack on builtin:shapes ({TARGET})")
    for col in ("edit", "plain shown", "random ASR", "UnlearnDiffAtk ASR", "random s", "attack s"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(
            r["edit"],
            f"{r['plain_shown']:.0%}",
            f"{r['random_asr']:.0%}",
            f"{r['gradient_asr']:.0%}",
            str(r["random_seconds"]),
            str(r["gradient_seconds"]),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
