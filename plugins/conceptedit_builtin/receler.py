"""Receler (``receler``): lightweight erasers after every cross-attention, trained adversarially.

Huang et al., "Receler: Reliable Concept Erasing of Text-to-Image Diffusion Models via
Lightweight Erasers", ECCV 2024 (arXiv 2311.17717). Re-implemented from the paper and its
reference code, jasper0314-huang/Receler (MIT): nothing here is copied from it.

No weight of the model changes. Each cross-attention layer ``l`` (every ``attn2``) gets an
eraser, a low-rank residual MLP on its output ``o_l = attn2_l(h, c)``:

    attn2'_l(h, c) = o_l + E_l(o_l),      E_l(o) = U_l GELU(D_l o + d_l) + u_l

with ``D_l`` ``rank x dim`` and the up-projection ``U_l, u_l`` starting at zero, so before training
the model samples exactly as before. Only the erasers train. One step, on a latent ``x_t`` of a
partial DDIM run (CFG) on the concept ``c`` and the UNet timestep ``t`` paired with it
(ESD's sampling; ``ε`` has the erasers on, ``ε*`` is the frozen model without them):

    attack   a* ≈ argmin_a ‖ε(x_t, t, E([c; a])) − ε*(x_t, t, c)‖²          k soft tokens a after c's words
    erase    L_e = ‖ε(x_t, t, E([c; a*])) − (ε*(x_t, t, ∅) − η (ε*(x_t, t, c) − ε*(x_t, t, ∅)))‖²
    mask     A = mean over heads, c's word tokens and the layers of side R of ε*(x_t, t, c)'s
             cross-attention probabilities; M = [(A − min A) / (max A − min A) ≥ τ], resized
             (nearest) to each layer's grid M_l
    localise L_r = mean_l  Σ_p (1 − M_l[p]) mean_ch(E_l(o_l)[p]²) / (Σ_p (1 − M_l[p]) + 1e-9)
    loss     L_e + β L_r                                   (logged as ``erase`` and ``localisation`` = β L_r)

``E`` is the text encoder; the attack is the shared soft-prompt adversary
(``ctx.adversary("soft_prompt")``, the object the attack suites evaluate with), warm-started from
the previous step's tokens by default. ``L_r`` is computed on the same forward pass as ``L_e``
(the erasers' outputs ``E_l(o_l)`` of the adversarial prompt), so the erasers learn to act only
where the concept is drawn.

The erasers are new modules, not base tensors: the method adds them for the training loop
(``added_modules``), and the run saves them as a guard (``trained_guard``: the rank and layer
names as JSON, the eraser weights as tensors) that ``install_guard`` puts back, as forward hooks
on each ``attn2``, after the run's weight edits and in :func:`conceptedit.load`. A forward hook
adds to whatever the layer's attention processor returns, so erasers compose with processors
(AdaVD) and UNet hooks (SLD) and survive a processor swap; suspended guards pass through.

``docs/methods/receler.md`` has the defaults, their source in the reference code, and where this
departs from it (notably: the reference's adversarial prompt never reaches its UNet).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)
from torch import Tensor, nn

from conceptedit import (
    AdversarialPrompt,
    CrossAttentionLayer,
    EditContext,
    EditError,
    EditMethod,
    Guard,
    RunDirError,
    TrainingConfig,
    hookimpl,
)
from conceptedit.toolkit import DenoisingState, EsdSample, NegativeGuidance, NegativeGuidanceParams, denoising_state

if TYPE_CHECKING:
    from conceptedit import BackboneAdapter

#: Format of the ``receler`` block of the guard's settings.
ARTIFACT_VERSION = 1
#: Each eraser's tensors in the guard, after its layer name (``<layer>.down.weight``, ...).
ERASER_TENSORS = ("down.weight", "down.bias", "up.weight", "up.bias")
_INSTALLED = "_conceptedit_receler_erasers"
_EPS = 1e-9  # the reference's guard against an empty outside region


class RecelerParams(NegativeGuidanceParams):
    concept: str = Field(
        description="Prompt of the concept to erase; the reference trains the bare word, e.g. 'nudity'."
    )
    rank: PositiveInt = Field(128, description="Width of each eraser's down-projection (reference --eraser_rank: 128).")
    reg_weight: NonNegativeFloat = Field(
        0.1,
        description="β, weight of the concept-localised regulariser (reference --concept_reg_weight: 0.1; 0 drops "
        "the term and the attention maps).",
    )
    mask_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="τ: the min-max normalised concept attention map's threshold (reference --mask_thres: 0.1).",
    )
    mask_resolution: PositiveInt | None = Field(
        None,
        description="Side of the cross-attention maps averaged into the mask (None: the second-coarsest side the "
        "UNet has, 16 for SD at 512 px, the reference's fixed 16 after MasaCtrl).",
    )
    mask_phrase: str | None = Field(
        None,
        description="Words of the concept prompt whose attention makes the mask (None: all its words, as the "
        "reference, whose prompt is the bare concept).",
    )
    eta: NonNegativeFloat = Field(1.0, description="Negative guidance η of the erase target (reference: 1.0).")
    sampling_guidance: NonNegativeFloat = Field(
        3.0, description="CFG scale of the partial DDIM run making x_t (reference --start_guidance: 3)."
    )
    sampling_steps: PositiveInt = Field(50, description="DDIM steps of a full run (reference --ddim_steps: 50).")
    sample_with: Literal["current", "base", "edit_start"] = Field(
        "current",
        description="Model that samples x_t: current = with the erasers being trained, every step (reference); "
        "base / edit_start = the frozen model without erasers, sampled once and cached.",
    )
    trajectories: PositiveInt | None = Field(
        None, description="Distinct starting noises to draw from (None: a fresh one for every draw, as the reference)."
    )
    timestep_pairing: Literal["compvis", "exact"] = Field(
        "compvis",
        description="compvis = the reference's (ESD's CompVis) pairing of x_t and t; exact = the latent after k DDIM "
        "steps at its own timestep (see the esd method).",
    )
    reference: Literal["base", "edit_start"] = Field(
        "base",
        description="Frozen model ε* (always without erasers): base = before the run, edit_start = before this edit.",
    )
    attack_tokens: PositiveInt = Field(16, description="Adversarial soft tokens (reference --num_advrs_prompts: 16).")
    attack_steps: NonNegativeInt = Field(
        50,
        description="Adam steps of the attack before every training step (reference --advrs_iters: 50); 0 = no "
        "attack, the plain concept prompt, which is what the reference code trains on in effect (see the docs).",
    )
    attack_lr: PositiveFloat = Field(
        1e-3,
        description="Adam learning rate of the attack, on token embeddings (AdvUnlearn's value for this attack; the "
        "reference's 0.1 steps text-encoder outputs, another space).",
    )
    attack_position: Literal["suffix", "prefix"] = Field(
        "suffix", description="Where the soft tokens go: after the concept's words (reference) or after [SoT]."
    )
    attack_radius: PositiveFloat | None = Field(
        None,
        description="L∞ ball around each attack's start that bounds the soft tokens (None: unbounded; the reference "
        "uses weight decay 0.1 instead).",
    )
    attack_init: Literal["latest", "random"] = Field(
        "latest",
        description="Start of each attack: the previous step's soft tokens (reference: kept across iterations) or "
        "random vocabulary tokens.",
    )

    @model_validator(mode="after")
    def _phrase_in_concept(self) -> RecelerParams:
        if self.mask_phrase is not None:
            words = " ".join(self.mask_phrase.lower().split())
            if not words or words not in " ".join(self.concept.lower().split()):
                raise ValueError(
                    f"mask_phrase {self.mask_phrase!r} must be words of the concept {self.concept!r} "
                    "(or leave it out: the mask then uses all of the concept's words)"
                )
        return self


class RecelerTraining(TrainingConfig):
    steps: int = Field(500, gt=0, description="Optimiser steps (reference --iterations: 500).")
    lr: float = Field(3e-4, gt=0, description="Learning rate of the erasers (reference: 3e-4).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adam", description="Optimiser (reference: Adam).")


class EraserSettings(BaseModel):
    """The guard's ``receler`` block: what :meth:`Receler.install_guard` reads besides the tensors."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    rank: PositiveInt
    layers: list[str] = Field(min_length=1)
    concept: str


# ----------------------------------------------------------------------------- the erasers


class Eraser(nn.Module):
    """``o ↦ up(GELU(down(o)))``: the reference's ``AdapterEraser`` (``up`` starts at zero)."""

    def __init__(self, down: nn.Linear, up: nn.Linear) -> None:
        super().__init__()
        self.down = down
        self.up = up

    @classmethod
    def new(cls, dim: int, rank: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Eraser:
        """A fresh eraser: ``down`` drawn as ``nn.Linear`` draws (U(±1/√dim)) from ``generator``, ``up`` zero."""
        down = nn.utils.skip_init(nn.Linear, dim, rank, dtype=dtype)  # no draw from the global generator
        up = nn.utils.skip_init(nn.Linear, rank, dim, dtype=dtype)
        bound = 1 / math.sqrt(dim)
        with torch.no_grad():
            down.weight.uniform_(-bound, bound, generator=generator)
            down.bias.uniform_(-bound, bound, generator=generator)
            up.weight.zero_()
            up.bias.zero_()
        return cls(down, up).to(device)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> Eraser:
        """An eraser holding exactly ``tensors`` (``down.weight``, ``down.bias``, ``up.weight``, ``up.bias``)."""
        rank, dim = tensors["down.weight"].shape
        dtype = tensors["down.weight"].dtype
        eraser = cls(
            nn.utils.skip_init(nn.Linear, dim, rank, dtype=dtype), nn.utils.skip_init(nn.Linear, rank, dim, dtype=dtype)
        )
        eraser.load_state_dict(dict(tensors), strict=True)
        return eraser

    def forward(self, output: Tensor) -> Tensor:
        return self.up(F.gelu(self.down(output)))


class Erasers:
    """One eraser per cross-attention layer, each a forward hook on its ``attn2``: ``o ↦ o + E(o)``.

    ``modules`` holds them as one module (what the training loop trains); ``enabled`` (and, for
    installed guards, the pipeline's guard state) switches them all off; :meth:`capture` records
    every eraser's output of the passes inside it.
    """

    def __init__(
        self, layers: Sequence[CrossAttentionLayer], erasers: Sequence[Eraser], state: DenoisingState | None = None
    ) -> None:
        if len(layers) != len(erasers):
            raise EditError(f"{len(erasers)} erasers for {len(layers)} cross-attention layers")
        self.layers = list(layers)
        self.erasers = list(erasers)
        self.modules = nn.ModuleList(self.erasers)
        self.state = state
        self.enabled = True
        self.outputs: dict[str, Tensor] | None = None
        self._handles: list[Any] = []

    def attach(self) -> Erasers:
        for layer, eraser in zip(self.layers, self.erasers, strict=True):
            self._handles.append(layer.module.register_forward_hook(self._hook(layer.name, eraser)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str, eraser: Eraser) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if (
                not self.enabled
                or (self.state is not None and not self.state.enabled)
                or not isinstance(output, Tensor)
            ):
                return None  # the layer's own output, untouched
            erased = eraser(output.to(eraser.up.weight.dtype))
            if self.outputs is not None:
                self.outputs[name] = erased
            return output + erased.to(output.dtype)

        return hook

    @contextmanager
    def off(self) -> Iterator[None]:
        """The model without erasers inside the block (the frozen reference ε*)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """Every eraser's output ``E_l(o_l)`` ``[B, N, dim]`` of the passes inside the block, by layer name."""
        self.outputs = {}
        try:
            yield self.outputs
        finally:
            self.outputs = None

    def guard(self, concept: str) -> Guard:
        """The erasers as a guard: rank and layer names as settings, their weights as tensors."""
        rank = int(self.erasers[0].down.weight.shape[0])
        settings = EraserSettings(
            version=ARTIFACT_VERSION, rank=rank, layers=[x.name for x in self.layers], concept=concept
        )
        tensors = {
            f"{layer.name}.{key}": value.detach().to("cpu", copy=True)
            for layer, eraser in zip(self.layers, self.erasers, strict=True)
            for key, value in eraser.state_dict().items()
        }
        return Guard(config={"receler": settings.model_dump()}, tensors=tensors)


def output_dim(layer: CrossAttentionLayer) -> int:
    """Width of a cross-attention layer's output (its ``to_out[0]``'s)."""
    to_out = getattr(layer.module, "to_out", None)
    first = to_out[0] if isinstance(to_out, nn.ModuleList | nn.Sequential) and len(to_out) else None
    if not isinstance(first, nn.Linear):
        raise EditError(f"{layer.name} has no linear to_out[0]; Receler needs diffusers' Attention layout")
    return int(first.out_features)


def installed_erasers(pipeline: Any) -> list[Erasers]:
    """The Receler erasers installed on ``pipeline`` by its guards, in installation order."""
    return list(pipeline.__dict__.get(_INSTALLED, []))


# ----------------------------------------------------------------------------- the concept mask


def attention_probs(attn: nn.Module, hidden: Tensor, context: Tensor) -> Tensor:
    """Cross-attention probabilities ``softmax(q kᵀ · scale)`` of a diffusers ``Attention``: ``[B, heads, N, L]``."""
    module: Any = attn  # diffusers' Attention: heads, scale and norm_cross are its own API
    if getattr(module, "norm_cross", None) is not None:
        context = module.norm_encoder_hidden_states(context)
    q, k = module.to_q(hidden).float(), module.to_k(context).float()
    b, heads = q.shape[0], int(module.heads)
    q = q.view(b, q.shape[1], heads, -1).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * float(module.scale)).softmax(dim=-1)


@contextmanager
def concept_attention(layers: Sequence[CrossAttentionLayer], positions: Sequence[int]) -> Iterator[dict[str, Tensor]]:
    """Inside the block, each layer's attention to the tokens at ``positions``, averaged over them and the
    heads: ``{layer name: [B, N]}`` (N = the layer's grid, row-major)."""
    maps: dict[str, Tensor] = {}
    index = torch.tensor(list(positions))

    def capture(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if context is None or hidden.ndim != 3:
                raise EditError(f"{name}: Receler reads cross-attention maps of [B, N, C] inputs with a text context")
            probs = attention_probs(module, hidden, context)
            maps[name] = probs[..., index.to(probs.device)].mean(dim=-1).mean(dim=1)

        return hook

    handles = [x.module.register_forward_pre_hook(capture(x.name), with_kwargs=True) for x in layers]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def grid(tokens: int, latent: Sequence[int]) -> tuple[int, int]:
    """Height and width of a layer's ``tokens``-long grid for a latent of ``latent`` (H, W)."""
    height, width = int(latent[0]), int(latent[1])
    for power in range(12):
        f = 2**power
        h, w = -(-height // f), -(-width // f)  # strided convolutions round up
        if h * w == tokens:
            return h, w
    raise EditError(f"a cross-attention layer with {tokens} tokens does not fit a {height}x{width} latent")


def default_resolution(sides: Sequence[int]) -> int:
    """The second-coarsest side (16 for SD at 512 px: 64, 32, 16 and the mid block's 8), or the only one."""
    ordered = sorted(set(sides))
    return ordered[1] if len(ordered) > 1 else ordered[0]


def concept_masks(
    maps: Mapping[str, Tensor], latent: Sequence[int], threshold: float, resolution: int | None
) -> dict[str, Tensor]:
    """Each layer's concept region ``M_l`` ``[B, N]`` (1 inside) from the layers' attention maps.

    The maps of side ``resolution`` are averaged, min-max normalised per image, thresholded
    (``≥ threshold``), and the mask is resized (nearest) to every layer's grid.
    """
    sizes = {name: grid(m.shape[-1], latent) for name, m in maps.items()}
    side = resolution or default_resolution([h for h, _ in sizes.values()])
    chosen = [name for name, (h, _) in sizes.items() if h == side]
    if not chosen:
        have = sorted({h for h, _ in sizes.values()})
        raise EditError(f"mask_resolution {side}: the UNet's cross-attention maps have sides {have}")
    h, w = sizes[chosen[0]]
    mean = torch.stack([maps[name].reshape(-1, h, w) for name in chosen]).mean(dim=0)
    low = mean.amin(dim=(1, 2), keepdim=True)
    high = mean.amax(dim=(1, 2), keepdim=True)
    mask = ((mean - low) / (high - low).clamp_min(1e-12) >= threshold).to(mean.dtype)
    out = {}
    for name, (lh, lw) in sizes.items():
        out[name] = (
            F.interpolate(mask.unsqueeze(0), size=(lh, lw), mode="nearest").squeeze(0).reshape(mask.shape[0], -1)
        )
    return out


def localised_penalty(outputs: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> Tensor:
    """``L_r``: per layer, the erasers' mean square over channels summed outside the concept region and
    divided by its size (+1e-9), averaged over the layers."""
    terms = []
    for name, erased in outputs.items():
        outside = 1 - masks[name].to(erased.device, torch.float32)  # [B, N]
        per_pixel = erased.float().pow(2).mean(dim=-1)  # [B, N]
        terms.append((per_pixel * outside).sum() / (outside.sum() + _EPS))
    if not terms:
        raise EditError("no eraser output was recorded; is another hook replacing attn2's output?")
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- the method


class Receler(EditMethod[RecelerParams]):
    """Receler: train erasers after each cross-attention on ESD's objective against soft-prompt attacks,
    penalised outside the concept's attention mask; saved as a guard."""

    name = "receler"
    summary = "Receler: adversarially trained low-rank erasers after every attn2, localised by attention masks (guard)"
    kind = "training"
    paper = (
        "Huang et al., Receler: Reliable Concept Erasing of Text-to-Image Diffusion Models via Lightweight Erasers, "
        "ECCV 2024, arXiv:2311.17717 (reference code jasper0314-huang/Receler, MIT)"
    )
    Params = RecelerParams
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "sdxl": (
            "its adversarial prompts are soft tokens through the token-embedding table, which SDXL's "
            "two text encoders (768- and 1280-wide tables) do not share, and a soft prompt has no "
            "pooled embedding"
        ),
        "flux": (
            "its erasers sit on the output of every cross-attention layer, which FLUX's joint attention does not "
            "have, and its adversarial prompts are soft tokens of one token table, where FLUX reads two (T5, CLIP)"
        ),
    }
    Training = RecelerTraining

    # ------------------------------------------------------------------ erasers: added, then saved

    @contextmanager
    def added_modules(self, ctx: EditContext) -> Iterator[Mapping[str, nn.Module]]:
        layers = ctx.cross_attention_layers()
        generator = torch.Generator().manual_seed(ctx.seed_for("receler", "erasers"))
        erasers = []
        for layer in layers:
            weight = layer.projection("q").weight
            dtype = torch.promote_types(weight.dtype, torch.float32)  # fp16 models: float32 erasers
            erasers.append(Eraser.new(output_dim(layer), self.params.rank, generator, dtype, weight.device))
        self.erasers = Erasers(layers, erasers).attach()
        try:
            yield {"erasers": self.erasers.modules}
        finally:
            self.erasers.detach()

    def trained_guard(self, ctx: EditContext) -> Guard:
        return self.erasers.guard(self.params.concept)

    @classmethod
    def install_guard(cls, pipeline: Any, guard: Guard, adapter: BackboneAdapter) -> None:
        try:
            settings = EraserSettings.model_validate(guard.config.get("receler"))
        except ValidationError as exc:
            raise RunDirError(f"the Receler guard's settings are invalid (was the file edited?): {exc}") from exc
        by_name = {layer.name: layer for layer in adapter.cross_attention_layers()}
        layers, erasers = [], []
        for name in settings.layers:
            layer = by_name.get(name)
            if layer is None:
                raise RunDirError(f"the Receler guard has an eraser for {name}, which this pipeline's UNet lacks")
            try:
                eraser = Eraser.from_tensors({key: guard.tensors[f"{name}.{key}"] for key in ERASER_TENSORS})
            except (KeyError, RuntimeError, ValueError) as exc:
                raise RunDirError(f"the Receler guard's eraser for {name} is incomplete or malformed: {exc}") from exc
            if eraser.down.in_features != output_dim(layer) or eraser.down.out_features != settings.rank:
                raise RunDirError(
                    f"the Receler guard's eraser for {name} is {eraser.down.in_features} wide with rank "
                    f"{eraser.down.out_features}; the layer is {output_dim(layer)} wide (rank {settings.rank} expected)"
                )
            layers.append(layer)
            erasers.append(eraser.to(layer.projection("q").weight.device))
        installed = Erasers(layers, erasers, denoising_state(pipeline)).attach()
        pipeline.__dict__.setdefault(_INSTALLED, []).append(installed)

    # ------------------------------------------------------------------ plan, made once

    def prepare_training(self, ctx: EditContext) -> None:
        p = self.params
        with self.erasers.off():  # cached latents (sample_with: base / edit_start) come from the model without erasers
            self.guidance = NegativeGuidance(ctx, p, purpose="receler")
        self.mask_positions = self.concept_positions(ctx)
        self.adversarial: AdversarialPrompt | None = None

    def concept_positions(self, ctx: EditContext) -> list[int]:
        """Positions of the concept prompt's tokens whose attention makes the mask (its words, or ``mask_phrase``'s)."""
        p = self.params
        ids = ctx.adapter.tokenize([p.concept])[0].tolist()
        eos = int(ctx.adapter.tokenizer.eos_token_id)
        end = ids.index(eos) if eos in ids else len(ids) - 1
        if p.mask_phrase is None:
            return list(range(1, end))
        key = ctx.adapter.token_ids(p.mask_phrase)
        hit = next((i for i in range(1, end - len(key) + 1) if ids[i : i + len(key)] == key), None)
        if hit is None:
            raise EditError(f"{ctx.label}: mask_phrase {p.mask_phrase!r} is not a run of tokens of {p.concept!r}")
        return list(range(hit, hit + len(key)))

    # ------------------------------------------------------------------ one step

    def sample(self, ctx: EditContext, draw: int) -> EsdSample:
        """The latent and UNet timestep of one draw (sampled with the erasers on, or from the cache)."""
        return self.guidance.sample(ctx, draw)

    def frozen_pass(self, ctx: EditContext, s: EsdSample) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """ε*(x, t, c), ε*(x, t, ∅) of the frozen model without erasers, and its concept attention maps for c
        (without the localisation term no maps are needed, and the predictions may be stored ones)."""
        if self.params.reg_weight == 0:
            with self.erasers.off():
                return (*self.guidance.predictions(ctx, s), {})
        hidden = torch.cat([self.guidance.concept, self.guidance.empty])
        capture = concept_attention(ctx.cross_attention_layers(), self.mask_positions)
        with torch.no_grad(), self.erasers.off(), ctx.reference_weights(self.params.reference), capture as maps:
            both = ctx.predict_noise(s.x.expand(2, -1, -1, -1), s.t.expand(2), hidden, frozen=True)
        e_c, e_0 = both.float().chunk(2)
        return e_c, e_0, {name: m[:1] for name, m in maps.items()}  # the concept's row

    def conditioning(self, ctx: EditContext, x: Tensor, t: Tensor, goal: Tensor, draw: int) -> Tensor:
        """The prompt the erase term trains on: the soft-prompt adversary's (soft tokens that bring the
        frozen model's concept prediction ``goal`` back through the erasers), or the plain concept."""
        p = self.params
        if p.attack_steps == 0:
            return self.guidance.concept

        def objective(hidden: Tensor) -> Tensor:
            return F.mse_loss(ctx.predict_noise(x, t, hidden).float(), goal)

        start = None
        if p.attack_init == "latest" and self.adversarial is not None:
            start = self.adversarial.embeddings[0, list(self.adversarial.slots)]
        adversary = ctx.adversary(
            "soft_prompt",
            tokens=p.attack_tokens,
            position=p.attack_position,
            norm="linf",
            radius=p.attack_radius,
            steps=p.attack_steps,
            step_size=p.attack_lr,
            update="adam",
            start=start,
            seed=ctx.seed_for("receler", "attack", draw),
        )
        self.adversarial = adversary.attack(p.concept, objective)
        return self.adversarial.hidden

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        p = self.params
        draw = self.guidance.draws(step)
        s = self.sample(ctx, draw)
        e_c, e_0, maps = self.frozen_pass(ctx, s)
        hidden = self.conditioning(ctx, s.x, s.t, e_c, draw)
        with self.erasers.capture() as outputs:
            pred = ctx.predict_noise(s.x, s.t, hidden).float()
        terms = {"erase": F.mse_loss(pred, e_0 - p.eta * (e_c - e_0))}
        if p.reg_weight > 0:
            if torch.is_grad_enabled() and not all(o.requires_grad for o in outputs.values()):
                raise EditError(
                    f"{ctx.label}: the erasers' outputs carry no gradient (reentrant gradient checkpointing?); "
                    "set training.gradient_checkpointing: false"
                )
            masks = concept_masks(maps, s.x.shape[-2:], p.mask_threshold, p.mask_resolution)
            terms["localisation"] = p.reg_weight * localised_penalty(outputs, masks)
        return terms


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Receler)
