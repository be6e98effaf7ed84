"""The Stable Diffusion 1.x/2.x backbone adapter, and choosing the adapter for a pipeline
(SDXL's, a subclass, is in :mod:`conceptedit.models.sdxl`).

SD-1.x and SD-2.x share the pipeline layout; they differ in the text encoder (OpenAI CLIP
ViT-L/14 vs OpenCLIP ViT-H/14), its tokenizer's padding and, for SD-2.x at 768 px, the
prediction type. Three rules follow (docs/backbones.md):

* **family**: ``sd2`` when the text encoder is OpenCLIP's, i.e. its ``hidden_act`` is ``gelu``
  (OpenAI CLIP, hence every SD-1.x, uses ``quick_gelu``), or the UNet reads 1024-wide text
  (SD-2.x's width); ``sd1`` otherwise (:func:`sd_family`). The tokenizer's pad id is not used:
  it is a tokenizer setting a user can swap, not the architecture.
* **token positions** come from the end-of-text id, never the pad id: SD-2.x's tokenizer pads
  with ``!`` (id 0), an ordinary token that may also stand in a prompt ("a cat!"). The first
  [EoT] is the first position holding ``eos_token_id``; the real tokens are those up to it.
* **prediction type**: the scheduler's (:attr:`StableDiffusionAdapter.prediction_type`);
  :mod:`conceptedit.models.prediction` turns it into loss targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from conceptedit.api.backbone import BackboneAdapter, CrossAttentionLayer, PredictionType
from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import BackboneError, EditError
from conceptedit.models.prediction import prediction_type
from conceptedit.models.tokenizer import clean_prompt, tokenize

#: The text width of SD-2.x (OpenCLIP ViT-H/14); SD-1.x's is 768.
SD2_TEXT_WIDTH = 1024


def sd_family(pipeline: Any) -> str:
    """``sd2`` for an OpenCLIP text encoder (``hidden_act: gelu``) or 1024-wide cross-attention, else ``sd1``."""
    activation = getattr(getattr(pipeline.text_encoder, "config", None), "hidden_act", None)
    width = getattr(pipeline.unet.config, "cross_attention_dim", None)
    return "sd2" if activation == "gelu" or width == SD2_TEXT_WIDTH else "sd1"


class StableDiffusionAdapter(BackboneAdapter):
    """Stable Diffusion 1.x and 2.x (``StableDiffusionPipeline`` layout: CLIP text encoder + UNet);
    :attr:`family` is ``sd1`` or ``sd2`` by :func:`sd_family`."""

    family = "sd1"
    description = "Stable Diffusion 1.x / 2.x: one CLIP text encoder, UNet2DConditionModel, AutoencoderKL"

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        parts = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
        if not all(getattr(pipeline, part, None) is not None for part in parts):
            return False
        return getattr(pipeline, "text_encoder_2", None) is None

    def __init__(self, pipeline: Any) -> None:
        super().__init__(pipeline)
        self.family = sd_family(pipeline)

    @property
    def text_encoder(self) -> Any:  # a transformers CLIPTextModel: typed loosely, its library is not checked
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def unet(self) -> Any:  # a diffusers UNet2DConditionModel: typed loosely, its library is not checked
        return self.pipeline.unet

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    @property
    def prediction_type(self) -> PredictionType:
        return prediction_type(self.scheduler.config)

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @property
    def text_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def cross_attention_layers(self) -> list[CrossAttentionLayer]:
        layers = [
            CrossAttentionLayer(name, module)
            for name, module in self.unet.named_modules()
            if name.endswith("attn2") and getattr(module, "is_cross_attention", True)
        ]
        if not layers:
            raise BackboneError("the UNet has no cross-attention (attn2) layers")
        return layers

    def tokenize(self, prompts: Sequence[str], length: Literal["full", "longest"] = "full") -> Tensor:
        """Token ids of cleaned prompts, padded to 77 (``full``) or to the longest prompt."""
        return tokenize(self.tokenizer, prompts, pad_to="max_length" if length == "full" else "longest")

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(clean_prompt(text), add_special_tokens=False).input_ids)

    def token_embedding_table(self) -> Tensor:
        return self.text_encoder.get_input_embeddings().weight

    def encode_token_embeddings(self, input_ids: Tensor, token_embeds: Tensor) -> Tensor:
        # A forward hook swaps the lookup's output, so positions, the causal mask and the layers
        # run exactly as for ordinary ids, whatever the text encoder's version.
        table = self.text_encoder.get_input_embeddings()
        handle = table.register_forward_hook(lambda module, args, output: token_embeds.to(output.dtype))
        try:
            return self.text_encoder(input_ids.to(table.weight.device))[0].float()
        finally:
            handle.remove()

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        length: Literal["full", "longest"] = "full",
        batch_size: int = 32,
    ) -> PromptEncoding:
        prompts = list(prompts)
        if not prompts:
            raise EditError("no prompts to encode")
        encoder = self.text_encoder
        device = next(encoder.parameters()).device
        ids = self.tokenize(prompts, length)
        eos = int(self.tokenizer.eos_token_id)
        eot = first_eot_index(ids, eos)
        use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
        # The real tokens are those up to the first [EoT] (by the end-of-text id: SD-2.x pads with
        # "!", id 0, which may also stand in the prompt), as the tokenizer's own attention mask says.
        real = (torch.arange(ids.shape[1])[None, :] <= eot[:, None]).long()
        chunks = []
        for start in range(0, len(prompts), batch_size):
            batch = ids[start : start + batch_size].to(device)
            mask = real[start : start + batch_size].to(device) if use_mask else None
            chunks.append(encoder(batch, attention_mask=mask)[0].float())
        return PromptEncoding(prompts=prompts, input_ids=ids, hidden=torch.cat(chunks), eot_index=eot, eos_token_id=eos)

    def predict_noise(
        self, latents: Tensor, timesteps: Tensor, hidden: Tensor, unet: nn.Module | None = None
    ) -> Tensor:
        model = unet if unet is not None else self.unet
        dtype = next(self.unet.parameters()).dtype
        return model(latents.to(dtype), timesteps, encoder_hidden_states=hidden.to(dtype)).sample

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        scale = self.pipeline.vae_scale_factor
        size = self.unet.config.sample_size
        h = (height // scale) if height else size
        w = (width // scale) if width else size
        return (batch, int(self.unet.config.in_channels), h, w)


def resolve_backbone(pipeline: Any, adapters: Sequence[type[BackboneAdapter]]) -> BackboneAdapter:
    """The first registered adapter (latest registration first) that matches ``pipeline``."""
    for adapter in adapters:
        if adapter.matches(pipeline):
            return adapter(pipeline)
    known = ", ".join(a.__name__ for a in adapters) or "none"
    raise BackboneError(
        f"no backbone adapter handles a {type(pipeline).__name__} (adapters installed: {known}); "
        "install a plugin that registers one via conceptedit_register_backbones"
    )


def first_eot_index(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """The first position holding ``eos_token_id`` in each row; the last position if none. Never the
    pad id: SD-2.x pads with ``!`` (id 0), which may stand among the words too."""
    is_eos = input_ids == eos_token_id
    first = is_eos.int().argmax(dim=1)
    missing = ~is_eos.any(dim=1)
    first[missing] = input_ids.shape[1] - 1
    return first
