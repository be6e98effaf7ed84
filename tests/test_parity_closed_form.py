"""The closed-form methods against their reference implementations, rewritten here step by step.

Each ``_reference_*`` function redoes what the reference code computes: its token positions
(word counts, attention-mask lengths), its loops over prompts and rows, its accumulation of
``mat1 = Σ v cᵀ`` and ``mat2 = Σ c cᵀ`` per matrix and its explicit matrix inverse. None of it
uses conceptedit's solver, row helpers, encodings or priors. The plugins' edited weights must
match to 1e-5 of the edit's size, so a later refactor cannot change a method silently.

Models are float64 (``build_tiny_sd(dtype=float64)``), so what is left is deterministic: the
engine rounds text embeddings to float32 before solving, which puts the plugins 1e-7 to 2e-6
away from an all-float64 reference, the same on any BLAS or thread count (rounding a float64
value to float32 does not depend on them). The measured value of
each check is in its comment. Reference code read: ddgoodgood/TRCE@0da9b71 (``prepare_k_v``,
``closed_form_refinement``), rohitgandikota/unified-concept-editing@28c81ed
(``trainscripts/uce_sd_erase.py``) and @f7222e6 (``train-scripts/train_erase.py``),
CharlesGong12/RECE@403a67f (``close_form_emb_regzero``, ``edit_model_adversarial``, ``train.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COCO_30K
from torch import Tensor

import conceptedit
from conceptedit.data.prompt_files import read_prompts
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

F64 = torch.float64
#: Largest allowed ‖W'_plugin − W'_reference‖ / ‖W'_reference − W‖ over all edited matrices.
PARITY = 1e-5
#: A genuinely different edit (another row, weight or preserve term) is at least this far off.
DIFFERENT = 1e-2


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _model() -> Any:
    return build_tiny_sd(dtype=F64)


def _kv(pipe: Any) -> dict[str, Tensor]:
    """Every cross-attention to_k/to_v weight by module name (float64 copies)."""
    return {
        name: module.weight.detach().to(F64).clone()
        for name, module in pipe.unet.named_modules()
        if "attn2" in name and (name.endswith("to_k") or name.endswith("to_v"))
    }


def _encode(pipe: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Hidden states ``[B, 77, D]`` and attention masks, tokenised as every reference does (max_length 77)."""
    tokens = pipe.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids)[0].to(F64)
    return hidden, tokens.attention_mask


def _apply(tmp_path: Path, label: str, concepts: dict[str, Any], *edits: dict[str, Any]) -> dict[str, Tensor]:
    result = conceptedit.apply(
        tiny_recipe(*edits, concepts=concepts), pipeline=_model(), out=tmp_path / label, quiet=True
    )
    return _kv(result.pipeline)


def _distance(got: dict[str, Tensor], want: dict[str, Tensor], base: dict[str, Tensor]) -> float:
    """Largest ‖got − want‖ / ‖want − base‖ over the matrices: the mismatch as a share of the edit."""
    assert got.keys() == want.keys() == base.keys()
    return max(float((got[n] - want[n]).norm() / (want[n] - base[n]).norm()) for n in want)


def _close_form(mat1: Tensor, mat2: Tensor) -> Tensor:
    """``mat1 @ inverse(mat2)``: how every reference script finishes a matrix."""
    return mat1 @ torch.linalg.inv(mat2)


# --------------------------------------------------------------------------- TRCE stage 1

TRCE_PAIRS = [
    ["Nudity", "a person wearing clothes"],  # "Nudity" is two BPE pieces: the word count misses its [EoT]
    ["Masturbation", "a person wearing clothes"],
    ["an erotic photo", "a person wearing clothes"],
]
TRCE_TEMPLATES = ["{} in a photo", "A snapshot of {}", "{} during sunset/sunrise"]
TRCE_CAPTIONS = 40
TRCE_S = 3.0  # the reference's preserve_scale s, large because the test prior has only 40 captions


def _reference_trce_stage1(pipe: Any, weight_scale: Sequence[float]) -> dict[str, Tensor]:
    """TRCE's ``prepare_k_v`` + ``closed_form_refinement`` (``lamb = 0``) on a raw caption cache."""
    pairs = [(t.replace("{}", m), t.replace("{}", s)) for m, s in TRCE_PAIRS for t in TRCE_TEMPLATES]
    weights = _kv(pipe)
    rows = []
    for old, new in pairs:
        hidden, _ = _encode(pipe, [old, new])
        words_old, words_new = len(old.split()), len(new.split())
        old_at = [0, words_old + 1, 76]  # [SoT], "first [EoT]" by word count, last padding [EoT]
        new_at = [0, words_new + 1, 76]
        base_weight = [1.0, 1.0, 77.0 - words_old - 2]
        rows.append((hidden[0, old_at], hidden[1, new_at], base_weight))
    # MACE-style raw cache: Σ over captions and all 77 positions of h hᵀ; for_mat1 = W · for_mat2.
    captions, _ = _encode(pipe, read_prompts(COCO_30K, limit=TRCE_CAPTIONS))
    flat = captions.reshape(-1, captions.shape[-1])
    cache2 = flat.T @ flat
    edited = {}
    for name, w in weights.items():
        mat1 = torch.zeros_like(w)
        mat2 = torch.zeros_like(cache2)
        for context, safe, base_weight in rows:
            values = safe @ w.T
            for r in range(3):
                scale = weight_scale[r] * base_weight[r]
                mat1 += scale * torch.outer(values[r], context[r])
                mat2 += scale * torch.outer(context[r], context[r])
        mat1 /= len(rows)
        mat2 /= len(rows)
        # s once when the cache is loaded, s again in the solver, then / 3e4
        mat1 += TRCE_S * (TRCE_S * (w @ cache2)) / 3e4
        mat2 += TRCE_S * (TRCE_S * cache2) / 3e4
        edited[name] = _close_form(mat1, mat2)
    return edited


def _trce_plugin(tmp_path: Path, label: str, **params: Any) -> dict[str, Tensor]:
    # On a per-caption prior the reference's s²/3e4 on the raw sum is η = s² · captions / 3e4.
    eta = TRCE_S**2 * TRCE_CAPTIONS / 3e4
    edit = {
        "method": "trce_eot",
        "params": {
            "concepts": "nsfw",
            "eta": eta,
            "prior": {"captions": str(COCO_30K), "limit": TRCE_CAPTIONS},
            **params,
        },
    }
    return _apply(tmp_path, label, {"nsfw": {"pairs": TRCE_PAIRS, "templates": TRCE_TEMPLATES}}, edit)


@pytest.mark.parametrize(
    ("rows", "weight_scale"),
    [
        ({"eot": 1.0}, [0, 1, 0]),  # the paper's setting: token_weight_scale [0, 1, 0, 0]
        ({"eot": 1.0, "sot": 0.5, "last_pad": 2.0, "last_pad_weighting": "padding"}, [0.5, 1, 2.0]),
    ],
    ids=["eot", "sot+eot+last_pad"],
)
def test_trce_stage1_matches_the_reference(tmp_path: Path, rows: dict[str, Any], weight_scale: list[float]) -> None:
    base = _kv(_model())
    reference = _reference_trce_stage1(_model(), weight_scale)
    legacy = _trce_plugin(tmp_path, "legacy", eot_index="legacy_wordcount", rows=rows)
    parity = _distance(legacy, reference, base)
    of_weight = max(float((legacy[n] - reference[n]).norm() / reference[n].norm()) for n in reference)
    print(f"TRCE stage 1 {sorted(rows)}: {parity:.2e} of the edit, {of_weight:.2e} of the weight")
    assert parity <= PARITY  # measured 3.3e-7 (eot) and 1.7e-6 (sot+eot+last_pad)
    # The default [EoT] index reads other rows, so it is a different edit (documented deviation).
    token = _distance(_trce_plugin(tmp_path, "token", rows=rows), reference, base)
    print(f"  eot_index token instead: {token:.2f} of the edit")
    assert token > DIFFERENT  # measured 1.03 (eot) and 0.59
    if "last_pad" in rows:  # and the default last-padding weight is not the reference's
        one = _trce_plugin(tmp_path, "one", eot_index="legacy_wordcount", rows={**rows, "last_pad_weighting": "one"})
        uniform = _distance(one, reference, base)
        print(f"  last_pad_weighting one instead: {uniform:.2f} of the edit")
        assert uniform > DIFFERENT  # measured 0.31


# --------------------------------------------------------------------------- UCE, new script

UCE_ARTISTS = ["Van Gogh", "Pablo Picasso"]
UCE_TEMPLATES = ["{}", "painting by {}"]
UCE_PRESERVE = ["Claude Monet", "a photo of a dog"]


def _reference_uce_new(
    pipe: Any, erase: Sequence[str], guide: Sequence[str], preserve: Sequence[str], lamb: float = 0.5
) -> dict[str, Tensor]:
    """``UCE()`` of ``uce_sd_erase.py``: one row per prompt, at ``attention_mask.sum() − 2``."""
    embeds = {}
    for prompt in dict.fromkeys([*erase, *guide, *preserve]):
        hidden, mask = _encode(pipe, [prompt])
        embeds[prompt] = hidden[0, int(mask[0].sum()) - 2]
    edited = {}
    for name, w in _kv(pipe).items():
        mat1 = lamb * w
        mat2 = lamb * torch.eye(w.shape[1], dtype=F64)
        for e, g in zip(erase, guide, strict=True):  # erase_scale 1
            mat1 += torch.outer(w @ embeds[g], embeds[e])
            mat2 += torch.outer(embeds[e], embeds[e])
        for p in preserve:  # preserve_scale 1
            mat1 += torch.outer(w @ embeds[p], embeds[p])
            mat2 += torch.outer(embeds[p], embeds[p])
        edited[name] = _close_form(mat1, mat2)
    return edited


def test_uce_matches_the_new_reference_script(tmp_path: Path) -> None:
    erase = [t.replace("{}", a) for a in UCE_ARTISTS for t in UCE_TEMPLATES]
    guide = [t.replace("{}", "art") for _ in UCE_ARTISTS for t in UCE_TEMPLATES]  # --concept_type art
    reference = _reference_uce_new(_model(), erase, guide, UCE_PRESERVE)
    concepts = {"art": {"concepts": UCE_ARTISTS, "target": "art", "templates": UCE_TEMPLATES}}
    got = _apply(tmp_path, "uce", concepts, {"method": "uce", "params": {"concepts": "art", "preserve": UCE_PRESERVE}})
    parity = _distance(got, reference, _kv(_model()))
    print(f"UCE new script: {parity:.2e} of the edit")
    assert parity <= PARITY  # measured 9.4e-8


# --------------------------------------------------------------------------- UCE, old script

NUDITY = ["nudity", "a naked body"]


def _reference_uce_old(
    pipe: Any, erase: Sequence[str], guide: Sequence[str], preserve: Sequence[str], lamb: float = 0.5
) -> dict[str, Tensor]:
    """``edit_model`` of ``train_erase.py@f7222e6`` as its ``__main__`` calls it (``technique: replace``).

    Erase rows run from each prompt's last word to the end, the longer run cut at the end; the
    retained texts are always ``''`` plus the preserve concepts, all 77 rows, at
    ``max(0.1, 1 / len(retained))``.
    """
    guide = [" " if g == "" else g for g in guide]
    retain = ["", *preserve]
    preserve_scale = max(0.1, 1 / len(retain))
    erase_rows = []
    for old, new in zip(erase, guide, strict=True):
        hidden, mask = _encode(pipe, [old, new])
        last_old, last_new = int(mask[0].sum()) - 2, int(mask[1].sum()) - 2
        farthest = max(last_old, last_new)
        context = hidden[0, last_old : 77 - max(0, farthest - last_old)]
        target = hidden[1, last_new : 77 - max(0, farthest - last_new)]
        erase_rows.append((context, target))
    retained = [_encode(pipe, [text])[0][0] for text in retain]
    edited = {}
    for name, w in _kv(pipe).items():
        mat1 = lamb * w
        mat2 = lamb * torch.eye(w.shape[1], dtype=F64)
        for context, target in erase_rows:  # erase_scale 1
            mat1 += (target @ w.T).T @ context
            mat2 += context.T @ context
        for rows in retained:
            mat1 += preserve_scale * (rows @ w.T).T @ rows
            mat2 += preserve_scale * rows.T @ rows
        edited[name] = _close_form(mat1, mat2)
    return edited


#: conceptedit's way to ask for the old script: its rows, and its implicit '' listed explicitly.
OLD_SCRIPT = {"rows": "last_word_to_end", "preserve_rows": "all", "preserve": [""], "preserve_scale": 1.0}


def test_uce_matches_the_old_reference_script_with_its_empty_prompt(tmp_path: Path) -> None:
    reference = _reference_uce_old(_model(), NUDITY, ["", ""], [])
    concepts = {"n": {"concepts": NUDITY, "target": ""}}
    base = _kv(_model())
    got = _apply(tmp_path, "old", concepts, {"method": "uce", "params": {"concepts": "n", **OLD_SCRIPT}})
    parity = _distance(got, reference, base)
    print(f"UCE old script: {parity:.2e} of the edit")
    assert parity <= PARITY  # measured 2.8e-7
    # Without the '' the script always keeps, it is another model.
    without = {**OLD_SCRIPT, "preserve": []}
    missing_edit = {"method": "uce", "params": {"concepts": "n", **without}}
    missing = _distance(_apply(tmp_path, "no-empty", concepts, missing_edit), reference, base)
    print(f"UCE old script without preserve ['']: {missing:.2f} of the edit")
    assert missing > 0.3  # measured 0.48 (0.61 with the audit's prompts)


# --------------------------------------------------------------------------- RECE


def _reference_rece(
    pipe: Any, start: dict[str, Tensor], concepts: Sequence[str], rounds: int, regular_scale: float = 0.1
) -> dict[str, Tensor]:
    """RECE's ``train.py`` loop: ``close_form_emb_regzero`` per concept, then ``edit_model_adversarial``.

    The guide is ``' '`` and the retained texts are one ``' '`` per concept, with
    ``preserve_scale`` 0.1, ``erase_scale`` 1 and ``lamb`` 0.1 (``scripts/nudity.sh``).
    """
    original = _kv(pipe)
    names = list(original)
    concept_hidden = _encode(pipe, list(concepts))[0]
    guide_hidden = _encode(pipe, [" "])[0][0]
    retained = [guide_hidden for _ in concepts]
    current = dict(start)
    for _ in range(rounds):
        mat1 = regular_scale * torch.eye(concept_hidden.shape[-1], dtype=F64)
        mat2 = torch.zeros_like(mat1)
        for name in names:
            mat1 = mat1 + current[name].T @ current[name]
            mat2 = mat2 + current[name].T @ original[name]
        coefficient = torch.linalg.inv(mat1) @ mat2
        adversarial = [concept_hidden[i] @ coefficient.T for i in range(len(concepts))]  # all 77 rows each
        edited = {}
        for name in names:
            w = current[name]
            m1 = 0.1 * w
            m2 = 0.1 * torch.eye(w.shape[1], dtype=F64)
            for rows in adversarial:
                m1 += (guide_hidden @ w.T).T @ rows
                m2 += rows.T @ rows
            for rows in retained:
                m1 += 0.1 * (rows @ w.T).T @ rows
                m2 += 0.1 * rows.T @ rows
            edited[name] = _close_form(m1, m2)
        current = edited
    return current


def test_rece_two_rounds_match_the_reference_on_the_old_script_start(tmp_path: Path) -> None:
    pipe = _model()
    start = _reference_uce_old(pipe, NUDITY, [" ", " "], [])  # RECE's start: guide ' ', '' retained at 1.0
    reference = _reference_rece(pipe, start, NUDITY, rounds=2)
    concepts = {"n": {"concepts": NUDITY, "target": " "}}
    uce = {"method": "uce", "params": {"concepts": "n", **OLD_SCRIPT}}

    def rece(repeat: str) -> dict[str, Any]:
        return {"method": "rece", "params": {"concepts": "n", "rounds": 2, "preserve_repeat": repeat}}

    base = _kv(pipe)
    got = _apply(tmp_path, "rece", concepts, uce, rece("per_concept"))
    parity = _distance(got, reference, base)
    print(f"RECE 2 rounds: {parity:.2e} of the edit")
    assert parity <= PARITY  # measured 6.9e-7
    # Counting ' ' once for the two concepts is not what the reference does.
    once = _distance(_apply(tmp_path, "once", concepts, uce, rece("once")), reference, base)
    print(f"RECE with preserve_repeat once: {once:.2e} of the edit")
    assert once > DIFFERENT  # measured 0.16
