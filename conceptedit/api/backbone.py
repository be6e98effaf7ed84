"""The backbone adapter interface: the one place that knows where a pipeline keeps its parts.

The engine and every method reach the text encoder, tokenizer, UNet, cross-attention
layers, scheduler and VAE only through an adapter, so supporting a new architecture (SDXL's
two text encoders, say) means registering one more adapter, not touching methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import BackboneError

#: What a denoiser outputs (a diffusers scheduler's ``prediction_type``, or the model's training for
#: flow models): the noise ε, the velocity ``v = √ᾱ_t ε − √(1−ᾱ_t) x₀`` (SD-2.x at 768 px), the clean
#: latent, or the rectified-flow velocity ``v = ε − x₀`` of ``x_t = (1−σ_t) x₀ + σ_t ε`` (FLUX).
PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]

#: An ``Attention`` module's projections: the linear map (a path inside the module) of each letter.
ATTENTION_PROJECTIONS: tuple[tuple[str, str], ...] = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"))

#: A named trainable subset: substrings of full parameter names to include (None: every parameter
#: of the denoiser) and to exclude.
ParameterSet = tuple[tuple[str, ...] | None, tuple[str, ...]]

#: The UNet's named parameter sets (SD-1.x/2.x, SDXL), over diffusers' UNet names.
UNET_PARAMETER_SETS: dict[str, ParameterSet] = {
    # ESD-x / the original ESD code's "xattn": every parameter of the cross-attention blocks.
    "cross_attention": ((".attn2.",), ()),
    # ESD-x-strict / Concept Ablation's "cross-attn": cross-attention keys and values only.
    "cross_attention_kv": ((".attn2.to_k.", ".attn2.to_v."), ()),
    # ESD-u / the original ESD code's "noxattn": all but cross-attention, the time embedding and
    # the output head (CompVis ``time_embed`` and ``out.*`` are diffusers' ``time_embedding``,
    # ``conv_norm_out`` and ``conv_out``).
    "non_cross_attention": (None, (".attn2.", "unet.time_embedding.", "unet.conv_norm_out.", "unet.conv_out.")),
    # Concept Ablation's "attn": query/key/value/output projections of self- and cross-attention.
    "attention": (
        tuple(f".{a}.{p}." for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out")),
        (),
    ),
    "full": (None, ()),
}


@dataclass(frozen=True)
class CrossAttentionLayer:
    """A place where the text rows enter the denoiser through linear maps of their own.

    On a UNet (SD-1.x/2.x, SDXL) it is a cross-attention block (``attn2``), whose ``to_k``/``to_v``
    project the rows. On FLUX it is the transformer's ``context_embedder``, the one linear map that
    reads the T5 rows: it feeds the keys and values (and the text queries) of every joint-attention
    block alike, so ``k`` and ``v`` name the same map there (docs/backbones.md, "FLUX").

    Attributes:
        name: Module path inside the denoiser, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.
        module: The module (an attention block with ``to_q``, ``to_k``, ``to_v``; or the linear map itself).
        component: The pipeline component holding it, the prefix of its parameter names (``transformer`` on FLUX).
        paths: The linear map carrying each projection letter, as a path inside ``module`` ("" for
            ``module`` itself). Letters that share one map can only be edited together.
    """

    name: str
    module: nn.Module
    component: str = "unet"
    paths: tuple[tuple[str, str], ...] = ATTENTION_PROJECTIONS

    def _path(self, which: str) -> str:
        for letter, path in self.paths:
            if letter == which:
                return path
        letters = ", ".join(letter for letter, _ in self.paths)
        raise BackboneError(f"{self.name} has no {which!r} projection (it has {letters})")

    def projection(self, which: str) -> nn.Linear:
        """The linear map of projection ``which`` (``q``, ``k``, ``v``)."""
        path = self._path(which)
        layer = self.module.get_submodule(path) if path else self.module
        if not isinstance(layer, nn.Linear):
            raise BackboneError(f"{self.name} has no linear map {path or 'here'} for {which!r}")
        return layer

    def parameter_name(self, which: str) -> str:
        """Full parameter name of a projection's weight, e.g. ``unet.<name>.to_k.weight``."""
        return ".".join(part for part in (self.component, self.name, self._path(which), "weight") if part)

    def linear_maps(self, projections: Sequence[str]) -> list[tuple[str, nn.Linear]]:
        """The distinct linear maps carrying ``projections``, each once, by their weight's full name.

        Raises:
            BackboneError: when a map also carries a projection not asked for (on FLUX, ``k`` alone:
                the keys and values of every block come from one map).
        """
        asked = {self._path(which) for which in projections}
        left_out = sorted(letter for letter, path in self.paths if path in asked and letter not in projections)
        if left_out:
            raise BackboneError(
                f"{self.name}: projections {sorted(set(projections))} share their linear map with {left_out} here; "
                f"edit {sorted({*projections, *left_out})} together"
            )
        maps: dict[str, nn.Linear] = {}
        for which in projections:
            maps.setdefault(self.parameter_name(which), self.projection(which))
        return list(maps.items())


class BackboneAdapter:
    """Access to the parts of one pipeline family. Subclass and register to add a family."""

    #: ``sd1``, ``sd2``...: a class default an adapter may refine per pipeline (methods declare the
    #: families they support; a recipe asking one for another family is refused before it runs).
    family: str
    description: ClassVar[str]
    #: The pipeline attribute holding the denoiser, also its parameters' prefix (FLUX: ``transformer``).
    denoiser_name: ClassVar[str] = "unet"

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """Whether this adapter handles ``pipeline``."""
        raise NotImplementedError

    # components ---------------------------------------------------------------------

    def components(self) -> dict[str, nn.Module]:
        """The trainable modules by the prefix their parameter names carry."""
        raise NotImplementedError

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter as ``component.path`` (diffusers key names with a component prefix)."""
        for prefix, module in self.components().items():
            for name, param in module.named_parameters():
                yield f"{prefix}.{name}", param

    def get_parameter(self, name: str) -> nn.Parameter:
        """A parameter by full name; :class:`BackboneError` naming near misses if absent."""
        prefix, _, rest = name.partition(".")
        module = self.components().get(prefix)
        if module is None:
            raise BackboneError(f"parameter {name!r}: no component {prefix!r} (have {', '.join(self.components())})")
        try:
            return module.get_parameter(rest)
        except AttributeError as exc:
            raise BackboneError(f"the pipeline has no parameter {name!r}") from exc

    @property
    def denoiser(self) -> Any:  # a diffusers model: typed loosely, its library is not checked
        """The denoiser (a UNet, or FLUX's transformer)."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype: text rows are cast to it before a pipeline call."""
        weight: Tensor = next(self.denoiser.parameters())
        return weight.dtype

    def parameter_sets(self) -> Mapping[str, ParameterSet]:
        """The denoiser's named trainable subsets (``cross_attention``, ``cross_attention_kv``,
        ``non_cross_attention``, ``attention``, ``full``) that training methods choose by name."""
        return UNET_PARAMETER_SETS

    def cross_attention_layers(self) -> list[CrossAttentionLayer]:
        """Every place whose linear maps read the text rows: closed-form K/V edits solve on them."""
        raise NotImplementedError

    def pooled_layers(self) -> list[CrossAttentionLayer]:
        """Linear maps whose input is the pooled text vector (``PromptEncoding.pooled``) alone, for
        closed-form edits that map pooled vectors too (FLUX's pooled projection). Default: none."""
        return []

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings cross-attention reads."""
        raise NotImplementedError

    # computation --------------------------------------------------------------------

    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        length: Literal["full", "longest"] = "full",
        batch_size: int = 32,
    ) -> PromptEncoding:
        """Run the text encoder; see :class:`~conceptedit.api.edits.PromptEncoding`."""
        raise NotImplementedError

    def tokenize(self, prompts: Sequence[str], length: Literal["full", "longest"] = "full") -> Tensor:
        """Token ids of prompts as the text encoder reads them, padded to its context or the longest."""
        raise NotImplementedError

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, without start/end tokens (to find a keyword in a prompt)."""
        raise NotImplementedError

    def token_embedding_table(self) -> Tensor:
        """The text encoder's input embedding table (vocabulary x width)."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (SD-1.x/2.x: a transformers CLIP tokenizer): special token ids, decoding."""
        raise NotImplementedError

    def encode_token_embeddings(self, input_ids: Tensor, token_embeds: Tensor) -> Tensor:
        """Text embeddings of ``input_ids`` whose token embeddings are replaced by ``token_embeds``.

        Differentiable in ``token_embeds``: prompt attacks optimise soft tokens through it.
        """
        raise NotImplementedError

    def predict_noise(
        self, latents: Tensor, timesteps: Tensor, hidden: Tensor, unet: nn.Module | None = None
    ) -> Tensor:
        """The denoiser's output for ``latents`` (in :meth:`latent_shape`'s layout) at ``timesteps`` (the
        sampler's units) given text embeddings, in its :attr:`prediction_type` (ε for SD-1.x; v for
        SD-2.x at 768 px; the flow velocity for FLUX): the name is historical. ``unet`` replaces the
        denoiser (the training loop's wrapped one), whatever the backbone calls it.

        ``hidden`` holds rows of :meth:`encode_prompts` outputs (sliced, indexed, concatenated,
        repeated, moved or cast as the caller likes); an adapter whose denoiser needs more
        conditioning than the text rows (SDXL's pooled embedding and time ids, FLUX's pooled
        vector and token positions) supplies it itself."""
        raise NotImplementedError

    @property
    def prediction_type(self) -> PredictionType:
        """What :meth:`predict_noise` outputs, as the pipeline's scheduler says (``flow`` for a model
        trained by flow matching). A loss that compares the output to the true noise compares it to
        ``conceptedit.toolkit.training_target`` instead."""
        raise NotImplementedError

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of initial latents for images of ``height`` x ``width`` (default: native size)."""
        raise NotImplementedError

    def sampler(self, steps: int) -> Any:
        """A fresh deterministic scheduler set to ``steps`` steps, for the engine's own sampling
        (cached trajectories, partial runs): DDIM (η = 0) on the pipeline's noise schedule and
        prediction type; a flow model's adapter gives its Euler flow sampler instead."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config, clip_sample=False, set_alpha_to_one=False)
        scheduler.set_timesteps(steps)
        return scheduler

    # sampling with the pipeline ---------------------------------------------------------

    def pipeline_embeds(self, hidden: Tensor, negative: Tensor) -> dict[str, Tensor]:
        """Keyword arguments handing prompt and negative-prompt embeddings (rows of
        :meth:`encode_prompts` outputs) to the pipeline's ``__call__``. SD-1.x/2.x: the two
        tensors; an adapter whose pipeline needs more (SDXL's pooled embeddings) adds it here."""
        return {"prompt_embeds": hidden, "negative_prompt_embeds": negative}

    def pipeline_arguments(self, guidance: float, height: int | None, width: int | None) -> dict[str, Any]:
        """The other keyword arguments of a pipeline call sampling with classifier-free guidance
        ``guidance`` at ``height`` x ``width`` (None: the pipeline's default). SD: ``guidance_scale``;
        FLUX: ``true_cfg_scale`` and its native size."""
        return {"guidance_scale": guidance, "height": height, "width": width}

    def sampled_latents(self, latents: Tensor, height: int | None, width: int | None) -> Tensor:
        """What a pipeline call with ``output_type="latent"`` and these sizes returned, in this adapter's
        latent layout (:meth:`latent_shape`, :meth:`decode_latents`); FLUX unpacks its patch tokens."""
        return latents

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` from final latents, decoded as the pipeline's own call decodes them."""
        vae: Any = self.pipeline.vae
        decoded: Tensor = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return decoded
