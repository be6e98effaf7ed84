"""Evaluation reports a person reads: a Markdown summary and one self-contained HTML page.

The HTML page embeds its images (PNG data URIs), so it can be mailed or attached to an issue as
one file. Each suite gets its metrics (the compared model next to the evaluated one, with the
protocol that made them) and a before/after strip of its first prompts at their seeds.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from conceptedit.evaluation import SuiteResult
from conceptedit.io.atomic import atomic_write_text

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def write_report(folder: Path, results: Sequence[SuiteResult], labels: tuple[str, str] = ("base", "edited")) -> None:
    """``report.md`` and ``report.html`` in ``folder``; ``labels`` name the compared and evaluated models."""
    atomic_write_text(folder / REPORT_MD, markdown(results, labels))
    atomic_write_text(folder / REPORT_HTML, page(results, labels))


def markdown(results: Sequence[SuiteResult], labels: tuple[str, str]) -> str:
    lines = ["# Evaluation", ""]
    for r in results:
        lines += [f"## {r.suite} {_options(r)}", "", f"{r.n} images; {_protocol(r)}", ""]
        if r.base_metrics is not None:
            lines += [f"| metric | {labels[0]} | {labels[1]} |", "|---|---|---|"]
            lines += [f"| {k} | {r.base_metrics[k]:.3f} | {v:.3f} |" for k, v in r.metrics.items()]
        else:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in r.metrics.items()]
        lines.append("")
    return "\n".join(lines)


def page(results: Sequence[SuiteResult], labels: tuple[str, str]) -> str:
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>conceptedit evaluation</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th:first-child,td:first-child"
        "{text-align:left}figure{display:inline-block;margin:.3em;text-align:center;font-size:.75em;"
        "max-width:9em}img{width:8em;image-rendering:pixelated}</style></head><body>",
        "<h1>conceptedit evaluation</h1>",
    ]
    for r in results:
        parts.append(f"<h2>{_e(r.suite)} {_e(_options(r))}</h2><p>{r.n} images; {_e(_protocol(r))}</p>")
        compared = r.base_metrics is not None
        head = f"<th>{_e(labels[0])}</th><th>{_e(labels[1])}</th>" if compared else "<th>value</th>"
        rows = "".join(
            f"<tr><td>{_e(k)}</td>" + (f"<td>{r.base_metrics[k]:.3f}</td>" if r.base_metrics is not None else "")
            + f"<td>{v:.3f}</td></tr>"
            for k, v in r.metrics.items()
        )
        parts.append(f"<table><tr><th>metric</th>{head}</tr>{rows}</table>")
        if compared:
            parts.append(f"<h3>{_e(labels[0])}</h3><div>" + "".join(
                _figure(x.base_image, x.prompt, x.seed) for x in r.examples if x.base_image is not None
            ) + "</div>")
        parts.append(f"<h3>{_e(labels[1])}</h3><div>" + "".join(
            _figure(x.image, x.prompt, x.seed) for x in r.examples
        ) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure(image: Image.Image, prompt: str, seed: int) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = f"{prompt} (seed {seed})"
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _options(r: SuiteResult) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in r.options.items()) + ")" if r.options else ""


def _protocol(r: SuiteResult) -> str:
    p = r.protocol
    return (
        f"scorer {p.get('scorer')} v{p.get('version')}, {p.get('sampler')} {p.get('steps')} steps, "
        f"guidance {p.get('guidance')}"
    )


def _e(text: object) -> str:
    return html.escape(str(text))
