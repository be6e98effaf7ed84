"""RECE (``rece``): rounds of UCE against closed-form adversarial embeddings.

Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models",
ECCV 2024. An erased model can still be steered back to the concept by an
embedding that is not any prompt's. Each round:

1. finds, in closed form, the embedding ``c'`` that makes the *current* projections reproduce
   what the *original* ones made of the concept ``c`` (all 77 rows, regularised to zero):
   ``c' = (Σ W'ᵀW' + λ_r I)⁻¹ (Σ W'ᵀ W₀) c`` over every edited ``to_k``/``to_v``;
2. erases ``c'`` the UCE way: its rows move to what the guide's rows produce now, the
   preserve prompts keep their outputs, the weights stay near the current ones.

Each round is one :class:`~conceptedit.KVEdit`; the engine applies it before the next round is
asked for, so round ``e + 1`` sees round ``e``'s weights. The paper starts from a model made by
UCE's older script: put a ``uce`` edit before this one with ``rows: last_word_to_end``,
``preserve_rows: all`` and ``preserve: [""]`` at ``preserve_scale: 1`` (that script always keeps
the empty prompt). The paper also picks the best round by a NudeNet score on validation
prompts; here every round is kept.

The reference keeps its guide ``' '`` once per erased concept, so with N concepts its preserve
weight is N × 0.1; ``preserve_repeat: per_concept`` does the same, the default keeps the
preserve prompts once (equal for a single concept).

On FLUX the rows are T5's (512 of them) and the edited map is ``context_embedder``; each round also
erases the closed-form adversarial *pooled* vector (the same formula on the pooled projection's
first linear map) toward the guide's pooled vector, keeping the preserve prompts' (docs/backbones.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor

from conceptedit import ConceptRef, EditContext, EditMethod, KVEdit, PromptEncoding, hookimpl
from conceptedit.toolkit import ErasureParams, matching_inputs, select_rows, text_maps

Stream = Literal["rows", "pooled"]


class ReceParams(ErasureParams):
    # UCE's erase-toward-guide block at RECE's defaults (a redeclared field keeps its place), then RECE's own.
    concepts: ConceptRef = Field(
        description="Concept set to erase and its guide (RECE guides toward ' ', i.e. set `target: ' '`).",
    )
    preserve: list[str] = Field(
        [" "], description="Prompts whose outputs each round keeps, all 77 rows (RECE keeps the guide ' ')."
    )
    preserve_scale: NonNegativeFloat = Field(0.1, description="s_p of the preserve prompts (0.1).")
    ridge: PositiveFloat = Field(0.1, description="λ‖W'−W‖² of each round (lamb, 0.1).")
    rounds: PositiveInt = Field(3, description="Adversarial rounds (epochs): 3 for nudity, 2 unsafe, 1 styles.")
    regular_scale: NonNegativeFloat = Field(
        0.1, description="λ_r pulling the adversarial embedding to zero: 0.1 nudity/unsafe, 1e-3 styles/objects."
    )
    preserve_repeat: Literal["once", "per_concept"] = Field(
        "once",
        description="once: the preserve prompts count once; per_concept: once per erase prompt, as RECE's "
        "train.py (one ' ' per concept), so their weight is N × preserve_scale.",
    )
    reference: Literal["base", "edit_start"] = Field(
        "base",
        description="W₀ the adversarial embedding must reproduce: base (the model before the run, the paper's "
        "original SD) or edit_start (the model as this edit found it).",
    )


class Rece(EditMethod[ReceParams]):
    """RECE: repeatedly erase the closed-form adversarial embedding of the concept."""

    name = "rece"
    summary = "RECE: rounds of UCE on closed-form adversarial embeddings of the concept (closed-form K/V edits)"
    kind = "closed_form"
    paper = "Gong et al., Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models, ECCV 2024"
    Params = ReceParams
    backbones = frozenset({"sd1", "sd2", "sdxl", "flux"})

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        # The adversarial embedding replaces the whole 77-row context, padding included.
        return ctx.encode_prompts(prompts, length="full")

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p = self.params
        pairs = ctx.concept_pairs(p.concepts)
        concept = self.encode_prompts(ctx, [pair.source for pair in pairs])
        guide = self.encode_prompts(ctx, [pair.target for pair in pairs])
        kept = self.encode_prompts(ctx, p.preserve) if p.preserve else None
        # (stream, concept inputs, guide inputs, preserve inputs): the rows, and FLUX's pooled vectors.
        streams: list[tuple[Stream, Tensor, Tensor, Tensor | None]] = [
            ("rows", concept.hidden, select_rows(guide, "all"), select_rows(kept, "all") if kept is not None else None)
        ]
        if ctx.adapter.pooled_layers() and concept.pooled is not None and guide.pooled is not None:
            streams.append(("pooled", concept.pooled, guide.pooled, kept.pooled if kept is not None else None))
        # Counting the preserve rows N times is the same as scaling them by N.
        preserve_scale = p.preserve_scale * (len(pairs) if p.preserve_repeat == "per_concept" else 1)
        maps = {
            stream: [linear for _, linear in text_maps(ctx.adapter, p.projections, stream)] for stream, *_ in streams
        }
        with torch.no_grad(), ctx.reference_weights(p.reference):
            original = {stream: [m.weight.detach().clone() for m in linears] for stream, linears in maps.items()}
        for round_ in range(p.rounds):
            for stream, inputs, guides, preserve in streams:
                current = [m.weight.detach() for m in maps[stream]]  # what the previous round left
                adversarial = matching_inputs(current, original[stream], inputs, p.regular_scale)
                yield p.erase_edit(
                    adversarial.reshape(-1, adversarial.shape[-1]),
                    guides,
                    preserve,
                    preserve_scale=preserve_scale,
                    label=f"RECE round {round_ + 1}/{p.rounds}" + (", pooled vectors" if stream == "pooled" else ""),
                    stream=stream,
                )


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Rece)
