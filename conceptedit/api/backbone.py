"""The backbone adapter interface: the one place that knows where a pipeline keeps its parts.

The engine and every method reach the text encoder, tokenizer, UNet, cross-attention
layers, scheduler and VAE only through an adapter, so supporting a new architecture (SDXL's
two text encoders, say) means registering one more adapter, not touching methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import BackboneError

#: What a denoiser outputs (a diffusers scheduler's ``prediction_type``): the noise ε, the velocity
#: ``v = √ᾱ_t ε − √(1−ᾱ_t) x₀`` (SD-2.x at 768 px) or the clean latent.
PredictionType = Literal["epsilon", "v_prediction", "sample"]


@dataclass(frozen=True)
class CrossAttentionLayer:
    """A cross-attention block (``attn2``) of the denoiser.

    Attributes:
        name: Module path inside the UNet, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.
        module: The attention module, with ``to_q``, ``to_k``, ``to_v`` and ``to_out``.
    """

    name: str
    module: nn.Module

    def projection(self, which: str) -> nn.Linear:
        """The ``to_q`` / ``to_k`` / ``to_v`` linear layer."""
        layer = getattr(self.module, f"to_{which}", None)
        if not isinstance(layer, nn.Linear):
            raise BackboneError(f"{self.name} has no linear to_{which}")
        return layer

    def parameter_name(self, which: str, component: str = "unet") -> str:
        """Full parameter name of a projection's weight, e.g. ``unet.<name>.to_k.weight``."""
        return f"{component}.{self.name}.to_{which}.weight"


class BackboneAdapter:
    """Access to the parts of one pipeline family. Subclass and register to add a family."""

    #: ``sd1``, ``sd2``...: a class default an adapter may refine per pipeline (methods declare the
    #: families they support; a recipe asking one for another family is refused before it runs).
    family: str
    description: ClassVar[str]

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

    def cross_attention_layers(self) -> list[CrossAttentionLayer]:
        """Every cross-attention block whose keys/values read the text embeddings."""
        raise NotImplementedError

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
        """The denoiser's output for ``latents`` at ``timesteps`` given text embeddings, in its
        :attr:`prediction_type` (ε for SD-1.x; v for SD-2.x at 768 px): the name is historical.

        ``hidden`` holds rows of :meth:`encode_prompts` outputs (sliced, indexed, concatenated,
        repeated, moved or cast as the caller likes); an adapter whose denoiser needs more
        conditioning than the text rows (SDXL's pooled embedding and time ids) supplies it itself."""
        raise NotImplementedError

    @property
    def prediction_type(self) -> PredictionType:
        """What :meth:`predict_noise` outputs, as the pipeline's scheduler says. A loss that compares
        the output to the true noise compares it to ``conceptedit.toolkit.training_target`` instead."""
        raise NotImplementedError

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of initial latents for images of ``height`` x ``width`` (default: native size)."""
        raise NotImplementedError

    # sampling with the pipeline ---------------------------------------------------------

    def pipeline_embeds(self, hidden: Tensor, negative: Tensor) -> dict[str, Tensor]:
        """Keyword arguments handing prompt and negative-prompt embeddings (rows of
        :meth:`encode_prompts` outputs) to the pipeline's ``__call__``. SD-1.x/2.x: the two
        tensors; an adapter whose pipeline needs more (SDXL's pooled embeddings) adds it here."""
        return {"prompt_embeds": hidden, "negative_prompt_embeds": negative}

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` from final latents, decoded as the pipeline's own call decodes them."""
        vae: Any = self.pipeline.vae
        decoded: Tensor = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return decoded
