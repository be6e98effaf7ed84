"""UCE (``uce``): erase concepts with one closed-form edit of every cross-attention key/value projection.

Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024 (arXiv 2308.14761).
For every ``to_k``/``to_v`` weight ``W`` it solves

    min_W'  s_e Σ_i ||W' c_i − W g_i||²  +  s_p Σ_j ||W' p_j − W p_j||²  +  λ ||W' − W||²

(erase rows ``c_i`` move to what their guide rows ``g_i`` produce now, preserve rows ``p_j``
keep their outputs) through the engine's shared K/V solver, the same one TRCE stage 1 uses.

Which token rows are ``c``/``g``/``p`` is a parameter because the reference scripts differ and
released checkpoints depend on it: the newer script (the default here) uses each prompt's last
word token; the older one (and RECE's starting model) uses the last word token through the
end of the context, and all rows of the preserve prompts.

The older script also always preserves the empty prompt ``''`` (all 77 rows), with
``s_p = max(0.1, 1 / (1 + number of preserve concepts))``. Nothing is added implicitly here, so
rebuilding that script (and RECE's start) takes ``preserve: [""]`` (plus its own preserve
concepts) and that ``preserve_scale``, with ``rows: last_word_to_end`` and
``preserve_rows: all``; leaving the ``''`` out changes the edit by most of its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from conceptedit import ConceptRef, EditContext, EditMethod, KVEdit, MethodParams, PromptEncoding, hookimpl
from conceptedit.toolkit import RowSelection, aligned_rows, encoding_length, erase_edit, select_rows


class UceParams(MethodParams):
    concepts: ConceptRef = Field(
        description="Concept set to erase. Each entry's prompts move to its guide: the set's `target` "
        "('' = unconditional, the paper's choice for unsafe content; 'art' for artistic styles) or the pair's.",
    )
    preserve: list[str] = Field(
        [],
        description="Concepts/prompts whose outputs must not change (e.g. other artists when erasing one). "
        "The old script always adds '' (the empty prompt); list it here to reproduce that.",
    )
    preserve_scale: NonNegativeFloat = Field(
        1.0,
        description="s_p. New script: 1; old script: max(0.1, 1 / (1 + number of preserve concepts)), "
        "counting its implicit '' (1.0 when '' is the only one).",
    )
    erase_scale: PositiveFloat = Field(1.0, description="s_e: weight of every erase row (1 in both scripts).")
    ridge: NonNegativeFloat = Field(0.5, description="λ‖W'−W‖² (lamb; 0.5 in both reference scripts).")
    rows: RowSelection = Field(
        "last_word",
        description="Token rows of erase/guide prompts: last_word (new script), last_word_to_end (old script, "
        "aligned row by row), eot (first end token), all (77 rows).",
    )
    preserve_rows: RowSelection | None = Field(
        None, description="Token rows of preserve prompts (null: the same as `rows`; the old script used `all`)."
    )
    technique: Literal["replace", "tensor"] = Field(
        "replace",
        description="replace: erase rows take the guide's output; tensor: the guide's output minus its "
        "component along the concept's own output.",
    )
    projections: list[Literal["k", "v"]] = Field(["k", "v"], min_length=1, description="Projections to edit.")

    @model_validator(mode="after")
    def _solvable(self) -> UceParams:
        if self.ridge == 0 and not (self.preserve and self.preserve_scale > 0):
            raise ValueError(
                "ridge is 0 and nothing is preserved, so the closed-form system is singular; "
                "set ridge > 0 (UCE uses 0.5) or give `preserve` concepts with preserve_scale > 0"
            )
        return self


class Uce(EditMethod):
    """UCE: move erase concepts' key/value outputs to their guides', keep preserve concepts'."""

    name = "uce"
    summary = "UCE: erase concepts toward guide concepts, preserving others (closed-form K/V edit)"
    kind = "closed_form"
    paper = "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024, arXiv:2308.14761"
    Params = UceParams

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        p: UceParams = self.params  # type: ignore[assignment]
        # Rows past the first end token need the full 77-token padding; the rest do not.
        needs = {encoding_length(p.rows), encoding_length(p.preserve_rows or p.rows)}
        return ctx.encode_prompts(prompts, length="full" if "full" in needs else "longest")

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p: UceParams = self.params  # type: ignore[assignment]
        pairs = ctx.concept_pairs(p.concepts)
        erase = self.encode_prompts(ctx, [pair.source for pair in pairs])
        guide = self.encode_prompts(ctx, [pair.target for pair in pairs])
        keys, guides = aligned_rows(erase, guide, p.rows)
        preserve = select_rows(self.encode_prompts(ctx, p.preserve), p.preserve_rows or p.rows) if p.preserve else None
        yield erase_edit(
            keys,
            guides,
            erase_scale=p.erase_scale,
            preserve=preserve,
            preserve_scale=p.preserve_scale,
            ridge=p.ridge,
            technique=p.technique,
            projections=p.projections,
            label=f"UCE erase ({len(pairs)} prompts, {keys.shape[0]} rows)",
        )


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Uce)
