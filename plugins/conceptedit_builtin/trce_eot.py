"""TRCE stage 1 (``trce_eot``): map malicious prompts' [EoT] embeddings onto safe ones in closed form.

Chen et al., "TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image Diffusion
Models", ICCV 2025 (arXiv 2503.07389). For every cross-attention ``to_k`` and ``to_v``:

    W' = (Σ_i W e_s,i e_m,iᵀ / N + η W C) (Σ_i e_m,i e_m,iᵀ / N + η C)⁻¹

with ``e_m``/``e_s`` the text encoder's output at the first [EoT] token of each malicious/safe
prompt pair and ``C`` the preservation prior over a caption set. The engine's shared K/V
solver does the algebra (one Cholesky solve shared by every layer).

Differences from the reference code (see docs/methods/trce.md):
* the [EoT] position comes from token ids (``eot_index: token``); the reference counts
  whitespace words, which misses the real [EoT] for multi-piece words such as "Nudity".
  ``eot_index: legacy_wordcount`` reproduces the reference's rows.
* the prior is normalised per caption and weighted by ``eta``. The reference weights an
  unreleased raw cache (a sum over captions) by ``s²/30000``. ``eta = s²`` is this project's
  *assumption* that the cache summed 30,000 captions; if it is MACE's cache of all ~617k
  COCO-2014 captions, the reference's weight is about 20.6·s². ``reference_eta`` derives η from
  ``s`` under either reading, so the choice is explicit in the recipe.
* the reference's last-padding row weighs ``77 − words − 2`` (it stands for every padding
  position); here it weighs like any other row unless ``rows.last_pad_weighting: padding``.
* ``adversarial`` (off by default; not in the paper) makes the mapping robust the way RECE makes
  UCE robust: after the mapping, each round derives in closed form, for every malicious prompt,
  the embedding with which the edited projections reproduce what the original ones made of it
  (:func:`~conceptedit.toolkit.matching_inputs`), adds its rows at the mapped token positions as
  further keys with the same safe targets, and solves the mapping again with every pair so far.

On FLUX (docs/backbones.md, "FLUX") the rows are T5's and the mapped map is ``context_embedder``;
the [EoT] row is T5's ``</s>``. FLUX also reads CLIP's pooled vector, which *is* CLIP's [EoT]
output, so the mapping has a second part: each malicious prompt's pooled vector maps to its safe
prompt's through the pooled projection's first linear map, with the [EoT] weight, the captions'
pooled prior and the same η and ridge (and, with ``adversarial``, its own closed-form rounds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from torch import Tensor

from conceptedit import (
    ConceptRef,
    EditContext,
    EditError,
    EditMethod,
    KVEdit,
    MethodParams,
    PathText,
    PromptEncoding,
    PromptPair,
    hookimpl,
)
from conceptedit.toolkit import embedding_prior, matching_inputs, read_prompts, resolve_prompt_file, text_maps

#: Largest index a legacy word count may reach (SD's 77-token context).
_LAST = 76

#: Captions the reference's unreleased prior cache may have summed, per reading of its ``/3e4``
#: (see :class:`ReferenceEta`). MACE's ``cache_coco.py`` sums every caption of COCO-2014's
#: ``captions_train2014.json`` (414,113) and ``captions_val2014.json`` (202,654).
CACHE_CAPTIONS: dict[str, int] = {"coco30k": 30_000, "mace617k": 414_113 + 202_654}
#: The reference divides its cache by this before weighting it (``cfr_utils.py``).
_REFERENCE_DIVISOR = 30_000


class TokenRows(MethodParams):
    """Weight of each token row pair fed to the solve (the paper's mapping-target ablation)."""

    eot: NonNegativeFloat = Field(1.0, description="First [EoT] of malicious → first [EoT] of safe (TRCE).")
    sot: NonNegativeFloat = Field(0.0, description="[SoT] row (ablation [EoT]+[SoT]).")
    last_pad: NonNegativeFloat = Field(0.0, description="Last padding [EoT] (position 76) of both prompts.")
    keyword: NonNegativeFloat = Field(
        0.0, description="First token of the malicious concept → first token of the safe concept (ablation [KEY])."
    )
    following: NonNegativeFloat = Field(
        0.0,
        description="The concept's last token and every token after it up to the first [EoT] → the same rows "
        "after the safe concept, for pairs whose prompts differ only in the concept (this project's option, not "
        "TRCE's: a causal encoder carries the concept into the rest of the sentence).",
    )
    last_pad_weighting: Literal["one", "padding"] = Field(
        "one",
        description="one: each pair's last-padding row weighs `last_pad` like any other row; padding: it also "
        "counts the malicious prompt's padding positions after its first [EoT] (76 − [EoT] index), so the one "
        "row stands for all of them, as the reference code's 77 − words − 2 (equal under legacy_wordcount).",
    )

    @model_validator(mode="after")
    def _some_row(self) -> TokenRows:
        if not any((self.eot, self.sot, self.last_pad, self.keyword, self.following)):
            raise ValueError("at least one token row needs a weight > 0")
        return self


class PriorSpec(MethodParams):
    """The caption set whose token embeddings the edit must keep (C in the formula)."""

    captions: PathText = Field(
        "coco-30k",
        description="Prompt file path (CSV with a `prompt` column or .txt), "
        "or a known source name (coco-30k) downloaded once to the cache.",
    )
    limit: PositiveInt | None = Field(
        3000,
        description="Use the first N captions (null: all). 3,000 is this project's choice; the reference's "
        "caption set is not published.",
    )
    positions: Literal["all", "through_eot"] = Field(
        "all", description="Token rows per caption: all 77 (TRCE), or only up to the first [EoT]."
    )


class ReferenceEta(MethodParams):
    """η from the reference code's ``preserve_scale`` ``s``, under a stated reading of its prior cache.

    The reference weights a raw cache ``Σ_captions Σ_77 h hᵀ`` by ``s²/30000``; the cache is not
    released, so how many captions it summed is unknown. On a per-caption prior that weight is
    ``η = s² · captions / 30000``: ``coco30k`` reads the divisor as the caption count (η = s²,
    this project's default reading), ``mace617k`` assumes MACE's cache of all COCO-2014
    captions, which TRCE's solver, file name and keys come from (η ≈ 20.6·s²).
    """

    preserve_scale: PositiveFloat = Field(
        description="s in the reference's configs: 0.01 (sexual), 0.02 (multi-concept)."
    )
    cache: Literal["coco30k", "mace617k"] = Field(
        "coco30k", description="Which caption count the reference cache is read as: 30,000 or 616,767."
    )

    @property
    def eta(self) -> float:
        """The per-caption prior weight this reading gives."""
        return self.preserve_scale**2 * CACHE_CAPTIONS[self.cache] / _REFERENCE_DIVISOR


class AdversarialRounds(MethodParams):
    """Robust TRCE: rounds that add closed-form adversarial [EoT] embeddings to the mapping's pairs.

    After the mapping, each round finds for every malicious prompt the embedding that makes the
    *edited* projections give what the *original* ones gave the prompt (RECE's closed form,
    ``c' = (Σ W'ᵀW' + λ_r I)⁻¹ Σ W'ᵀW₀ c``, every row), takes its rows at the same token positions
    as the mapping (first [EoT], last padding, ...), pairs them with the same safe rows, and solves
    the mapping again with every pair found so far.
    """

    rounds: PositiveInt = Field(2, description="Adversarial rounds after the plain mapping (RECE: 1-3).")
    regular_scale: NonNegativeFloat = Field(
        0.1, description="λ_r pulling the adversarial embedding toward zero (RECE: 0.1 nudity, 1e-3 objects)."
    )
    weight: PositiveFloat = Field(1.0, description="Weight of each adversarial row relative to a prompt's own row.")


class TrceEotParams(MethodParams):
    concepts: ConceptRef = Field(description="Concept set of [malicious, safe] pairs expanded by templates.")
    rows: TokenRows = Field(default_factory=TokenRows, description="Token rows and their weights.")
    eot_index: Literal["token", "legacy_wordcount"] = Field(
        "token", description="token: first [EoT] from token ids (paper); legacy_wordcount: words + 1 (reference code)."
    )
    eta: NonNegativeFloat = Field(
        1e-4,
        description="Prior weight η on the per-caption prior. 1e-4 = s² for the reference's s = 0.01 (sexual; "
        "4e-4 for s = 0.02), which assumes its cache summed 30,000 captions; see reference_eta.",
    )
    reference_eta: ReferenceEta | None = Field(
        None,
        description="Derive η from the reference's s and a reading of its cache (coco30k: s²; mace617k: "
        "s²·616767/30000); the derived value replaces eta, which may be left out.",
    )
    prior: PriorSpec | None = Field(default_factory=PriorSpec, description="Preservation prior (null: none).")
    ridge: NonNegativeFloat = Field(0.0, description="λ‖W'−W‖² (TRCE uses 0).")
    projections: list[Literal["k", "v"]] = Field(["k", "v"], min_length=1, description="Projections to edit.")
    adversarial: AdversarialRounds | None = Field(
        None,
        description="Robust TRCE (this project's option, not the paper's): rounds that also map closed-form "
        "adversarial embeddings of the malicious prompts (null: the paper's single mapping).",
    )

    @model_validator(mode="after")
    def _derive_eta(self) -> TrceEotParams:
        # The derived η is written back, so a resolved recipe records the weight actually used and
        # loads again unchanged; an explicit eta that disagrees is an error, not silently replaced.
        if self.reference_eta is not None:
            derived = self.reference_eta.eta
            if "eta" in self.model_fields_set and not math.isclose(self.eta, derived, rel_tol=1e-9):
                raise ValueError(
                    f"eta {self.eta:g} contradicts reference_eta, which gives {derived:.6g}; set only one of them"
                )
            self.eta = derived
        return self


class TrceEot(EditMethod[TrceEotParams]):
    """TRCE stage 1: closed-form [EoT] mapping on every cross-attention key/value projection."""

    name = "trce_eot"
    summary = "TRCE stage 1: map malicious prompts' [EoT] embeddings to safe ones (closed-form K/V edit)"
    kind = "closed_form"
    paper = "Chen et al., TRCE, ICCV 2025, arXiv:2503.07389"
    Params = TrceEotParams
    backbones = frozenset({"sd1", "sd2", "sdxl", "flux"})

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        p = self.params
        # The encoder is causal: rows up to the first [EoT] need no padding beyond the longest prompt
        # (FLUX's bidirectional T5: the adapter encodes in full and cuts, so the rows are FLUX's own).
        length: Literal["full", "longest"] = "full" if p.rows.last_pad > 0 else "longest"
        encoding = ctx.encode_prompts(prompts, length=length)
        if p.eot_index == "legacy_wordcount" and ctx.adapter.tokenizer.bos_token_id is None:
            raise EditError(
                "eot_index: legacy_wordcount reproduces the reference code's rows, words + 1, which count CLIP's "
                f"start token at position 0; the {ctx.adapter.family} tokenizer has none; use eot_index: token"
            )
        if p.eot_index == "legacy_wordcount":
            words = torch.tensor([len(prompt.split()) + 1 for prompt in prompts])
            encoding.eot_index = words.clamp(max=min(_LAST, encoding.input_ids.shape[1] - 1))
        return encoding

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p = self.params
        pairs = ctx.concept_pairs(p.concepts)
        malicious = self.encode_prompts(ctx, [pair.source for pair in pairs])
        safe = self.encode_prompts(ctx, [pair.target for pair in pairs])
        captions = None
        if p.prior is not None:
            path, column = resolve_prompt_file(p.prior.captions, ctx.cache_dir, ctx.base_dir)
            captions = read_prompts(path, column, p.prior.limit)
        rows = _Mapping("rows", *_mapping_rows(ctx, p.rows, pairs, malicious, safe))
        if p.prior is not None and captions is not None:
            rows.prior = embedding_prior(ctx, captions, p.prior.positions)
        mappings = [rows]
        pooled = _pooled_mapping(ctx, p, malicious, safe, captions)
        if pooled is not None:
            mappings.append(pooled)
        for mapping in mappings:
            yield mapping.edit(p, f"TRCE [EoT] mapping ({len(pairs)} pairs)")
        if p.adversarial is None:
            return
        maps = {m.stream: [linear for _, linear in text_maps(ctx.adapter, p.projections, m.stream)] for m in mappings}
        with torch.no_grad(), ctx.reference_weights("base"):
            original = {
                stream: [linear.weight.detach().clone() for linear in linears] for stream, linears in maps.items()
            }
        shape = malicious.hidden.shape
        for round_ in range(p.adversarial.rounds):
            for mapping in mappings:
                current = [linear.weight.detach() for linear in maps[mapping.stream]]  # the weights the last solve left
                if mapping.stream == "rows":
                    found = matching_inputs(
                        current, original["rows"], malicious.hidden.reshape(-1, shape[-1]), p.adversarial.regular_scale
                    )
                    adversarial = replace(malicious, hidden=found.reshape(shape).to(malicious.hidden.dtype))
                    more = _mapping_rows(ctx, p.rows, pairs, adversarial, safe)
                else:  # its first pairs are the prompts' own: malicious pooled vectors, their safe ones, weights
                    found = matching_inputs(current, original["pooled"], mapping.keys[0], p.adversarial.regular_scale)
                    more = ([found], mapping.targets[:1], mapping.weights[:1])
                mapping.add(*more, weight=p.adversarial.weight)
                yield mapping.edit(p, f"TRCE [EoT] mapping, adversarial round {round_ + 1}/{p.adversarial.rounds}")


@dataclass
class _Mapping:
    """One stream's mapping pairs so far (the text rows, or FLUX's pooled vectors) and its prior."""

    stream: Literal["rows", "pooled"]
    keys: list[Tensor]
    targets: list[Tensor]
    weights: list[Tensor]
    prior: Tensor | None = None

    def add(self, keys: list[Tensor], targets: list[Tensor], weights: list[Tensor], *, weight: float) -> None:
        self.keys += keys
        self.targets += targets
        self.weights += [w * weight for w in weights]

    def edit(self, p: TrceEotParams, label: str) -> KVEdit:
        return KVEdit(
            keys=torch.cat(self.keys),
            targets=torch.cat(self.targets),
            weights=torch.cat(self.weights),
            prior=self.prior,
            prior_scale=p.eta,
            ridge=p.ridge,
            projections=tuple(p.projections),
            label=label + (", pooled vectors" if self.stream == "pooled" else ""),
            stream=self.stream,
        )


def _pooled_mapping(
    ctx: EditContext, p: TrceEotParams, malicious: PromptEncoding, safe: PromptEncoding, captions: list[str] | None
) -> _Mapping | None:
    """FLUX's CLIP pooled vector is CLIP's [EoT] output: each malicious prompt's maps to its safe
    prompt's with the [EoT] rows' weight, through the pooled projection, with the captions' pooled
    prior. None on backbones without maps of the pooled vector, or when [EoT] rows weigh nothing."""
    if not ctx.adapter.pooled_layers() or p.rows.eot == 0 or malicious.pooled is None or safe.pooled is None:
        return None
    n = len(malicious)
    mapping = _Mapping("pooled", [malicious.pooled], [safe.pooled], [torch.full((n,), p.rows.eot / n)])
    if p.prior is not None and captions is not None:
        mapping.prior = embedding_prior(ctx, captions, stream="pooled")
    return mapping


def _mapping_rows(
    ctx: EditContext, rows: TokenRows, pairs: Sequence[PromptPair], malicious: PromptEncoding, safe: PromptEncoding
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The key rows of ``malicious``, the safe rows they map to and their weights, per chosen row kind."""
    keys, targets, weights = [], [], []
    n = len(pairs)
    for row in ("sot", "eot", "last_pad"):
        weight = getattr(rows, row)
        if weight > 0:
            keys.append(malicious.row(row))
            targets.append(safe.row(row))
            per_pair = torch.full((n,), weight / n)
            if row == "last_pad" and rows.last_pad_weighting == "padding":
                # Padding positions after the malicious prompt's first [EoT] (by the chosen index
                # convention): the reference's 77 − words − 2 when the index is words + 1.
                last = malicious.input_ids.shape[1] - 1
                per_pair = per_pair * (last - malicious.eot_index).clamp(min=0)
            weights.append(per_pair)
    if rows.keyword > 0:
        m_pos = malicious.keyword_positions([ctx.adapter.token_ids(pair.concept) for pair in pairs])
        s_pos = safe.keyword_positions([ctx.adapter.token_ids(pair.target_concept) for pair in pairs])
        found = m_pos >= 0
        s_pos = torch.where(s_pos >= 0, s_pos, safe.eot_index)  # a target with no words maps to its [EoT]
        keys.append(malicious.rows(m_pos.clamp(min=0))[found])
        targets.append(safe.rows(s_pos)[found])
        weights.append(torch.full((int(found.sum()),), rows.keyword / n))
    if rows.following > 0:
        found_keys, found_targets = _following_rows(ctx, pairs, malicious, safe)
        keys.append(found_keys)
        targets.append(found_targets)
        weights.append(torch.full((len(found_keys),), rows.following / n))
    return keys, targets, weights


def _following_rows(
    ctx: EditContext, pairs: Sequence[PromptPair], malicious: PromptEncoding, safe: PromptEncoding
) -> tuple[Tensor, Tensor]:
    """Row pairs from each concept's last token to the token before the first [EoT], matched to the
    same rows after the safe concept. A pair whose prompts do not continue alike after the two
    concepts (different tail lengths), or that does not contain its concepts, gives none."""
    concept_ids = [ctx.adapter.token_ids(pair.concept) for pair in pairs]
    target_ids = [ctx.adapter.token_ids(pair.target_concept) for pair in pairs]
    m_start, s_start = malicious.keyword_positions(concept_ids), safe.keyword_positions(target_ids)
    keys, targets = [], []
    for i in range(len(pairs)):
        if m_start[i] < 0 or s_start[i] < 0:
            continue
        m_last = int(m_start[i]) + len(concept_ids[i]) - 1
        s_last = int(s_start[i]) + len(target_ids[i]) - 1
        m_eot, s_eot = int(malicious.eot_index[i]), int(safe.eot_index[i])
        if m_eot - m_last != s_eot - s_last or not torch.equal(
            malicious.input_ids[i, m_last + 1 : m_eot], safe.input_ids[i, s_last + 1 : s_eot]
        ):
            continue
        keys.append(malicious.hidden[i, m_last:m_eot])
        targets.append(safe.hidden[i, s_last:s_eot])
    if not keys:
        raise ValueError(
            "rows.following found no pair whose prompts continue alike after the concept; "
            "give pairs that differ only in the concept (e.g. a generated concept set) or set it to 0"
        )
    return torch.cat(keys), torch.cat(targets)


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(TrceEot)
