"""The export's ``README.md``: a Hugging Face model card that says what was erased, how, and how well.

Front matter first (``base_model``, ``license``, ``library_name``, ``tags``), so the Hub indexes
the export; then the edit (methods and their settings, recipe, seed), the run's measured numbers
with the protocol that made them, how the export was checked against the edit, how to load it,
and what it does not do. Nothing here is claimed that the run folder does not record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from conceptedit.api.export import Exporter, ExportReport, ExportSource

#: Licences of the models the project builds (its own code's licence).
BUILTIN_LICENCE = "apache-2.0"


def hub_id(model_id: str) -> str | None:
    """``model_id`` when it reads as a Hub repository (``owner/name``), not a path or a built-in model."""
    if model_id.startswith("builtin:") or Path(model_id).expanduser().exists():
        return None
    parts = model_id.split("/")
    return model_id if len(parts) == 2 and all(parts) and not model_id.startswith((".", "~")) else None


def base_licence(source: ExportSource) -> str:
    """The base model's licence: the project's for built-in models, a local folder's own model card's
    front matter when it has one, else ``other`` (the card then tells the reader to check)."""
    model_id = str(source.base_model.get("id", ""))
    if model_id.startswith("builtin:"):
        return BUILTIN_LICENCE
    card = Path(model_id).expanduser() / "README.md"
    if card.is_file():
        front = _front_matter(card.read_text(encoding="utf-8"))
        if isinstance(front.get("license"), str):
            return str(front["license"])
    return "other"


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def model_card(
    source: ExportSource,
    exporter: Exporter,
    report: ExportReport,
    check: dict[str, Any],
    metrics: list[dict[str, Any]] | dict[str, Any] | None,
) -> str:
    """The whole ``README.md`` of an export."""
    model_id = str(source.base_model.get("id", "?"))
    front: dict[str, Any] = {
        "license": base_licence(source),
        "library_name": "diffusers",
        "tags": ["conceptedit", "concept-erasure", "text-to-image", "stable-diffusion", exporter.name],
    }
    hub = hub_id(model_id)
    if hub:
        front["base_model"] = hub
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {source.run_dir.name}: {_erased_summary(source)} erased from {model_id}",
        f"Written by conceptedit in the `{exporter.name}` format ({exporter.description}).",
        _edits_section(source),
        _metrics_section(metrics),
        _check_section(check),
        _usage_section(report),
        _limits_section(source, report),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def named_concepts(recipe: dict[str, Any]) -> list[str]:
    """What the recipe's edits name as erased (``concept``, ``concepts``, ``erase``: words or
    concept-set names), in order, each once."""
    found: list[str] = []
    for edit in recipe.get("edits", []):
        params = edit.get("params", {})
        for key in ("concept", "concepts", "erase"):
            value = params.get(key)
            found += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v.strip()]
    return list(dict.fromkeys(found))


def _erased_summary(source: ExportSource) -> str:
    return ", ".join(named_concepts(source.recipe)) or "concepts"


def _edits_section(source: ExportSource) -> str:
    lines = ["## What was erased, and how", ""]
    for edit in source.recipe.get("edits", []):
        params = json.dumps(edit.get("params", {}), sort_keys=True, default=str)
        training = edit.get("training")
        trained = f"; training {json.dumps(training)}" if training else ""
        lines.append(f"- `{edit.get('method')}` with {params}{trained}")
    lines += [
        "",
        f"Recipe seed {source.recipe.get('seed')}; the resolved recipe is `recipe.yaml` and the run's manifest "
        "(versions, device, digests of the base tensors it replaced) is `manifest.json`, both in this folder. "
        "The same recipe and seed give the same edit.",
    ]
    return "\n".join(lines)


def _metrics_section(metrics: list[dict[str, Any]] | dict[str, Any] | None) -> str:
    if not metrics:
        return (
            "## Measured\n\nThe run measured nothing (its recipe had no `evaluate:`). Measure before relying on it: "
            "`conceptedit eval RUN --suite ...` on held-out prompts and attacks."
        )
    suites = metrics if isinstance(metrics, list) else metrics.get("suites", [metrics])
    lines = ["## Measured by the run", "", "| suite | n | metric | edited | base |", "|---|---|---|---|---|"]
    protocols = []
    for suite in suites:
        base = suite.get("base_metrics") or {}
        for key, value in (suite.get("metrics") or {}).items():
            if isinstance(value, int | float) and not key.endswith("_n"):
                shown = f"{base[key]:.4g}" if isinstance(base.get(key), int | float) else "-"
                lines.append(f"| {suite.get('suite')} | {suite.get('n')} | {key} | {value:.4g} | {shown} |")
        protocols.append(f"- {suite.get('suite')}: {json.dumps(suite.get('protocol', {}), sort_keys=True)}")
    return "\n".join([*lines, "", "Protocol (scorer, sampler, seeds):", "", *protocols])


def _check_section(check: dict[str, Any]) -> str:
    if not check.get("checked"):
        return f"## Checked\n\nNot checked by loading it back: {check.get('why', 'no loader')}."
    return (
        "## Checked\n\n"
        "This export was loaded back the way its users load it and compared with the edit it came from: "
        f"largest relative weight error {check['weights_max_relative_error']:.3g} over the changed tensors "
        f"(`{check.get('weights_worst_tensor')}`); "
        f"{check['images']} images ({len(check['prompts'])} prompts × seeds {check['seeds']}, "
        f"{check['sampling']['steps']} steps) differ by {check['pixel_mean_abs_diff']:.3g} on average and at most "
        f"{check['pixel_max_abs_diff']:.3g} (8-bit pixel values)."
    )


def _usage_section(report: ExportReport) -> str:
    usage = report.details.get("usage")
    return f"## How to load it\n\n```python\n{usage.strip()}\n```" if isinstance(usage, str) and usage.strip() else ""


def _limits_section(source: ExportSource, report: ExportReport) -> str:
    lines = [
        "## Intended use and limits",
        "",
        "For research on concept erasure and for deployments that add it to other safeguards. Erasure is "
        "measured, not proven: prompts and attacks the run did not measure may still bring a concept back, and "
        "the edit can change neighbouring concepts. Read the measured numbers above with their protocol.",
    ]
    if base_licence(source) == "other":
        lines.append("The base model's licence was not found locally: check it before sharing this export.")
    if report.hook_only:
        lines.append(
            "Parts of this edit run only as code at sampling time (" + ", ".join(report.hook_only) + "): a loader "
            "that ignores them gets a model without them."
        )
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines)
