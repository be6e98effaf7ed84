"""UCE on builtin:tiny-sd: the closed-form solution, its token rows, validation and the artists recipe."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

import conceptedit
import conceptedit.toolkit
from conceptedit.cli.app import app
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

ARTISTS = ["Van Gogh", "Picasso"]
TEMPLATES = ["{}", "a painting by {}"]
PRESERVE = ["Monet", "a dog", "a house", "Rembrandt"]
CONCEPTS = {"art": {"concepts": ARTISTS, "target": "art", "templates": TEMPLATES}}


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _uce(**params: Any) -> dict[str, Any]:
    return {"method": "uce", "params": {"concepts": "art", "preserve": PRESERVE, **params}}


def _rows(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """Last-word-token rows computed without the engine (float64): the position before the first [EoT]."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0].double()
    eot = (ids == pipe.tokenizer.eos_token_id).int().argmax(1)
    return hidden[torch.arange(len(prompts)), (eot - 1).clamp(min=0)]


def _kv(pipe: Any) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().double().clone()
        for n, p in pipe.unet.named_parameters()
        if "attn2.to_k" in n or "attn2.to_v" in n
    }


def test_uce_solves_its_objective_keeps_preserved_and_moves_erased(tmp_path: Path) -> None:
    # float64 model: what is left of the gradient is the engine's float32 rounding of the text
    # embeddings, the same on every machine (a float32 model: ~9e-7, BLAS-dependent).
    base = build_tiny_sd(dtype=torch.float64)
    result = conceptedit.apply(
        tiny_recipe(_uce(), concepts=CONCEPTS),
        pipeline=build_tiny_sd(dtype=torch.float64),
        out=tmp_path / "run",
        quiet=True,
    )
    before, after = _kv(base), _kv(result.pipeline)
    erase = _rows(base, [t.replace("{}", a) for a in ARTISTS for t in TEMPLATES])
    guide = _rows(base, [t.replace("{}", "art") for _ in ARTISTS for t in TEMPLATES])
    keep = _rows(base, PRESERVE)
    lam = 0.5  # UCE's default ridge; erase and preserve scales default to 1
    assert len(after) == 2 * sum(name.endswith("attn2") for name, _ in base.unet.named_modules())
    for name, w in before.items():
        new = after[name]

        def grad(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            return (x @ erase.T - w @ guide.T) @ erase + (x @ keep.T - w @ keep.T) @ keep + lam * (x - w)

        assert grad(new).norm() / grad(w).norm() < 1e-6, name  # normal equations hold (measured 8.5e-8)
        moved = (new @ erase.T - w @ guide.T).norm() / (w @ erase.T - w @ guide.T).norm()
        assert moved < 0.2, (name, float(moved))  # erase outputs now near the guide's (measured 0.10-0.11)
        kept = (new @ keep.T - w @ keep.T).norm() / (w @ keep.T).norm()
        assert kept < 0.06, (name, float(kept))  # preserved outputs barely moved (measured 0.024-0.040)


def test_preservation_is_what_keeps_the_other_concepts(tmp_path: Path) -> None:
    """Without preserve concepts the same edit moves their outputs much more."""
    base = build_tiny_sd()
    keep = _rows(base, PRESERVE)
    drift = {}
    for label, params in {"kept": {}, "free": {"preserve": []}}.items():
        result = conceptedit.apply(
            tiny_recipe(_uce(**params), concepts=CONCEPTS), pipeline=build_tiny_sd(), out=tmp_path / label, quiet=True
        )
        after = _kv(result.pipeline)
        drift[label] = sum(float((after[n] @ keep.T - w @ keep.T).norm()) for n, w in _kv(base).items())
    assert drift["kept"] < 0.5 * drift["free"], drift


def test_token_row_choices_select_the_documented_rows(builtin_host: Any) -> None:
    pipe = build_tiny_sd()
    adapter = StableDiffusionAdapter(pipe)
    source = adapter.encode_prompts(["a painting by Van Gogh", "Picasso"])
    target = adapter.encode_prompts(["a painting by art", ""])
    ids = source.input_ids
    last = (source.eot_index - 1).tolist()
    assert [ids[0, last[0]].item(), ids[1, last[1]].item()] == [
        adapter.token_ids("Van Gogh")[-1],
        adapter.token_ids("Picasso")[-1],
    ]
    keys, goals = conceptedit.toolkit.aligned_rows(source, target, "last_word")
    torch.testing.assert_close(keys, source.hidden[torch.arange(2), source.eot_index - 1])
    torch.testing.assert_close(goals[1], target.hidden[1, 0])  # the empty guide's "last word" is its start token
    # old script: from each prompt's last word to the end, both cut to the shorter run, row by row
    keys, goals = conceptedit.toolkit.aligned_rows(source, target, "last_word_to_end")
    a0, b0 = last[0], int(target.eot_index[0] - 1)
    a1, b1 = last[1], 0
    n0, n1 = 77 - max(a0, b0), 77 - max(a1, b1)
    assert keys.shape[0] == goals.shape[0] == n0 + n1
    torch.testing.assert_close(keys[:n0], source.hidden[0, a0 : a0 + n0])
    torch.testing.assert_close(goals[n0:], target.hidden[1, b1 : b1 + n1])
    assert conceptedit.toolkit.select_rows(source, "all").shape == (2 * 77, source.hidden.shape[-1])


def test_row_choice_and_technique_change_the_edit(tmp_path: Path) -> None:
    runs = {}
    for label, params in {
        "new": {},
        "old": {"rows": "last_word_to_end", "preserve_rows": "all"},
        "eot": {"rows": "eot"},
        "tensor": {"technique": "tensor"},
    }.items():
        result = conceptedit.apply(
            tiny_recipe(_uce(**params), concepts=CONCEPTS), pipeline=build_tiny_sd(), out=tmp_path / label, quiet=True
        )
        runs[label] = _kv(result.pipeline)
    name = next(iter(runs["new"]))
    for label in ("old", "eot", "tensor"):
        assert not torch.allclose(runs[label][name], runs["new"][name]), label


def test_only_v_when_asked(tmp_path: Path) -> None:
    result = conceptedit.apply(
        tiny_recipe(_uce(projections=["v"]), concepts=CONCEPTS), out=tmp_path / "run", quiet=True
    )
    assert result.changed and all(name.endswith("attn2.to_v.weight") for name in result.changed)


def test_a_singular_setup_is_a_recipe_error_naming_the_fix() -> None:
    with pytest.raises(conceptedit.RecipeError, match=r"ridge is 0 and nothing is preserved.*set ridge > 0"):
        conceptedit.load_recipe(tiny_recipe(_uce(ridge=0, preserve=[]), concepts=CONCEPTS))
    with pytest.raises(conceptedit.RecipeError, match="rows"):
        conceptedit.load_recipe(tiny_recipe(_uce(rows="last_token"), concepts=CONCEPTS))


def test_uce_artists_recipe_runs_on_tiny_sd(tmp_path: Path) -> None:
    args = ["apply", REPO / "recipes" / "uce_artists.yaml", "--model", "builtin:tiny-sd", "--device", "cpu"]
    args += ["--out", tmp_path / "run", "--quiet"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [e["method"] for e in manifest["edits"]] == ["uce"]
    assert manifest["changed_tensors"] and manifest["guards"] == []
