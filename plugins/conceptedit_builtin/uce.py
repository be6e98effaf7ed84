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

On FLUX the rows are T5's and the edited map is ``context_embedder`` (both ``k`` and ``v``); the
prompts' CLIP pooled vectors, which FLUX also reads, get the same problem on the pooled
projection's first linear map: each erase prompt's pooled vector moves to its guide's, the
preserve prompts' stay (docs/backbones.md, "FLUX").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pydantic import Field

from conceptedit import EditContext, EditMethod, KVEdit, PromptEncoding, hookimpl
from conceptedit.toolkit import ErasureParams, RowSelection, aligned_rows, encoding_length, select_rows


class UceParams(ErasureParams):
    # Inherited: concepts, preserve, preserve_scale, erase_scale, ridge, technique, projections.
    rows: RowSelection = Field(
        "last_word",
        description="Token rows of erase/guide prompts: last_word (new script), last_word_to_end (old script, "
        "aligned row by row), eot (first end token), all (77 rows), after_sot (all but the start token).",
    )
    preserve_rows: RowSelection | None = Field(
        None, description="Token rows of preserve prompts (null: the same as `rows`; the old script used `all`)."
    )


class Uce(EditMethod[UceParams]):
    """UCE: move erase concepts' key/value outputs to their guides', keep preserve concepts'."""

    name = "uce"
    summary = "UCE: erase concepts toward guide concepts, preserving others (closed-form K/V edit)"
    kind = "closed_form"
    paper = "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024, arXiv:2308.14761"
    Params = UceParams
    backbones = frozenset({"sd1", "sd2", "sdxl", "flux"})

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        p = self.params
        # Rows past the first end token need the full 77-token padding; the rest do not.
        needs = {encoding_length(p.rows), encoding_length(p.preserve_rows or p.rows)}
        return ctx.encode_prompts(prompts, length="full" if "full" in needs else "longest")

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p = self.params
        pairs = ctx.concept_pairs(p.concepts)
        erase = self.encode_prompts(ctx, [pair.source for pair in pairs])
        guide = self.encode_prompts(ctx, [pair.target for pair in pairs])
        keys, guides = aligned_rows(erase, guide, p.rows)
        kept = self.encode_prompts(ctx, p.preserve) if p.preserve else None
        preserve = select_rows(kept, p.preserve_rows or p.rows) if kept is not None else None
        yield p.erase_edit(keys, guides, preserve, label=f"UCE erase ({len(pairs)} prompts, {keys.shape[0]} rows)")
        if ctx.adapter.pooled_layers() and erase.pooled is not None and guide.pooled is not None:
            kept_pooled = kept.pooled if kept is not None else None
            label = f"UCE erase, pooled vectors ({len(pairs)} prompts)"
            yield p.erase_edit(erase.pooled, guide.pooled, kept_pooled, label=label, stream="pooled")


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Uce)
