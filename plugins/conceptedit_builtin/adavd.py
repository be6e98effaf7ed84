"""AdaVD (``adavd``): remove a concept's direction from cross-attention values while sampling.

Wang et al., "Precise, Fast, and Low-cost Concept Erasure in Value Space: Orthogonal
Complement Matters" (AdaVD), CVPR 2025. No weights change. In every cross-attention layer, for
each prompt token ``i`` with value ``v_i`` and the concept's value ``c`` (the layer's ``to_v``
applied to the concept's last token embedding, the same for every position):

    v_i ← v_i − σ(cos(v_i, c)) ⟨v_i, ĉ⟩ ĉ,      σ(x) = shift_max / (1 + exp(−shift_slope (x − shift_center)))

so tokens that carry the concept lose (up to twice) their component along it and the rest keep
theirs; the start token is never touched. Several concepts use a Gram–Schmidt basis of their
values, each direction gated by the token's similarity to its own concept. Shift weights below
``cutoff × shift_max`` are set to exactly zero, which makes prompts unrelated to the concepts
(and the unconditional branch) come out bit for bit as without AdaVD.

Installed as an attention processor that wraps whatever processor each ``attn2`` has (it
edits ``to_v``'s output while the wrapped processor runs), so it composes with other processors
and guards. Applied at every step (the reference's default ``decomp_timestep`` 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, PositiveFloat, ValidationError
from torch import Tensor, nn

from conceptedit import EditContext, EditMethod, Guard, MethodParams, RunDirError, hookimpl
from conceptedit.toolkit import DenoisingState, denoising_state

if TYPE_CHECKING:
    from conceptedit import BackboneAdapter


class AdaVDParams(MethodParams):
    erase: list[str] = Field(min_length=1, description="Concept phrases to remove, e.g. ['nudity'] or ['Van Gogh'].")
    shift_slope: PositiveFloat = Field(100.0, description="a in the adaptive shift σ (100).")
    shift_center: float = Field(0.93, ge=-1, le=1, description="b: cosine similarity at which σ is half-way (0.93).")
    shift_max: PositiveFloat = Field(2.0, description="c: the most of its concept component a token loses (2).")
    cutoff: float = Field(
        1e-3, ge=0, lt=1, description="Shift weights below cutoff × shift_max become exactly 0 (untouched tokens)."
    )


class AdaVDSettings(AdaVDParams):
    """What the guard file stores (the parameters, validated again when a run is loaded)."""


class _ValueEdit:
    """Edits one layer's ``to_v`` output; shared by the processor of that layer."""

    def __init__(self, concepts: Tensor, settings: AdaVDSettings) -> None:
        self.concepts = concepts  # [K, D] text-embedding rows
        self.settings = settings
        self.busy = False

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if self.busy:
            return None  # our own call of to_v on the concept rows, below
        self.busy = True
        try:
            concept = module(self.concepts.to(output.device, output.dtype)).float()  # [K, d]
        finally:
            self.busy = False
        s = self.settings
        values = output.float()  # [B, L, d]
        norms = values.norm(dim=-1, keepdim=True) * concept.norm(dim=-1)
        cos = (values @ concept.T) / norms.clamp_min(1e-12)  # [B, L, K]
        weight = s.shift_max * torch.sigmoid(s.shift_slope * (cos - s.shift_center))
        weight[:, 0] = 0.0  # the start token carries no concept
        weight = torch.where(weight >= s.cutoff * s.shift_max, weight, torch.zeros_like(weight))
        touched = (weight > 0).any(-1, keepdim=True)
        if not bool(touched.any()):
            return None  # nothing concept-like in this batch: the values pass through unchanged
        basis, kept = _orthonormal(concept)  # [K', d]; a concept inside the others' span adds no direction
        weight = weight[..., kept]
        removed = (weight * (values @ basis.T)) @ basis
        return torch.where(touched, (values - removed).to(output.dtype), output)


def _orthonormal(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Gram–Schmidt (via QR) of the concept values, and which concepts gave a new direction."""
    q, r = torch.linalg.qr(rows.T)
    diag = r.diagonal().abs()
    keep = diag > 1e-6 * diag.max()
    return q.T[keep], keep


class AdaVDProcessor:
    """Wraps an attention processor; while it runs, ``attn.to_v``'s output loses the concept directions."""

    def __init__(self, inner: Any, edit: _ValueEdit, state: DenoisingState) -> None:
        self.inner = inner
        self.edit = edit
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        call = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask, **kwargs}
        if encoder_hidden_states is None or not self.state.enabled:
            return self.inner(attn, hidden_states, **call)
        handle = attn.to_v.register_forward_hook(self.edit)
        try:
            return self.inner(attn, hidden_states, **call)
        finally:
            handle.remove()


class AdaVD(EditMethod):
    """AdaVD: orthogonal-complement edit of cross-attention values, gated per token."""

    name = "adavd"
    summary = "AdaVD: remove concept directions from cross-attention values per token at sampling time"
    kind = "inference_time"
    paper = "Wang et al., Precise, Fast, and Low-cost Concept Erasure in Value Space (AdaVD), CVPR 2025"
    Params = AdaVDParams

    def inference_guard(self, ctx: EditContext) -> Guard:
        return Guard(config={"adavd": self.params.model_dump()})

    @classmethod
    def install_guard(cls, pipeline: Any, guard: Guard, adapter: BackboneAdapter) -> None:
        try:
            settings = AdaVDSettings.model_validate(guard.config.get("adavd"))
        except ValidationError as exc:
            raise RunDirError(f"the AdaVD guard's settings are invalid (was the file edited?): {exc}") from exc
        # Each concept's last word token, as encoded on its own ("spread" over every position).
        concepts = adapter.encode_prompts(settings.erase, length="longest").row("last_word")
        state = denoising_state(pipeline)
        for layer in adapter.cross_attention_layers():
            module = layer.module
            module.set_processor(AdaVDProcessor(module.processor, _ValueEdit(concepts, settings), state))


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(AdaVD)
