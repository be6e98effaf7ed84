"""Loss curves in the report: reading a run's training logs, drawing them as SVG, where they appear."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_methods import FakeMethodsPlugin
from typer.testing import CliRunner

import conceptedit
from conceptedit import RunDirError
from conceptedit.cli.app import app
from conceptedit.evaluation.loss_curves import LossCurves, read_log, read_run_logs, svg
from conceptedit.testing import isolated_host, tiny_recipe

SVG = "{http://www.w3.org/2000/svg}"
TRAINING_STEPS = 6
EVALUATE = [{"suite": "shapes-explicit", "options": {"target": "red", "seeds": 1}, "limit": 1, "steps": 2}]


def _line(step: int, **terms: float) -> str:
    """A log line as the training loop writes it."""
    return json.dumps({"step": step, "lr": 1e-3, **terms, "time": 1.7e9 + step}) + "\n"


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in (polyline.get("points") or "").split())]


# --------------------------------------------------------------------------- reading logs


def test_series_hold_every_logged_term_and_skip_a_cut_off_last_line(tmp_path: Path) -> None:
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    written = [(1, 0.9, 0.1), (2, 0.7, 0.2), (3, 0.4, 0.15)]
    text = "".join(_line(s, match=m, keep=k, total=m + k) for s, m, k in written)
    (logs / "steer.jsonl").write_text(text + '{"step": 4, "lr": 0.001, "mat')  # killed mid-write
    (logs / "empty.jsonl").write_text("")
    (curves,) = read_run_logs(tmp_path / "run")  # the empty log draws nothing
    assert curves.label == "steer"
    assert list(curves.terms) == ["match", "keep", "total"]  # lr and time are no loss terms
    assert curves.terms["match"] == [(s, m) for s, m, _ in written]
    assert curves.terms["keep"] == [(s, k) for s, _, k in written]
    assert curves.terms["total"] == [(s, m + k) for s, m, k in written]


def test_a_run_that_never_trained_has_no_curves(tmp_path: Path) -> None:
    assert read_run_logs(tmp_path) == []
    (tmp_path / "logs").mkdir()
    assert read_run_logs(tmp_path) == []


def test_a_broken_line_before_the_end_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "steer.jsonl"
    path.write_text(_line(1, total=1.0) + '{"step": 2, "tot\n' + _line(3, total=0.5))
    with pytest.raises(RunDirError, match=re.escape(f"{path}:2:")):
        read_log(path)
    path.write_text(_line(1, total=1.0) + '{"lr": 0.1}\n')  # complete, newline-terminated, yet no step
    with pytest.raises(RunDirError, match=re.escape(f"{path}:2:")):
        read_log(path)


# --------------------------------------------------------------------------- drawing


@pytest.mark.parametrize(("scale", "log_y"), [(1.0, False), (1e-4, True)])
def test_svg_has_one_polyline_per_term_ordered_like_the_values(scale: float, log_y: bool) -> None:
    match = [5.0, 3.0, 4.0, 1.0, 0.5, 0.25]
    keep = [v * scale for v in (0.2, 0.6, 0.1, 0.3, 0.7, 0.08)]  # scale 1e-4 spans five decades
    curves = LossCurves("steer", {"match": list(enumerate(match, 1)), "keep": list(enumerate(keep, 1))})
    root = ET.fromstring(svg(curves))
    assert root.tag == f"{SVG}svg"
    assert ("log scale" in (root.findtext(f"{SVG}title") or "")) == log_y  # picked from the values' span
    lines = {p.get("data-term"): _points(p) for p in root.iter(f"{SVG}polyline")}
    assert list(lines) == ["match", "keep"]
    legend = [t.text for t in root.iter(f"{SVG}text")]
    assert "match" in legend and "keep" in legend
    values = [*match, *keep]
    ys = [y for points in lines.values() for _, y in points]
    assert len(lines["match"]) == len(lines["keep"]) == len(match)
    assert sorted(range(len(values)), key=lambda i: -values[i]) == sorted(range(len(ys)), key=lambda i: ys[i])
    xs = [x for x, _ in lines["match"]]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)  # steps run left to right


def test_a_single_flat_step_still_draws() -> None:
    root = ET.fromstring(svg(LossCurves("one", {"total": [(1, 0.0)]})))
    ((x, y),) = _points(next(root.iter(f"{SVG}polyline")))
    assert math.isfinite(x) and math.isfinite(y)  # no division by a zero range


# --------------------------------------------------------------------------- in the report


@pytest.fixture
def host() -> Iterator[Any]:
    with isolated_host(FakeMethodsPlugin(), entry_points=True) as h:  # the fake trainer and the shapes suites
        yield h


def _svgs_in(page: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", page, flags=re.S)]


def test_a_run_that_trained_reports_its_loss_curves(host: Any, tmp_path: Path) -> None:
    recipe = tiny_recipe(
        {"method": "test_q_steer", "name": "steer", "training": {"steps": TRAINING_STEPS}}, evaluate=EVALUATE
    )
    run = tmp_path / "run"
    conceptedit.apply(recipe, out=run, quiet=True)

    def check(folder: Path) -> None:
        (drawn,) = _svgs_in((folder / "report.html").read_text())
        assert [len(_points(p)) for p in drawn.iter(f"{SVG}polyline")] == [TRAINING_STEPS] * 2  # match, total
        md = (folder / "report.md").read_text()
        assert "## Training loss" in md and "![loss curves of steer](loss_steer.svg)" in md
        assert re.search(r"^\| match \| [0-9.e+-]+ \| [0-9.e+-]+ \| [0-9.e+-]+ \|$", md, flags=re.M)
        written = ET.parse(folder / "loss_steer.svg").getroot()
        assert len(list(written.iter(f"{SVG}polyline"))) == 2

    check(run)  # the recipe's evaluate section, at the end of apply
    options = "--suite shapes-explicit --option target=red --option seeds=1 --limit 1 --steps 2 --device cpu --quiet"
    result = CliRunner().invoke(app, ["eval", str(run), *options.split(), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    check(tmp_path / "eval")  # conceptedit eval RUN_FOLDER

    result = CliRunner().invoke(app, ["eval", "builtin:tiny-sd", *options.split(), "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    assert "Training loss" not in (tmp_path / "plain" / "report.html").read_text()  # a model, not a run
    assert not list((tmp_path / "plain").glob("loss_*.svg"))

    log = run / "logs" / "steer.jsonl"
    first, *rest = log.read_text().splitlines(keepends=True)
    log.write_text(first + "{not json\n" + "".join(rest))
    result = CliRunner().invoke(app, ["eval", str(run), *options.split(), "--out", str(tmp_path / "broken")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{log}:2:" in said, said  # refused before any model loads


def test_a_run_without_training_has_no_loss_section(host: Any, tmp_path: Path) -> None:
    concepts = {"cats": {"pairs": [["a cat", "a dog"]]}}
    recipe = tiny_recipe(
        {"method": "test_eot_map", "params": {"concepts": "cats"}}, concepts=concepts, evaluate=EVALUATE
    )
    conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    for name in ("report.html", "report.md"):
        assert "Training loss" not in (tmp_path / "run" / name).read_text()
    assert "<svg" not in (tmp_path / "run" / "report.html").read_text()
    assert not list((tmp_path / "run").glob("loss_*.svg"))
