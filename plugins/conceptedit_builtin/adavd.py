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

``formulation: reference`` follows the authors' code instead (``src/main.py``): per position it
projects the concatenation ``p = [u; v]`` of the unconditional and the conditional value onto
``t = [u; c]``, so the unconditional branch is edited as well and the gate sees the shared
``u``; its command line runs without the adaptive shift (weight 1), hence ``adaptive_shift``
defaults to off there. See ``docs/methods/sld-adavd.md``.

Installed as an attention processor that wraps whatever processor each ``attn2`` has (it
edits ``to_v``'s output while the wrapped processor runs), so it composes with other processors
and guards. Applied at every step (the reference's default ``decomp_timestep`` 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, ValidationInfo, field_validator
from torch import Tensor, nn

from conceptedit import EditContext, EditMethod, Guard, MethodParams, RunDirError, hookimpl
from conceptedit.toolkit import DenoisingState, denoising_state

if TYPE_CHECKING:
    from conceptedit import BackboneAdapter

DEFAULT_CUTOFF = 1e-3


class AdaVDParams(MethodParams):
    erase: list[str] = Field(min_length=1, description="Concept phrases to remove, e.g. ['nudity'] or ['Van Gogh'].")
    formulation: Literal["paper", "reference"] = Field(
        "paper",
        description="paper = each branch's value projected on its own (the paper's equation); reference = the "
        "authors' code: [uncond; cond] values projected together, the unconditional branch edited too.",
    )
    adaptive_shift: bool | None = Field(
        None,
        description="Gate the projection with the sigmoid σ(cos); off = plain projection (weight 1). "
        "null: on for paper, off for reference (its command line's default; --token_sim turns it on).",
    )
    shift_slope: PositiveFloat = Field(100.0, description="a in the adaptive shift σ (100).")
    shift_center: float = Field(0.93, ge=-1, le=1, description="b: cosine similarity at which σ is half-way (0.93).")
    shift_max: PositiveFloat = Field(2.0, description="c: the most of its concept component a token loses (2).")
    cutoff: float = Field(
        DEFAULT_CUTOFF,
        ge=0,
        lt=1,
        description="Shift weights below cutoff × shift_max become exactly 0 (untouched tokens); "
        "paper formulation with the adaptive shift only.",
    )

    @field_validator("shift_slope", "shift_center", "shift_max")
    @classmethod
    def _shift_in_use(cls, value: float, info: ValidationInfo) -> float:
        # Runs only for values the recipe gives: a setting that would be silently ignored is an error.
        if not _shift_on(info.data.get("formulation", "paper"), info.data.get("adaptive_shift")):
            raise ValueError(
                f"{info.field_name} shapes the adaptive shift, which is off here "
                "(set adaptive_shift: true, or drop the setting)"
            )
        return value

    @field_validator("cutoff")
    @classmethod
    def _cutoff_in_use(cls, value: float, info: ValidationInfo) -> float:
        formulation = info.data.get("formulation", "paper")
        if formulation != "paper" or not _shift_on(formulation, info.data.get("adaptive_shift")):
            raise ValueError(
                "cutoff applies only to formulation: paper with the adaptive shift on "
                "(the reference code has no cutoff); drop the setting"
            )
        return value

    def resolved(self) -> AdaVDSettings:
        """The settings the guard stores, with the formulation's defaults filled in."""
        shift = _shift_on(self.formulation, self.adaptive_shift)
        values = self.model_dump()
        values.update(adaptive_shift=shift, cutoff=self.cutoff if self.formulation == "paper" and shift else 0.0)
        return AdaVDSettings.model_validate(values)


def _shift_on(formulation: str, adaptive_shift: bool | None) -> bool:
    return formulation == "paper" if adaptive_shift is None else adaptive_shift


class AdaVDSettings(BaseModel):
    """What the guard file stores (validated again when a run is loaded; a guard written before
    ``formulation`` existed reads as the paper formulation)."""

    model_config = ConfigDict(extra="forbid")

    erase: list[str] = Field(min_length=1)
    formulation: Literal["paper", "reference"] = "paper"
    adaptive_shift: bool = True
    shift_slope: PositiveFloat = 100.0
    shift_center: float = Field(0.93, ge=-1, le=1)
    shift_max: PositiveFloat = 2.0
    cutoff: float = Field(DEFAULT_CUTOFF, ge=0, lt=1)


class _CfgBatch:
    """How many images the UNet's current call holds, when it is a classifier-free-guidance batch.

    The reference formulation pairs each conditional row with its image's unconditional row. A
    value hook cannot tell the layout from the batch size alone (SLD appends a third branch), so
    a UNet pre-hook, put before every other pre-hook, notes it from the pipeline's own call.
    """

    def __init__(self, pipeline: Any, state: DenoisingState) -> None:
        self.pipeline = pipeline
        self.state = state
        self.half: int | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs.get("sample")
        cfg = bool(getattr(self.pipeline, "do_classifier_free_guidance", False))
        self.half = None
        if isinstance(sample, Tensor) and sample.shape[0] % 2 == 0 and self.state.active and cfg:
            self.half = sample.shape[0] // 2


class _ValueEdit:
    """Edits one layer's ``to_v`` output; shared by the processor of that layer."""

    def __init__(self, concepts: Tensor, settings: AdaVDSettings, batch: _CfgBatch | None = None) -> None:
        self.concepts = concepts  # [K, D] text-embedding rows
        self.settings = settings
        self.batch = batch
        self.busy = False

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if self.busy:
            return None  # our own call of to_v on the concept rows, below
        self.busy = True
        try:
            concept = module(self.concepts.to(output.device, output.dtype))  # [K, d]
        finally:
            self.busy = False
        if self.settings.formulation == "reference":
            return self._reference(output, concept)
        if not self.settings.adaptive_shift:  # plain orthogonal complement: every token but the start one
            work = torch.promote_types(output.dtype, torch.float32)  # float64 stays float64 (tests)
            values = output.to(work)
            basis, _ = _orthonormal(concept.to(work))
            removed = (values @ basis.T) @ basis
            removed[:, 0] = 0.0
            return (values - removed).to(output.dtype)
        concept = concept.float()
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

    def _reference(self, output: Tensor, concept: Tensor) -> Tensor:
        """The authors' code: rows of a CFG batch edited in [uncond; cond] pairs (see ``_paired_removal``)."""
        work = torch.promote_types(output.dtype, torch.float32)  # float64 stays float64 (tests)
        values, concept = output.to(work), concept.to(work)
        rows = values.shape[0]
        half = self.batch.half if self.batch is not None else None
        if half is None or half == 0 or rows < 2 * half or rows % half:
            # No unconditional branch to pair with: the same formula with u = 0, on each row alone.
            removed = _paired_removal(torch.zeros_like(values), values, concept, self.settings)
            return (values - removed[..., values.shape[-1] :]).to(output.dtype)
        uncond, cond = values[:half], values[half:]
        partner = uncond.repeat(cond.shape[0] // half, 1, 1)  # row n + i pairs with uncond row i % n
        removed = _paired_removal(partner, cond, concept, self.settings)
        d = values.shape[-1]
        new_uncond = uncond - removed[:half, :, :d]  # only the image's own prompt row edits its uncond row
        new_cond = cond - removed[..., d:]
        return torch.cat([new_uncond, new_cond]).to(output.dtype)


def _paired_removal(uncond: Tensor, cond: Tensor, concept: Tensor, s: AdaVDSettings) -> Tensor:
    """What the reference removes from ``p = [u; v]`` per position, ``[B, L, 2d]``.

    Targets ``t_k = [u; c_k]``. Its basis is ``b_k = t_k − Σ_{i<k} (⟨t_i, t_k⟩/⟨t_i, t_i⟩) t_i``
    (projections on the raw earlier targets, so orthogonal only for up to two concepts), the
    coefficients ``a_k = ⟨b_k, p⟩/⟨b_k, b_k⟩``, and the gates ``g_k = σ(cos(t_k, p))`` (1 without
    the adaptive shift) scale the targets inside the basis: ``p − Σ_k a_k Σ_i P_ki g_i t_i``.
    One concept: ``g ⟨t, p⟩/⟨t, t⟩ · t``. The start position is never edited.
    """
    batch, length, _ = cond.shape
    k = concept.shape[0]
    p = torch.cat([uncond, cond], dim=-1)  # [B, L, 2d]
    targets = torch.cat(
        [uncond.unsqueeze(2).expand(-1, -1, k, -1), concept.expand(batch, length, -1, -1)], dim=-1
    )  # [B, L, K, 2d]
    mix = torch.eye(k, dtype=p.dtype, device=p.device).expand(batch, length, k, k).clone()  # P, row k builds b_k
    for row in range(1, k):
        for col in range(row):
            t_col = targets[:, :, col]
            mix[:, :, row, col] = -(t_col * targets[:, :, row]).sum(-1) / (t_col * t_col).sum(-1)
    basis = mix @ targets  # [B, L, K, 2d]
    coef = torch.nan_to_num((basis * p.unsqueeze(2)).sum(-1) / (basis * basis).sum(-1), nan=0.0)  # [B, L, K]
    coef[:, 0] = 0.0
    if s.adaptive_shift:
        cos = F.cosine_similarity(targets, p.unsqueeze(2).expand_as(targets), dim=-1)
        gate = s.shift_max * torch.sigmoid(s.shift_slope * (cos - s.shift_center))
    else:
        gate = torch.ones_like(coef)
    gated = mix @ (gate.unsqueeze(-1) * targets)  # [B, L, K, 2d]
    return (coef.unsqueeze(-1) * gated).sum(2)


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
        handle = attn.get_submodule("to_v").register_forward_hook(self.edit)
        try:
            return self.inner(attn, hidden_states, **call)
        finally:
            handle.remove()


class AdaVD(EditMethod[AdaVDParams]):
    """AdaVD: orthogonal-complement edit of cross-attention values, gated per token."""

    name = "adavd"
    summary = "AdaVD: remove concept directions from cross-attention values per token at sampling time"
    kind = "inference_time"
    paper = "Wang et al., Precise, Fast, and Low-cost Concept Erasure in Value Space (AdaVD), CVPR 2025"
    Params = AdaVDParams
    backbones = frozenset({"sd1", "sd2", "sdxl"})
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "flux": (
            "its guard wraps the attention processor of every cross-attention layer (attn2) to edit the text "
            "tokens' values; FLUX has no cross-attention layer: text and image tokens share one joint attention "
            "per block (and one set of projections in the single-stream blocks)"
        )
    }

    def inference_guard(self, ctx: EditContext) -> Guard:
        p = self.params
        return Guard(config={"adavd": p.resolved().model_dump()})

    @classmethod
    def install_guard(cls, pipeline: Any, guard: Guard, adapter: BackboneAdapter) -> None:
        try:
            settings = AdaVDSettings.model_validate(guard.config.get("adavd"))
        except ValidationError as exc:
            raise RunDirError(f"the AdaVD guard's settings are invalid (was the file edited?): {exc}") from exc
        # Each concept's last word token, as encoded on its own ("spread" over every position).
        concepts = adapter.encode_prompts(settings.erase, length="longest").row("last_word")
        state = denoising_state(pipeline)
        batch = None
        if settings.formulation == "reference":
            batch = _CfgBatch(pipeline, state)
            pipeline.unet.register_forward_pre_hook(batch, with_kwargs=True, prepend=True)
        for layer in adapter.cross_attention_layers():
            module: Any = layer.module  # a diffusers Attention: processors are its own API, not nn.Module's
            module.set_processor(AdaVDProcessor(module.processor, _ValueEdit(concepts, settings, batch), state))


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(AdaVD)
