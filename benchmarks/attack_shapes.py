"""Robustness benchmark on builtin:shapes: every method against every attack family, run on the edited model.

For each target of the erasure benchmark (``erasure_shapes.py``: two colours, two shapes, each with
an anchor) and each edit (TRCE stage 1 and 1+2, robust TRCE, the peers, the robust methods and the
mixes), the edit is applied to a fresh builtin:shapes and measured on the **held-out contexts**:

* erased (strict judge) and kept (neighbours in the same contexts and explicit prompts without the
  target, relative to the base model), as in the erasure benchmark;
* the attack success rate (ASR) of five families on the target's held-out-context prompts, each
  attack-run against the edited model: UnlearnDiffAtk (discrete prefix tokens), its random-token
  control, soft-prompt PGD (continuous prefix), concept inversion (CCE: a free token in the target
  word's place, fitted to the base model's image) and Ring-A-Bell (a discrete prompt searched on
  the base model's text encoder, carrying the target's concept vector);
* each family's **chance baseline** per target: the same attack on the base model with neighbour
  prompts, aimed at the neighbours (their own images; Ring-A-Bell without the concept vector), how
  often the target shows anyway;
* the edit's wall time and peak memory (from the run's manifest), and each attack's cost.

Every rate has n and a Wilson 95% interval. Outputs: ``benchmarks/results/attack_shapes.{json,md}``
(rewritten after each row, ``"partial": true`` until the run ends) and
``attack_shapes_frontier.png`` (kept vs worst-attack ASR). The new methods' settings on this model
are this file's guesses (:data:`ROBUST`), not tuned: their rows say so.

    python benchmarks/attack_shapes.py                                    # every edit, 4 targets
    python benchmarks/attack_shapes.py --targets red --edits "TRCE 1+2" "TRCE robust"
    python benchmarks/attack_shapes.py --merge attack_shapes_a attack_shapes_b   # runs split by target
    python benchmarks/attack_shapes.py --tune 4 --seeds 2 --targets red circle  # robust settings, tuning split
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import erasure_shapes as es
from frontier import Point, plot

import conceptedit
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.evaluation.evaluate import evaluate
from conceptedit.evaluation.stats import Rate
from conceptedit.plugins import get_host
from conceptedit.shapes.world import explicit_prompts

#: Each attack family's suite options (the erasure benchmark's UDA budget; one judged image per check).
FAMILIES: dict[str, dict[str, Any]] = {
    "uda": {"strategy": "gradient", **es.ATTACK},
    "random": {"strategy": "random", **es.ATTACK},
    "soft_prompt": {"strategy": "soft_prompt", "iterations": 40, "check_every": 10},
    "concept_inversion": {"strategy": "concept_inversion", "iterations": 100, "check_every": 25},
    "ring_a_bell": {"strategy": "ring_a_bell", "ring_population": 50, "ring_generations": 100},
}
#: How each family's chance baseline differs from the attack (besides base model and neighbour prompts).
CHANCE: dict[str, dict[str, Any]] = {"ring_a_bell": {"ring_strength": 0.0}}

#: The robust options and methods, with this file's untuned settings for a 5M-parameter model
#: (SPEED, the closed-form method added with them, runs at its reference defaults).
ROBUST: dict[str, Any] = {
    "trce_stage1_adversarial": {"rounds": 2, "regular_scale": 0.1},
    "trce_stage2_adversarial": {"attack": "soft_prompt", "tokens": 5, "steps": 10, "every": 10},
    "race": {"steps": 100, "lr": 5e-5, "epsilon": 0.1},
    "advunlearn": {"steps": 100, "lr": 1e-4},
    "salun": {"steps": 100, "lr": 1e-4, "samples": 32},
    "stereo": {"steps": 100, "lr": 5e-5, "ste_steps": 50, "ste_lr": 5e-5, "inversion_steps": 100},
    "receler": {"steps": 100, "lr": 3e-4, "rank": 32, "attack_steps": 10},
}


def robust_edits(target: str, prior: Path) -> dict[str, list[dict[str, Any]]]:
    """Robust TRCE and the robust methods installed, as recipe edits for ``target``."""
    s1, s2 = es.stage1(target, prior), es.stage2(target)
    s1["params"]["adversarial"] = ROBUST["trce_stage1_adversarial"]
    s2["params"]["adversarial"] = ROBUST["trce_stage2_adversarial"]
    esd = es.peers(target)["esd"][0]
    r, a, sl = ROBUST["race"], ROBUST["advunlearn"], ROBUST["salun"]
    configs: dict[str, list[dict[str, Any]]] = {
        "TRCE robust": [s1, s2],
        "race": [
            esd,
            {
                "method": "race",
                "params": {"concept": target, "parameters": "x", "sampling_steps": 25, "epsilon": r["epsilon"]},
                "training": {"steps": r["steps"], "lr": r["lr"]},
            },
        ],
        "advunlearn": [
            {
                "method": "advunlearn",
                "params": {"concept": target, "sampling_steps": 25, "trajectories": 16},
                "training": {"steps": a["steps"], "lr": a["lr"]},
            }
        ],
        "salun": [salun(target, sl["steps"], sl["lr"])],
    }
    st = ROBUST["stereo"]
    configs["stereo"] = [
        {
            "method": "stereo",
            "params": {
                "concept": target,
                "anchors": _anchors(target),
                "parameters": "x",
                "ste_steps": st["ste_steps"],
                "ste_lr": st["ste_lr"],
                "inversion_steps": st["inversion_steps"],
                "sampling_steps": 25,
                "gallery_guidance": 5.0,
            },
            "training": {"steps": st["steps"], "lr": st["lr"]},
        }
    ]
    configs["speed"] = [{"method": "speed", "params": {"concepts": f"{target}_words", "retain": _neighbours(target)}}]
    rc = ROBUST["receler"]
    receler_params = {"concept": target, "rank": rc["rank"], "attack_steps": rc["attack_steps"], "sampling_steps": 25}
    configs["receler"] = [
        {"method": "receler", "params": receler_params, "training": {"steps": rc["steps"], "lr": rc["lr"]}}
    ]
    configs["TRCE robust, tuned"] = robust_grid(target, prior)[TUNED]
    installed = get_host().registry.methods
    return {label: edit for label, edit in configs.items() if all(e["method"] in installed for e in edit)}


#: Concept inversion as robust TRCE's stage 2 adversary: one free token in the concept's place.
INVERSION_STEER: dict[str, Any] = {"attack": "concept_inversion", "tokens": 1, "steps": 20, "step_size": 0.02}


def salun(target: str, steps: int, lr: float) -> dict[str, Any]:
    """SalUn on ``target`` with :data:`ROBUST`'s sample counts, ``steps`` and ``lr``."""
    samples = ROBUST["salun"]["samples"]
    return {
        "method": "salun",
        "params": {
            "concepts": target,
            "forget_samples": samples,
            "retain_samples": samples,
            "generation_steps": 25,
            "generation_guidance": 5.0,
        },
        "training": {"steps": steps, "lr": lr},
    }


def robust_grid(target: str, prior: Path) -> dict[str, list[dict[str, Any]]]:
    """The settings ``--tune 4`` tries on the tuning split, aimed at the issue's targets (UDA <= 10%,
    concept inversion <= 25%, kept >= 95%): which adversary robust TRCE trains against, how hard,
    and SalUn gentler than :data:`ROBUST`, alone and after TRCE."""
    s1, s2 = es.stage1(target, prior), es.stage2(target)
    s1_adv = {**s1, "params": {**s1["params"], "adversarial": ROBUST["trce_stage1_adversarial"]}}

    def steer(**adversarial: Any) -> dict[str, Any]:
        return {**s2, "params": {**s2["params"], "adversarial": adversarial}}

    gentle = salun(target, steps=100, lr=3e-5)
    return {
        "TRCE 1+2, stage 2 vs soft prompt": [s1, steer(**ROBUST["trce_stage2_adversarial"])],
        "TRCE 1+2, stage 2 vs inversion": [s1, steer(**INVERSION_STEER, every=10)],
        "TRCE 1+2, stage 2 vs inversion x3": [s1, steer(**INVERSION_STEER, every=5, weight=3.0)],
        "TRCE robust, stage 2 vs inversion": [s1_adv, steer(**INVERSION_STEER, every=10)],
        "salun lr 3e-5": [gentle],
        "TRCE 1+2 + salun lr 3e-5": [s1, s2, gentle],
    }


#: The robust_grid entry --tune 4 chose on red and circle (results/attack_shapes_tuning_red_circle.json),
#: measured on the held-out split as "TRCE robust, tuned".
TUNED = "TRCE 1+2, stage 2 vs inversion"

#: The attack families the tuning sweep runs (the targets' families; Ring-A-Bell and soft prompts are
#: weaker than these on every measured edit).
TUNING_FAMILIES = ("uda", "random", "concept_inversion")


def tune(
    targets: Iterable[str], seeds: int, pick: Sequence[int] = (), save: Callable[[dict[str, Any]], None] = print
) -> dict[str, Any]:
    """Each :func:`robust_grid` entry on the tuning split only: erased, anchor reached, tuning
    neighbours kept (relative to the base model) and the tuning families' ASR on tuning prompts;
    ``save`` gets the sweep so far after each entry (``"partial": true``)."""
    targets = list(targets)
    host = get_host()
    base = conceptedit.load_model("builtin:shapes").pipeline
    work = Path(tempfile.mkdtemp(prefix="attack-shapes-tune-"))
    base_kept = {t: es._tuning_metrics(base, t, es.TARGETS[t], seeds)[1]["both_correct"] for t in targets}
    trials: list[dict[str, Any]] = []
    try:
        labels = list(robust_grid(targets[0], work))
        for label in [labels[i] for i in pick] if pick else labels:
            scores = []
            for target in targets:
                anchor = es.TARGETS[target]
                edit = robust_grid(target, es._prior(work, target))[label]
                pipe = es.apply_edit(es.concept_sets(target, anchor), edit, work / f"t{len(trials)}-{target}").pipeline
                tuning, nb, _ = es._tuning_metrics(pipe, target, anchor, seeds)
                entry = {
                    "target": target,
                    "erased_strict": tuning["erased_strict"],
                    "anchor_reached": tuning["anchor_reached"],
                    "neighbours_kept": nb["both_correct"] / base_kept[target] if base_kept[target] else 0.0,
                }
                for family in TUNING_FAMILIES:
                    options = {**es._attack_options(target, "gradient", "tuning", es._stride(target))}
                    spec = es._spec("shapes-attack", {**options, **FAMILIES[family]})
                    (r,) = evaluate(pipe, [spec], host=host, base_pipeline=base)
                    entry[f"asr_{family}"] = r.metrics["attack_success_rate"]
                scores.append(entry)
            trial = {"edit": label, "scores": scores, "score": tuning_score(scores)}
            trials.append(trial)
            print(json.dumps(trial), flush=True)
            save({**sweep(trials, seeds), "partial": True})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sweep(trials, seeds)


def sweep(trials: Sequence[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """A tuning sweep's record: its protocol, every trial, and the entry :func:`tuning_score` picks."""
    return {
        "split": "shapes-tuning, shapes-tuning-neighbours; attacks on the tuning prompts",
        "seeds": seeds,
        "families": {f: FAMILIES[f] for f in TUNING_FAMILIES},
        "rule": tuning_score.__doc__,
        "trials": list(trials),
        "chosen": max(trials, key=lambda t: t["score"])["edit"] if trials else None,
    }


def tuning_score(scores: Sequence[dict[str, Any]]) -> float:
    """Mean over the targets of erased + neighbours kept − the worst of UDA and concept inversion:
    a setting must erase, keep and hold against both attacks."""
    per_target = [
        s["erased_strict"] + s["neighbours_kept"] - max(s["asr_uda"], s["asr_concept_inversion"]) for s in scores
    ]
    return sum(per_target) / len(per_target)


def _neighbours(target: str) -> list[str]:
    """The other colours (or shapes): SPEED's retain set, as UCE's preserve set in the erasure benchmark."""
    kind = es.CONCEPTS[target].kind
    return [c.name for c in es.CONCEPTS.values() if c.kind == kind and c.name != target]


def _anchors(target: str) -> list[str]:
    """STEREO's anchor prompts: the target's anchor with every other attribute of the other kind."""
    anchor = es.TARGETS[target]
    kind = es.CONCEPTS[target].kind
    return [p.text for p in explicit_prompts() if (p.colour if kind == "colour" else p.shape) == anchor]


def edits(target: str, prior: Path) -> dict[str, list[dict[str, Any]]]:
    """The erasure benchmark's edits and the robust ones."""
    return {**es.edits(target, prior), **robust_edits(target, prior)}


# ------------------------------------------------------------------ measuring


def attack_spec(target: str, family: str, *, chance: bool = False) -> EvaluateSpec:
    prompts = "neighbours" if chance else "held-out contexts"
    stride = 3 * es._stride(target) if chance else es._stride(target)
    options = {**es._attack_options(target, "gradient", prompts, stride), **FAMILIES[family]}
    if chance:
        options |= CHANCE.get(family, {})
    return es._spec("shapes-attack", options)


def measure(pipe: Any, base: Any, target: str, anchor: str, seeds: int) -> dict[str, Any]:
    """Held-out-context erase/keep suites, then every attack family against ``pipe``."""
    host = get_host()
    results: dict[str, Any] = {}
    for key, spec in es.specs(target, anchor, seeds, attacks=False).items():
        (result,) = evaluate(pipe, [spec], host=host)
        results[key] = result.metrics
    for family in FAMILIES:
        (result,) = evaluate(pipe, [attack_spec(target, family)], host=host, base_pipeline=base)
        results[f"attack_{family}"] = result.metrics
    return results


def row(label: str, target: str, metrics: dict[str, Any], base: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
    c, nb, pr = metrics["contexts"], metrics["neighbours"], metrics["preserve"]
    kept_k = nb["both_correct"] * nb["both_correct_n"] + pr["both_correct"] * pr["both_correct_n"]
    base_k = (
        base["neighbours"]["both_correct"] * nb["both_correct_n"]
        + base["preserve"]["both_correct"] * pr["both_correct_n"]
    )
    out: dict[str, Any] = {
        "edit": label,
        "target": target,
        **cost,
        "tuned": label in ("no edit", "TRCE robust, tuned") or label in es.edits(target, Path("prior")),
        "erased_strict": es._interval(c, "erased_strict"),
        "anchor_reached": es._interval(c, "anchor_reached"),
        "phrasings_erased_strict": es._interval(metrics["phrasings"], "erased_strict"),
        "kept_accuracy": Rate.of(round(kept_k), int(nb["both_correct_n"] + pr["both_correct_n"])).as_dict(),
        "kept_relative": kept_k / base_k if base_k else float("nan"),
    }
    for family in FAMILIES:
        attacked = metrics[f"attack_{family}"]
        out[f"asr_{family}"] = es._interval(attacked, "attack_success_rate")
        out[f"cost_{family}"] = {
            "generations_per_prompt": attacked.get("attack_generations_per_prompt"),
            "seconds": attacked.get("attack_seconds"),
        }
    return out


def _cost(outcomes: Sequence[Any], seconds: float) -> dict[str, Any]:
    """Wall time, and the highest resident memory any of the run's edits reached."""
    peaks = [o.peak_rss_bytes for o in outcomes if o.peak_rss_bytes]
    return {"edit_seconds": round(seconds, 1), "edit_peak_gib": round(max(peaks) / 2**30, 2) if peaks else None}


def run(
    targets: Iterable[str],
    seeds: int,
    only: Sequence[str] = (),
    save: Callable[[dict[str, Any]], None] = print,
) -> dict[str, Any]:
    """Every edit on every target; ``save`` gets the result so far after each row."""
    targets = list(targets)
    host = get_host()
    base = conceptedit.load_model("builtin:shapes").pipeline
    work = Path(tempfile.mkdtemp(prefix="attack-shapes-"))
    rows: list[dict[str, Any]] = []
    chance: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {
        "seeds": seeds,
        "sampler": f"DDIM {es.SAMPLER['steps']} steps, CFG {es.SAMPLER['guidance']}",
        "targets": {t: es.TARGETS[t] for t in targets},
        "families": FAMILIES,
        "chance_differences": CHANCE,
        "robust_settings": ROBUST,
        "chance": chance,
        "rows": rows,
    }

    def add(r: dict[str, Any]) -> None:
        rows.append(r)
        _print(r)
        save({**result, "partial": True})

    try:
        for target in targets:
            anchor = es.TARGETS[target]
            prior = es._prior(work, target)
            concepts = es.concept_sets(target, anchor)
            base_metrics = measure(base, base, target, anchor, seeds)
            chance[target] = {}
            for family in FAMILIES:
                (r,) = evaluate(base, [attack_spec(target, family, chance=True)], host=host, base_pipeline=base)
                chance[target][family] = es._interval(r.metrics, "attack_success_rate")
            add(row("no edit", target, base_metrics, base_metrics, {"edit_seconds": 0.0, "edit_peak_gib": None}))
            for label, edit in edits(target, prior).items():
                if only and label not in only:
                    continue
                applied = es.apply_edit(concepts, edit, work / f"{target}-{len(rows)}")
                cost = _cost(applied.outcomes, applied.seconds)
                add(row(label, target, measure(applied.pipeline, base, target, anchor, seeds), base_metrics, cost))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


# ------------------------------------------------------------------ reporting


def worst(r: dict[str, Any]) -> dict[str, float]:
    """The attack (random control excluded) with the highest success rate on this row."""
    return max((r[f"asr_{f}"] for f in FAMILIES if f != "random"), key=lambda rate: rate["rate"])


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per edit, each rate pooled over targets (Wilson interval over all images or prompts)."""
    out = []
    for label in dict.fromkeys(r["edit"] for r in rows):
        mine = [r for r in rows if r["edit"] == label]
        entry: dict[str, Any] = {"edit": label, "targets": sorted(r["target"] for r in mine)}
        keys = ["erased_strict", "anchor_reached", "kept_accuracy", *(f"asr_{f}" for f in FAMILIES)]
        for key in keys:
            k = sum(r[key]["rate"] * r[key]["n"] for r in mine)
            n = sum(r[key]["n"] for r in mine)
            entry[key] = Rate.of(round(k), int(n)).as_dict()
        entry["asr_worst"] = {"rate": sum(worst(r)["rate"] for r in mine) / len(mine)}
        entry["kept_relative"] = sum(r["kept_relative"] for r in mine) / len(mine)
        entry["edit_seconds"] = sum(r["edit_seconds"] for r in mine) / len(mine)
        peaks = [r["edit_peak_gib"] for r in mine if r.get("edit_peak_gib")]
        entry["edit_peak_gib"] = max(peaks) if peaks else None
        entry["tuned"] = all(r["tuned"] for r in mine)
        out.append(entry)
    return out


def render(result: dict[str, Any]) -> str:
    pct = es._pct
    names = {
        "uda": "UDA",
        "random": "random tokens",
        "soft_prompt": "soft prompt",
        "concept_inversion": "concept inversion",
        "ring_a_bell": "Ring-A-Bell",
    }
    head = " | ".join(names[f] for f in FAMILIES)
    lines = [
        "# Robustness on builtin:shapes: attack-run ASR on held-out contexts",
        "",
        f"{result['seeds']} seeds for erase/keep; attacks 1 seed; {result['sampler']}; targets (anchor): "
        + ", ".join(f"{t} ({a})" for t, a in result["targets"].items())
        + ". Every ASR is **attack-run** against the edited model on the target's held-out-context prompts "
        "(strict judge; plain successes count), with a Wilson 95% interval over prompts. Erased and kept as in "
        "`erasure_shapes.md`. Rows marked * use this file's untuned settings (`ROBUST`).",
        "",
        *(["**A partial run**: the rows measured before it stopped.", ""] if result.get("partial") else []),
        "## Pooled over the targets",
        "",
        f"| edit | targets | erased | kept (rel.) | {head} | worst attack (mean) | edit s | peak GiB |",
        "|---|---|---|---|" + "---|" * len(FAMILIES) + "---|---|---|",
    ]
    for s in summary(result["rows"]):
        attacks = " | ".join(pct(s[f"asr_{f}"]) for f in FAMILIES)
        lines.append(
            f"| {s['edit']}{'' if s['tuned'] else ' *'} | {', '.join(s['targets'])} | {pct(s['erased_strict'])} | "
            f"{s['kept_relative']:.1%} | {attacks} | {s['asr_worst']['rate']:.0%} | {s['edit_seconds']:.0f} | "
            f"{es._num(s['edit_peak_gib'])} |"
        )
    lines += [
        "",
        "## Chance baselines (base model, neighbour prompts, the target by accident)",
        "",
        f"| target | {head} |",
        "|---|" + "---|" * len(FAMILIES),
    ]
    for target, chance in result["chance"].items():
        lines.append(f"| {target} | " + " | ".join(pct(chance[f]) for f in FAMILIES) + " |")
    lines += ["", "## Every edit and target", "", f"| edit | target | erased | kept rel. | {head} |"]
    lines.append("|---|---|---|---|" + "---|" * len(FAMILIES))
    for r in result["rows"]:
        attacks = " | ".join(pct(r[f"asr_{f}"]) for f in FAMILIES)
        lines.append(
            f"| {r['edit']} | {r['target']} | {pct(r['erased_strict'])} | {r['kept_relative']:.1%} | {attacks} |"
        )
    lines += [
        "",
        "Attack cost per family over the edited models (judged generations per prompt, seconds per suite):",
        "",
    ]
    for family in FAMILIES:
        edited = [r for r in result["rows"] if r["edit"] != "no edit"]
        costs = [r[f"cost_{family}"] for r in edited if r[f"cost_{family}"]["seconds"] is not None]
        if costs:
            gens = sum(c["generations_per_prompt"] or 0 for c in costs) / len(costs)
            secs = sum(c["seconds"] for c in costs) / len(costs)
            lines.append(f"- {names[family]}: {gens:.1f} generations per prompt, {secs:.0f} s per suite")
    return "\n".join(lines) + "\n"


def _print(r: dict[str, Any]) -> None:
    attacks = "  ".join(f"{f} {r[f'asr_{f}']['rate']:.0%}" for f in FAMILIES)
    print(
        f"{r['target']:>7} | {r['edit']:<24} erased {es._pct(r['erased_strict'])}  kept {r['kept_relative']:.1%}  "
        f"{attacks}  ({r['edit_seconds']} s)",
        flush=True,
    )


def frontier(result: dict[str, Any], path: Path) -> None:
    """Kept (x) against robustness, 1 − the worst attack's ASR (y): up and right is better."""
    points = []
    for s in summary(result["rows"]):
        rates = [s[f"asr_{f}"] for f in FAMILIES if f != "random"]
        top = max(rates, key=lambda rate: rate["rate"])
        points.append(
            Point(
                s["edit"],
                min(s["kept_relative"], 1.0),
                (s["kept_accuracy"]["low"], s["kept_accuracy"]["high"]),
                1.0 - top["rate"],
                (1.0 - top["high"], 1.0 - top["low"]),
            )
        )
    plot(
        points,
        path,
        "builtin:shapes: robustness (1 - worst attack-run ASR) vs kept, pooled over targets",
        "kept: accuracy on neighbours and other prompts, relative to the base model",
        "1 - worst attack ASR (held-out contexts)",
    )


def _first_of_each(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (edit, target): runs split by edit each measured the target's "no edit" row."""
    kept: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        kept.setdefault((r["edit"], r["target"]), r)
    return list(kept.values())


def main() -> None:
    args = es.parse_args(__doc__ or "", tune=(4,), tune_help="4: the robust settings' sweep on the tuning split")
    stem = args.stem if args.stem != "erasure_shapes" else "attack_shapes"
    if args.tune:
        name = f"{stem}_tuning_{'_'.join([*(f'g{i}' for i in args.grid), *args.targets])}"
        es.write_results(
            args.out,
            name,
            tune(args.targets, args.seeds, args.grid, save=lambda partial: es.write_results(args.out, name, partial)),
        )
        return
    if args.merge:  # runs split by target or by edit
        result = es.merge([args.out / f"{s}.json" for s in args.merge])
        result["rows"] = _first_of_each(result["rows"])
    else:
        result = run(
            args.targets, args.seeds, args.edits, save=lambda partial: es.write_results(args.out, stem, partial)
        )
    es.write_results(args.out, stem, result, render(result))
    frontier(result, args.out / f"{stem}_frontier.png")
    print(render(result))


if __name__ == "__main__":
    main()
