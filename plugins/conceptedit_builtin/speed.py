"""SPEED (``speed``): erase concepts by a closed-form K/V edit confined to the null space of what must stay.

Li et al., "SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models",
ICLR 2026 (arXiv 2503.07392); reference code github.com/Ouxiang-Li/SPEED (Apache-2.0),
re-implemented here from its maths. For every edited cross-attention projection ``W`` it
solves, over ``D = ΔP``,

    min  Σ_i w_i ||(W + D) c_i − W a_i||²  +  α ||D||²     subject to  D e_j = 0

with ``c_i`` the erase rows, ``a_i`` their anchors' rows (``w_i = 1/N`` over ``N`` prompts),
``P`` the projector onto the null space of the retained rows (eigenvalues of their second
moment below ``threshold``), so retained concepts keep their outputs, and ``e_j`` the invariant
rows of IEC. The engine's shared solver does the algebra (``KVEdit.projector_fn``/``invariant``,
:func:`~conceptedit.toolkit.null_space_delta`). What makes it SPEED is how the retained set is
refined, per layer, before ``P`` is taken:

* **IPF** (influence-based prior filtering) keeps the retained rows that an unconstrained
  erasure would move most: ``‖W G c‖`` above its mean, ``G = Σ w (a − c) cᵀ (I + Σ w c cᵀ)⁻¹``
  (the change a ridge-1 erase edit makes, :func:`~conceptedit.toolkit.edit_map` minus ``I``);
* **DPA** (directed prior augmentation) adds ``augment`` copies ``c + z v`` of each kept row,
  ``z ~ N(0, 1)`` and ``v`` the right singular vector of ``W`` with the smallest singular value
  (a move ``W`` barely sees, so the copy means the same), and keeps the copies whose influence
  is above their group's mean;
* **IEC** (invariant equality constraints) keeps the outputs of the [SOT] row and of k-means
  centres of the empty prompt's other rows unchanged exactly.

See docs/methods/speed.md for the formulas, defaults per task and the deviations.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor

from conceptedit import ConceptRef, EditContext, EditError, EditMethod, KVEdit, MethodParams, PathText, hookimpl
from conceptedit.toolkit import (
    RowSelection,
    ThresholdRule,
    aligned_rows,
    edit_map,
    encoding_length,
    kmeans_centers,
    null_space_projector,
    read_prompts,
    read_rows,
    resolve_prompt_file,
    second_moment,
    select_rows,
)

F64 = torch.float64


class SpeedParams(MethodParams):
    concepts: ConceptRef = Field(
        description="Concept set to erase. Each prompt's rows move to its anchor's: the set's `target` "
        "('' for instances and nudity, 'art' for artistic styles, 'person' for celebrities in the reference).",
    )
    rows: RowSelection = Field(
        "last_word",
        description="Token rows of erase/anchor prompts: last_word (the reference's last subject token), "
        "after_sot (every row after [SOT], aligned by position: the reference's rows for 'nudity'), eot, all, "
        "last_word_to_end.",
    )
    retain: list[str] | None = Field(
        None,
        description="Non-target concepts whose outputs must stay (the prior set). null: the reference's "
        "choice, the empty prompt '' alone when no retain_file is given, else only the file's concepts.",
    )
    retain_file: PathText | None = Field(
        None,
        description="CSV (columns `retain_columns`) or .txt file of more retain concepts, relative to the "
        "recipe, e.g. a copy of the reference's data/instance.csv, style.csv or 10_celebrity.csv.",
    )
    retain_columns: list[str] = Field(
        ["concept"], min_length=1, description="CSV columns read from retain_file (the reference's --heads)."
    )
    retain_rows: Literal["auto"] | RowSelection = Field(
        "auto",
        description="Token rows of retain prompts. auto: after_sot when the retain set is only '' (the "
        "reference), else last_word.",
    )
    exclude_erased: bool = Field(
        True,
        description="Drop retain prompts that mention an erased concept as a whole word (case-insensitive), "
        "as the reference does.",
    )
    retain_scale: PositiveFloat = Field(
        1.0,
        description="α, the ridge on the change inside the null space (--retain_scale): 1.0 few-concept, "
        "0.05 multi-concept celebrities, 0.7 nudity.",
    )
    threshold: PositiveFloat = Field(
        0.1,
        description="Eigenvalues of the refined retain rows' second moment (1/N Σ c cᵀ) below this span the "
        "null space the edit may use (--threshold): 1e-1 few-concept, 1e-4 multi-concept.",
    )
    threshold_rule: ThresholdRule = Field(
        "absolute",
        description="absolute: the eigenvalue cut is `threshold` (reference); relative: threshold × the "
        "largest eigenvalue (this project's option, independent of the encoder's output scale).",
    )
    ipf: bool = Field(
        True,
        description="Influence-based prior filtering: keep only retain rows whose erasure influence is above "
        "the mean. The reference turns it off with --disable_filter (multi-concept) and also whenever augment "
        "is 0.",
    )
    augment: NonNegativeInt = Field(
        10, description="DPA: perturbed copies per kept retain row (--aug_num; 0 switches DPA off)."
    )
    augment_scale: PositiveFloat = Field(
        1.0,
        description="Standard deviation of the DPA perturbation along the weight's least-seen direction "
        "(the reference's unit normal: 1).",
    )
    augment_group: PositiveInt | None = Field(
        128,
        description="Retain rows are shuffled and augmented in groups of this many; a group's copies are kept "
        "when their influence is above the group's mean (the reference's chunks of 128). null: one group.",
    )
    iec: bool = Field(
        True, description="Invariant equality constraints: keep the [SOT] row's and the empty prompt's outputs."
    )
    iec_clusters: NonNegativeInt = Field(
        3,
        description="k-means centres standing for the empty prompt's rows after [SOT] (reference: 3); "
        "0 constrains the [SOT] row only.",
    )
    iec_ridge: NonNegativeFloat = Field(
        0.0,
        description="λ added to the constraints' system (--lamb): 0 keeps the invariant rows exactly "
        "(few/multi-concept), 0.5 for nudity.",
    )
    projections: list[Literal["k", "v"]] = Field(
        ["v"], min_length=1, description="Projections to edit (--params: V by default; K or KV)."
    )


class Speed(EditMethod[SpeedParams]):
    """SPEED: null-space K/V erasure with a refined retain set (IPF, DPA) and invariant rows (IEC)."""

    name = "speed"
    summary = "SPEED: null-space closed-form K/V erasure with a refined retain set (IPF, DPA, IEC)"
    kind = "closed_form"
    paper = "Li et al., SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models, ICLR 2026"
    Params = SpeedParams
    backbones = frozenset({"sd1", "sd2", "sdxl"})
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "flux": (
            "its invariant constraints (IEC) keep the start-token row, the same for every prompt under a causal "
            "CLIP encoder, and the empty prompt's rows; FLUX's T5 has no start token and, read without a mask, "
            "every one of its rows depends on the whole prompt, so there is no invariant row to keep"
        )
    }

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p = self.params
        pairs = ctx.concept_pairs(p.concepts)
        length = encoding_length(p.rows)
        erase = ctx.encode_prompts([pair.source for pair in pairs], length=length)
        anchor = ctx.encode_prompts([pair.target for pair in pairs], length=length)
        keys, anchors = aligned_rows(erase, anchor, p.rows)
        keys, anchors = keys.to("cpu", F64), anchors.to("cpu", F64)
        weights = torch.full((keys.shape[0],), 1.0 / len(pairs), dtype=F64)  # the mean over prompts

        texts = retain_texts(ctx, p, sorted({pair.concept for pair in pairs}))
        selection: RowSelection = p.retain_rows if p.retain_rows != "auto" else auto_retain_rows(texts)
        retained = select_rows(ctx.encode_prompts(texts, length=encoding_length(selection)), selection)
        retained = retained.to("cpu", F64)
        retained = retained[torch.randperm(retained.shape[0], generator=ctx.generator)]  # sets the DPA groups

        dim = keys.shape[1]
        unconstrained = KVEdit(keys=keys, targets=anchors, weights=weights, ridge=1.0, label="SPEED influence")
        influence = edit_map(unconstrained, dim) - torch.eye(dim, dtype=F64)

        def projector(name: str, weight: Tensor) -> Tensor:
            rows = refine_retain(
                retained,
                weight,
                influence,
                ipf=p.ipf,
                augment=p.augment,
                scale=p.augment_scale,
                group=p.augment_group,
                generator=torch.Generator().manual_seed(ctx.seed_for("dpa", name)),
            )
            return null_space_projector(second_moment(rows), p.threshold, p.threshold_rule)

        invariant = invariant_rows(ctx, p.iec_clusters) if p.iec else None
        yield KVEdit(
            keys=keys,
            targets=anchors,
            weights=weights,
            ridge=p.retain_scale,
            projector_fn=projector,
            invariant=invariant,
            invariant_ridge=p.iec_ridge,
            projections=tuple(p.projections),
            label=f"SPEED erase ({len(pairs)} prompts, {len(texts)} retained)",
        )


def mentions_any(text: str, concepts: Sequence[str]) -> bool:
    """Whether ``text`` contains one of ``concepts`` as a whole word or phrase, ignoring case."""
    lowered = text.lower()
    return any(re.search(r"\b" + re.escape(concept.lower()) + r"\b", lowered) for concept in concepts if concept)


def retain_texts(ctx: EditContext, p: SpeedParams, erased: Sequence[str]) -> list[str]:
    """The retain prompts: ``retain`` (or its default) and the file's, once each, less those naming an erased one."""
    texts = list(p.retain) if p.retain is not None else ([] if p.retain_file is not None else [""])
    if p.retain_file is not None:
        path, _ = resolve_prompt_file(p.retain_file, ctx.cache_dir, ctx.base_dir)
        if path.suffix == ".txt":
            texts += read_prompts(path)
        else:
            rows = read_rows(path, p.retain_columns)
            for column in p.retain_columns:  # the reference's heads, each column in file order
                texts += [row[column] for row in rows if row[column].strip()]
    texts = list(dict.fromkeys(texts))
    if p.exclude_erased:
        texts = [text for text in texts if not mentions_any(text, erased)]
    if not texts:
        raise EditError(f"{ctx.label}: the retain set is empty once prompts naming an erased concept are dropped")
    return texts


def auto_retain_rows(texts: Sequence[str]) -> RowSelection:
    """The reference's rule: every row after [SOT] of the empty prompt when it is all that is kept, else last words."""
    return "after_sot" if list(texts) == [""] else "last_word"


def refine_retain(
    rows: Tensor,
    weight: Tensor,
    influence: Tensor,
    *,
    ipf: bool,
    augment: int,
    scale: float,
    group: int | None,
    generator: torch.Generator,
) -> Tensor:
    """The refined retain rows of one layer: IPF's most influenced rows plus DPA's kept copies (float64).

    Args:
        rows: Retain rows ``[N, D]``, in the order that sets the DPA groups.
        weight: The layer's ``W`` before the edit, ``[d_out, D]``.
        influence: ``G`` with ``W G`` the change an unconstrained erasure makes (``edit_map − I``).
        ipf: Keep only rows whose ``‖W G c‖`` exceeds the mean over ``rows``.
        augment: Copies per kept row (0: none).
        scale: Standard deviation of ``z`` in ``c + z v``.
        group: Rows per DPA group (None: all in one).
        generator: Draws ``z``.
    """
    w = weight.detach().to("cpu", F64)
    erase_weight = w @ influence.to(F64)

    def moved(x: Tensor) -> Tensor:
        return (x @ erase_weight.T).norm(dim=1)

    kept = rows.to(F64)
    if ipf:
        score = moved(kept)
        kept = kept[score > score.mean()]
        if kept.shape[0] == 0:
            raise EditError(
                "IPF kept no retain row (every row is equally influenced); give more retain prompts or ipf: false"
            )
    parts = [kept]
    if augment > 0:
        direction = torch.linalg.svd(w, full_matrices=False).Vh[-1]  # smallest singular value's right vector
        size = group or kept.shape[0]
        for start in range(0, kept.shape[0], size):
            copies = kept[start : start + size].repeat(augment, 1)
            z = scale * torch.randn(copies.shape[0], generator=generator, dtype=F64)
            copies = copies + z[:, None] * direction[None, :]
            score = moved(copies)
            parts.append(copies[score > score.mean()])
    return torch.cat(parts)


def invariant_rows(ctx: EditContext, clusters: int) -> Tensor:
    """IEC's rows: the [SOT] row and ``clusters`` k-means centres of the empty prompt's other 76 rows."""
    hidden = ctx.encode_prompts([""], length="full").hidden[0].to("cpu", F64)
    if clusters == 0:
        return hidden[:1]
    generator = torch.Generator().manual_seed(ctx.seed_for("iec"))
    return torch.cat([hidden[:1], kmeans_centers(hidden[1:], clusters, generator=generator)])


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Speed)
