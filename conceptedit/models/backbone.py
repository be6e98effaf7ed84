"""The Stable Diffusion 1.x/2.x backbone adapter, and choosing the adapter for a pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from conceptedit.api.backbone import BackboneAdapter, CrossAttentionLayer
from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import BackboneError, EditError
from conceptedit.models.tokenizer import clean_prompt, tokenize


class StableDiffusionAdapter(BackboneAdapter):
    """Stable Diffusion 1.x and 2.x (``StableDiffusionPipeline`` layout: CLIP text encoder + UNet)."""

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
        # SD-2.x conditions on 1024-wide OpenCLIP embeddings; SD-1.x (and our tiny models) do not.
        self.family = "sd2" if pipeline.unet.config.cross_attention_dim == 1024 else "sd1"

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
        use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
        chunks = []
        for start in range(0, len(prompts), batch_size):
            batch = ids[start : start + batch_size].to(device)
            mask = (batch != self.tokenizer.pad_token_id).long() if use_mask else None
            chunks.append(encoder(batch, attention_mask=mask)[0].float())
        eos = int(self.tokenizer.eos_token_id)
        return PromptEncoding(
            prompts=prompts,
            input_ids=ids,
            hidden=torch.cat(chunks),
            eot_index=first_eot_index(ids, eos),
            eos_token_id=eos,
        )

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
    """The first position holding ``eos_token_id`` in each row; the last position if none."""
    is_eos = input_ids == eos_token_id
    first = is_eos.int().argmax(dim=1)
    missing = ~is_eos.any(dim=1)
    first[missing] = input_ids.shape[1] - 1
    return first
