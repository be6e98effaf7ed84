"""Small edit methods that exercise each engine hook point, for the engine's own tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from conceptedit import (
    ConceptRef,
    EditContext,
    EditMethod,
    KVEdit,
    MethodParams,
    PromptEncoding,
    TrainingConfig,
    hookimpl,
)


class MapParams(MethodParams):
    concepts: ConceptRef = Field(description="Concept set to map onto its targets.")
    projections: list[str] = Field(["v"], description="Projections to edit.")
    preserve_scale: float = Field(0.1, ge=0, description="Weight of keeping preserve prompts.")
    preserve: list[str] = Field(["a photo", "a cat", "a house"], description="Prompts whose outputs stay.")
    row: str = Field("eot", description="Token row to map.")


class EotMap(EditMethod[MapParams]):
    """Closed form: map each source prompt's token row onto its target's (TRCE stage-1 shaped)."""

    name = "test_eot_map"
    summary = "test: map [EoT] rows of sources onto targets"
    kind = "closed_form"
    Params = MapParams
    encoded: ClassVar[list[list[str]]] = []  # class-level log of the prompt-encoding hook, for assertions

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        EotMap.encoded.append(list(prompts))
        return super().encode_prompts(ctx, prompts)

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        p = self.params
        pairs = ctx.concept_pairs(p.concepts)
        src = self.encode_prompts(ctx, [x.source for x in pairs])
        dst = self.encode_prompts(ctx, [x.target for x in pairs])
        keep = self.encode_prompts(ctx, p.preserve)
        yield KVEdit(
            keys=src.row(p.row),  # type: ignore[arg-type]
            targets=dst.row(p.row),  # type: ignore[arg-type]
            preserve=keep.hidden.reshape(-1, keep.hidden.shape[-1]),
            preserve_scale=p.preserve_scale,
            projections=tuple(p.projections),
            label="eot-map",
        )


class SteerParams(MethodParams):
    concept: str = Field("a cat", description="Prompt whose prediction moves.")
    target: str = Field("a dog", description="Prompt whose base prediction is the goal.")
    nan_at: int | None = Field(None, description="Return a NaN loss at this step (tests only).")
    samples: int = Field(1, description="Latents per step; the loss couples them (not a sum over samples).")


class SteerTraining(TrainingConfig):
    steps: int = 4
    lr: float = 1e-3


class QuerySteer(EditMethod[SteerParams]):
    """Training: move attn2.to_q so the concept's prediction matches the base model's target prediction."""

    name = "test_q_steer"
    summary = "test: trajectory loss on cross-attention queries"
    kind = "training"
    Params = SteerParams
    Training = SteerTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        return [layer.parameter_name("q") for layer in ctx.cross_attention_layers()]

    def prepare_training(self, ctx: EditContext) -> None:
        p = self.params
        enc = ctx.encode_prompts([p.concept, p.target])
        self.concept, self.target = enc.hidden[:1], enc.hidden[1:]

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        p = self.params
        shape = ctx.adapter.latent_shape(p.samples)
        latents = torch.randn(shape, generator=ctx.generator)
        t = torch.randint(0, 1000, (p.samples,), generator=ctx.generator)
        with torch.no_grad(), ctx.reference_weights("base"):
            goal = ctx.predict_noise(latents, t, self.target.expand(p.samples, -1, -1))
        pred = ctx.predict_noise(latents, t, self.concept.expand(p.samples, -1, -1))
        loss = torch.nn.functional.mse_loss(pred, goal)
        if p.samples > 1:  # the samples' errors multiply: no sum over samples, so no per-sample backward
            loss = loss * torch.nn.functional.mse_loss(pred[:1], goal[:1])
        if p.nan_at == step:
            loss = loss * float("nan")
        return {"match": loss}


class Recorder:
    """Lifecycle-hook plugin that writes down every call it sees."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def conceptedit_before_edit(self, ctx: Any, edit: Any, index: int) -> None:
        self.calls.append(("before_edit", index))

    @hookimpl
    def conceptedit_after_edit(self, ctx: Any, edit: Any, index: int, outcome: Any) -> None:
        self.calls.append(("after_edit", (index, len(outcome.changed))))

    @hookimpl
    def conceptedit_on_train_step(self, ctx: Any, step: int, losses: dict[str, float], lr: float) -> None:
        self.calls.append(("train_step", (step, losses["total"])))

    @hookimpl
    def conceptedit_after_run(self, ctx: Any, result: Any) -> None:
        self.calls.append(("after_run", str(result.run_dir)))


class FakeMethodsPlugin:
    """Registers the test methods, the way an installed plugin module would."""

    __name__ = "fake_methods"

    @hookimpl
    def conceptedit_register_methods(self, register: Any) -> None:
        register(EotMap)
        register(QuerySteer)
