"""TRCE stage 1 (``trce_eot``): map malicious prompts' [EoT] embeddings onto safe ones in closed form.

Chen et al., "TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image Diffusion
Models", ICCV 2025 (arXiv 2503.07389). For every cross-attention ``to_k`` and ``to_v``:

    W' = (Σ_i W e_s,i e_m,iᵀ / N + η W C) (Σ_i e_m,i e_m,iᵀ / N + η C)⁻¹

with ``e_m``/``e_s`` the text encoder's output at the first [EoT] token of each malicious/safe
prompt pair and ``C`` the preservation prior over a caption set. The engine's shared K/V
solver does the algebra (one Cholesky solve shared by every layer).

Differences from the reference code, on purpose (see docs/methods/trce.md):
* the [EoT] position comes from token ids (``eot_index: token``); the reference counts
  whitespace words, which misses the real [EoT] for multi-piece words such as "Nudity".
  ``eot_index: legacy_wordcount`` reproduces the reference's rows.
* the prior is normalised per caption and scaled by ``eta``; the reference's cache sums over
  30,000 captions and multiplies by ``s²/30000``, which is the same as ``eta = s²`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from conceptedit import ConceptRef, EditContext, EditMethod, KVEdit, MethodParams, PromptEncoding, hookimpl
from conceptedit.toolkit import embedding_prior, read_prompts, resolve_prompt_file

#: Largest index a legacy word count may reach (SD's 77-token context).
_LAST = 76


class TokenRows(MethodParams):
    """Weight of each token row pair fed to the solve (the paper's mapping-target ablation)."""

    eot: NonNegativeFloat = Field(1.0, description="First [EoT] of malicious → first [EoT] of safe (TRCE).")
    sot: NonNegativeFloat = Field(0.0, description="[SoT] row (ablation [EoT]+[SoT]).")
    last_pad: NonNegativeFloat = Field(0.0, description="Last padding [EoT] (position 76) of both prompts.")
    keyword: NonNegativeFloat = Field(
        0.0, description="First token of the malicious concept → first token of the safe concept (ablation [KEY])."
    )

    @model_validator(mode="after")
    def _some_row(self) -> TokenRows:
        if not any((self.eot, self.sot, self.last_pad, self.keyword)):
            raise ValueError("at least one token row needs a weight > 0")
        return self


class PriorSpec(MethodParams):
    """The caption set whose token embeddings the edit must keep (C in the formula)."""

    captions: str = Field(
        "coco-30k",
        description="Prompt file path (CSV with a `prompt` column or .txt), "
        "or a known source name (coco-30k) downloaded once to the cache.",
    )
    limit: PositiveInt | None = Field(3000, description="Use the first N captions (TRCE used 3,000 / 30,000).")
    positions: Literal["all", "through_eot"] = Field(
        "all", description="Token rows per caption: all 77 (TRCE), or only up to the first [EoT]."
    )


class TrceEotParams(MethodParams):
    concepts: ConceptRef = Field(description="Concept set of [malicious, safe] pairs expanded by templates.")
    rows: TokenRows = Field(default_factory=TokenRows, description="Token rows and their weights.")
    eot_index: Literal["token", "legacy_wordcount"] = Field(
        "token", description="token: first [EoT] from token ids (paper); legacy_wordcount: words + 1 (reference code)."
    )
    eta: NonNegativeFloat = Field(
        1e-4,
        description="Prior weight η. The paper's preserve_scale s gives η = s²: 1e-4 (sexual, s=0.01), "
        "4e-4 (multi-concept, s=0.02).",
    )
    prior: PriorSpec | None = Field(default_factory=PriorSpec, description="Preservation prior (null: none).")
    ridge: NonNegativeFloat = Field(0.0, description="λ‖W'−W‖² (TRCE uses 0).")
    projections: list[Literal["k", "v"]] = Field(["k", "v"], min_length=1, description="Projections to edit.")


class TrceEot(EditMethod):
    """TRCE stage 1: closed-form [EoT] mapping on every cross-attention key/value projection."""

    name = "trce_eot"
    summary = "TRCE stage 1: map malicious prompts' [EoT] embeddings to safe ones (closed-form K/V edit)"
    kind = "closed_form"
    paper = "Chen et al., TRCE, ICCV 2025, arXiv:2503.07389"
    Params = TrceEotParams

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        p: TrceEotParams = self.params  # type: ignore[assignment]
        # The encoder is causal: rows up to the first [EoT] need no padding beyond the longest prompt.
        length = "full" if p.rows.last_pad > 0 else "longest"
        encoding = ctx.encode_prompts(prompts, length=length)
        if p.eot_index == "legacy_wordcount":
            words = torch.tensor([len(prompt.split()) + 1 for prompt in prompts])
            encoding.eot_index = words.clamp(max=min(_LAST, encoding.input_ids.shape[1] - 1))
        return encoding

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p: TrceEotParams = self.params  # type: ignore[assignment]
        pairs = ctx.concept_pairs(p.concepts)
        malicious = self.encode_prompts(ctx, [pair.source for pair in pairs])
        safe = self.encode_prompts(ctx, [pair.target for pair in pairs])
        keys, targets, weights = [], [], []
        n = len(pairs)
        for row in ("sot", "eot", "last_pad"):
            weight = getattr(p.rows, row)
            if weight > 0:
                keys.append(malicious.row(row))
                targets.append(safe.row(row))
                weights.append(torch.full((n,), weight / n))
        if p.rows.keyword > 0:
            m_pos = malicious.keyword_positions([ctx.adapter.token_ids(pair.concept) for pair in pairs])
            s_pos = safe.keyword_positions([ctx.adapter.token_ids(pair.target_concept) for pair in pairs])
            found = m_pos >= 0
            s_pos = torch.where(s_pos >= 0, s_pos, safe.eot_index)  # a target with no words maps to its [EoT]
            keys.append(malicious.rows(m_pos.clamp(min=0))[found])
            targets.append(safe.rows(s_pos)[found])
            weights.append(torch.full((int(found.sum()),), p.rows.keyword / n))
        prior = None
        if p.prior is not None:
            path, column = resolve_prompt_file(p.prior.captions, ctx.run.cache_dir, ctx.run.loaded.base_dir)
            prior = embedding_prior(ctx, read_prompts(path, column, p.prior.limit), p.prior.positions)
        yield KVEdit(
            keys=torch.cat(keys),
            targets=torch.cat(targets),
            weights=torch.cat(weights),
            prior=prior,
            prior_scale=p.eta,
            ridge=p.ridge,
            projections=tuple(p.projections),
            label=f"TRCE [EoT] mapping ({n} pairs)",
        )


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(TrceEot)
