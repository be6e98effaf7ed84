"""conceptedit-example: the ``concept_swap`` edit method, a plugin in one file.

It uses two engine hook points: prompt encoding (to get each prompt's [EoT] embedding) and
attention edit (to hand the engine a key/value problem to solve in closed form).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pydantic import Field, field_validator

from conceptedit import EditContext, EditMethod, KVEdit, MethodParams, PromptEncoding, hookimpl


class SwapParams(MethodParams):
    """What a recipe can set under ``params:``; an unknown key is an error (extra="forbid")."""

    concept: str = Field(description="Phrase to replace, e.g. 'a cat'.")
    target: str = Field(description="Phrase it should behave like, e.g. 'a dog'.")
    templates: list[str] = Field(
        ["{}", "a photo of {}", "a painting of {}"],
        min_length=1,
        description="Prompts the swap is learned from; {} is the phrase.",
    )
    preserve: list[str] = Field([], description="Prompts whose outputs must not change.")
    preserve_scale: float = Field(1.0, ge=0, description="How hard to hold the preserve prompts.")
    ridge: float = Field(0.1, gt=0, description="Keeps the new weights near the old ones.")

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, templates: list[str]) -> list[str]:
        for template in templates:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no {{}} where the phrase goes")
        return templates


class ConceptSwap(EditMethod[SwapParams]):
    """Map the [EoT] embedding of concept prompts onto the projections of target prompts."""

    name = "concept_swap"
    summary = "Swap one concept for another by a closed-form cross-attention edit"
    kind = "closed_form"
    Params = SwapParams

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        # Only the [EoT] row is read. The text encoder is causal, so padding to the longest
        # prompt instead of to 77 tokens gives the same row for less work.
        return ctx.encode_prompts(prompts, length="longest")

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p = self.params
        sources = [t.replace("{}", p.concept) for t in p.templates]
        targets = [t.replace("{}", p.target) for t in p.templates]
        src = self.encode_prompts(ctx, sources)
        dst = self.encode_prompts(ctx, targets)
        preserve = None
        if p.preserve:
            preserve = self.encode_prompts(ctx, p.preserve).row("eot")
        yield KVEdit(
            keys=src.row("eot"),  # move what the concept prompts' [EoT] projects to ...
            targets=dst.row("eot"),  # ... onto what the target prompts' [EoT] projects to now
            preserve=preserve,
            preserve_scale=p.preserve_scale,
            ridge=p.ridge,
            label=f"{p.concept} -> {p.target}",
        )


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(ConceptSwap)
