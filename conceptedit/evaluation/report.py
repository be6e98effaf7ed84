"""Evaluation reports a person reads: a Markdown summary and one self-contained HTML page.

The HTML page embeds its images (PNG data URIs), so it can be mailed or attached to an issue as
one file. Each suite gets its metrics (the compared model next to the evaluated one, with the
protocol that made them) and a before/after strip of its first prompts at their seeds. When the
evaluated model is a run that trained, its loss curves follow: inline SVG in the page, and
``loss_<label>.svg`` files next to the Markdown, which links them.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from conceptedit.api.results import SuiteResult
from conceptedit.evaluation.loss_curves import LossCurves, summary, svg
from conceptedit.io.atomic import atomic_write_text

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def write_report(
    folder: Path,
    results: Sequence[SuiteResult],
    labels: tuple[str, str] = ("base", "edited"),
    curves: Sequence[LossCurves] = (),
) -> None:
    """``report.md`` and ``report.html`` in ``folder``; ``labels`` name the compared and evaluated models.

    ``curves`` are the evaluated run's training logs (:func:`conceptedit.evaluation.loss_curves.read_run_logs`);
    each also becomes an SVG file beside the Markdown, which cannot embed one.
    """
    for c in curves:
        atomic_write_text(folder / svg_name(c.label), svg(c))
    atomic_write_text(folder / REPORT_MD, markdown(results, labels, curves))
    atomic_write_text(folder / REPORT_HTML, page(results, labels, curves))


def svg_name(label: str) -> str:
    """The file the loss curves of training log ``label`` are drawn into, beside ``report.md``."""
    return f"loss_{label}.svg"


def markdown(results: Sequence[SuiteResult], labels: tuple[str, str], curves: Sequence[LossCurves] = ()) -> str:
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
    if curves:
        lines += ["## Training loss", ""]
    for c in curves:
        lines += [f"### {c.label}", "", f"![loss curves of {c.label}]({quote(svg_name(c.label))})", ""]
        lines += ["| term | first | last | min |", "|---|---|---|---|"]
        lines += ["| {} | {:.4g} | {:.4g} | {:.4g} |".format(term, *summary(p)) for term, p in c.terms.items()]
        lines.append("")
    return "\n".join(lines)


def page(results: Sequence[SuiteResult], labels: tuple[str, str], curves: Sequence[LossCurves] = ()) -> str:
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
            f"<tr><td>{_e(k)}</td>"
            + (f"<td>{r.base_metrics[k]:.3f}</td>" if r.base_metrics is not None else "")
            + f"<td>{v:.3f}</td></tr>"
            for k, v in r.metrics.items()
        )
        parts.append(f"<table><tr><th>metric</th>{head}</tr>{rows}</table>")
        if compared:
            parts.append(
                f"<h3>{_e(labels[0])}</h3><div>"
                + "".join(
                    _figure(x.base_image, f"{x.prompt} (seed {x.seed})") for x in r.examples if x.base_image is not None
                )
                + "</div>"
            )
        parts.append(
            f"<h3>{_e(labels[1])}</h3><div>"
            + "".join(_figure(x.image, f"{x.prompt} (seed {x.seed})") for x in r.examples)
            + "</div>"
        )
        made = [(x.extra, x.seed) for x in r.examples if x.extra is not None]
        if made:  # what the scorer drew itself, e.g. from the attacked prompts it found
            parts.append(
                f"<h3>{_e(labels[1])}: images made by {_e(str(r.protocol.get('scorer', 'the scorer')))}</h3><div>"
                + "".join(_figure(image, f"{caption} (seed {seed})") for (caption, image), seed in made)
                + "</div>"
            )
    if curves:
        parts.append("<h2>Training loss</h2>")
    for c in curves:
        rows = "".join(
            "<tr><td>{}</td><td>{:.4g}</td><td>{:.4g}</td><td>{:.4g}</td></tr>".format(_e(term), *summary(p))
            for term, p in c.terms.items()
        )
        parts.append(f"<h3>{_e(c.label)}</h3><div>{svg(c)}</div>")
        parts.append(f"<table><tr><th>term</th><th>first</th><th>last</th><th>min</th></tr>{rows}</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure(image: Image.Image, caption: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
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
