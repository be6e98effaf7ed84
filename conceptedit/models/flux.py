"""The FLUX.1 backbone adapter (``FluxPipeline``): T5 rows, a CLIP pooled vector, a flow-matching transformer.

FLUX's ``FluxTransformer2DModel`` reads, per prompt (docs/backbones.md, "FLUX"):

* **text rows**: T5's last hidden states at every one of the 512 positions (no attention mask: the
  padding is read too), ``[B, 512, 4096]``. They enter through ``context_embedder``, a linear map
  to the transformer's width, and become the context stream of the double-stream blocks, where
  ``norm1_context`` modulates them by the timestep and ``add_q/k/v_proj`` project them for joint
  attention with the image tokens; the single-stream blocks carry them on, concatenated with the
  image tokens;
* **the pooled vector**: CLIP's final-norm output at its end-of-text token (``pooler_output``, 768
  wide), added to the timestep embedding through ``time_text_embed.text_embedder`` and so
  modulating every block;
* **positions**: rotary ids, zeros for text and (row, column) for the image's 2x2 patches.

**Where a closed-form edit is exact.** Only ``context_embedder`` sees the raw T5 rows: every
block's ``add_k_proj``/``add_v_proj`` reads rows already normalised and modulated by the timestep
(``norm1_context``) and, after block 0, mixed with the image tokens by attention. So the
closed-form K/V methods edit ``context_embedder``: its input is exactly the rows they solve on,
and moving a row's output moves what every block's keys, values and text queries see of it, at
every timestep. It is this adapter's one "cross-attention layer"; ``k`` and ``v`` name the same
map, which can only be edited whole. Likewise ``time_text_embed.text_embedder.linear_1`` is the
only map of the raw pooled vector (:meth:`FluxAdapter.pooled_layers`).

**Token positions.** T5 has no start token and ends the text with ``</s>`` (id 1), padding with
``<pad>`` (id 0). ``eot_index`` is the first ``</s>`` (by id, never the pad id), ``last_word`` the
position before it, ``sot`` position 0 (the first word piece: there is no start token), ``last_pad``
position 511. T5 is bidirectional and read without a mask, so every row, padding included,
depends on the whole prompt (unlike CLIP's causal rows); ``length="longest"`` therefore encodes at
the full 512 and cuts after the longest prompt's ``</s>``, so the rows are those FLUX reads.

**Flow matching.** FLUX predicts the velocity ``v = ε − x₀`` of ``x_t = (1 − σ) x₀ + σ ε``
(:attr:`FluxAdapter.prediction_type` is ``flow``). Timesteps are the flow sampler's ``1000 σ``;
:meth:`FluxAdapter.predict_noise` hands the transformer ``t / 1000``, with latents packed into 2x2
patch tokens and unpacked again, so methods see ``[B, 16, H/8, W/8]`` latents as on SD.

**How the pooled vector travels.** As on SDXL, methods hand ``predict_noise`` text rows alone; the
adapter remembers each encoded row's CLIP pooled vector by the row's values
(:class:`~conceptedit.models.sdxl.PooledRows`) and finds it again for any copy of the row.

FLUX.1-dev's guidance-distilled transformer (``guidance_embeds: true``) is refused: its distilled
guidance input has no counterpart in the engine's classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from conceptedit.api.backbone import BackboneAdapter, CrossAttentionLayer, ParameterSet, PredictionType
from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import BackboneError, EditError
from conceptedit.models.backbone import first_eot_index
from conceptedit.models.sdxl import PooledRows
from conceptedit.models.tokenizer import clean_prompt, tokenize

#: FLUX's T5 context (``FluxPipeline``'s default ``max_sequence_length``).
T5_CONTEXT = 512
#: Keys and values of every block come from one map of the rows: the two letters share it.
_ONE_MAP = (("k", ""), ("v", ""))
_REGISTRY_ATTR = "_conceptedit_flux_pooled"

# The text stream's side of the double-stream blocks' joint attention.
_TEXT_SIDE = (
    ".attn.add_q_proj.",
    ".attn.add_k_proj.",
    ".attn.add_v_proj.",
    ".attn.norm_added_q.",
    ".attn.norm_added_k.",
    ".attn.to_add_out.",
)
_PROJECTIONS = tuple(
    f".attn.{p}." for p in ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
)

#: FLUX's named parameter sets (the UNet's names translated; docs/backbones.md, "FLUX").
FLUX_PARAMETER_SETS: dict[str, ParameterSet] = {
    # ESD-x: where the text meets the image in the double-stream blocks (text-side Q/K/V, QK norms, output).
    "cross_attention": (_TEXT_SIDE, ()),
    # ESD-x-strict: the text keys and values the image tokens attend to in the double-stream blocks.
    "cross_attention_kv": ((".attn.add_k_proj.", ".attn.add_v_proj."), ()),
    # ESD-u: all but the text side, the text and time embeddings and the output head.
    "non_cross_attention": (
        None,
        (
            *_TEXT_SIDE,
            "transformer.context_embedder.",
            "transformer.time_text_embed.",
            "transformer.norm_out.",
            "transformer.proj_out.",
        ),
    ),
    # Concept Ablation's "attn": every attention projection of both block kinds.
    "attention": (_PROJECTIONS, ()),
    "full": (None, ()),
}

_UNSUPPORTED_TOKEN_ATTACKS = (
    "token-embedding attacks (soft prompts, concept inversion, Ring-A-Bell, UnlearnDiffAtk) are not supported "
    "on FLUX: it reads two text encoders (T5 rows and CLIP's pooled vector) through different token tables, "
    "and a soft prompt has no pooled vector to come from"
)


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` latents as FLUX's patch tokens ``[B, H/2 · W/2, 4C]`` (each 2x2 patch one token,
    row-major; a token's features run over channels, then the patch's row, then its column)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for ``height`` x ``width`` latents."""
    b, _, features = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids of the patch tokens of ``height`` x ``width`` latents: ``(0, row, column)``."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    columns = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=1).to(device=device, dtype=dtype)


class FluxAdapter(BackboneAdapter):
    """FLUX.1 (``FluxPipeline``: CLIP + T5 text encoders, ``FluxTransformer2DModel``, 16-channel VAE,
    flow-matching Euler). :attr:`family` is ``flux``; see the module docstring for the design."""

    family = "flux"
    description = "FLUX.1: T5 rows and a CLIP pooled vector, a flow-matching transformer (joint attention)"
    denoiser_name = "transformer"

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        parts = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
        if not all(getattr(pipeline, part, None) is not None for part in parts):
            return False
        transformer = pipeline.transformer
        return all(
            hasattr(transformer, part) for part in ("context_embedder", "time_text_embed", "single_transformer_blocks")
        )

    def __init__(self, pipeline: Any) -> None:
        super().__init__(pipeline)
        config = self.transformer.config
        if config.guidance_embeds:
            raise BackboneError(
                "FLUX with a guidance-distilled transformer (guidance_embeds: true, as FLUX.1-dev) is not supported: "
                "its distilled guidance input has no counterpart in the engine's classifier-free guidance; "
                "FLUX.1-schnell-style models (guidance_embeds: false) are"
            )
        widths = {
            "T5 rows": (int(self.text_encoder_2.config.d_model), int(config.joint_attention_dim)),
            "CLIP pooled vector": (int(self.text_encoder.config.hidden_size), int(config.pooled_projection_dim)),
        }
        for what, (given, read) in widths.items():
            if given != read:
                raise BackboneError(f"FLUX: the {what} are {given} wide but the transformer reads {read}")

    # parts ------------------------------------------------------------------------------

    @property
    def transformer(self) -> Any:  # a diffusers FluxTransformer2DModel: typed loosely, its library is not checked
        return self.pipeline.transformer

    @property
    def text_encoder(self) -> Any:  # CLIP (transformers CLIPTextModel): the pooled vector
        return self.pipeline.text_encoder

    @property
    def text_encoder_2(self) -> Any:  # T5 (transformers T5EncoderModel): the rows
        return self.pipeline.text_encoder_2

    @property
    def tokenizer(self) -> Any:
        """T5's tokenizer: ``input_ids``, positions and keywords are T5's."""
        return self.pipeline.tokenizer_2

    @property
    def clip_tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def prediction_type(self) -> PredictionType:
        return "flow"

    def components(self) -> dict[str, nn.Module]:
        return {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }

    def parameter_sets(self) -> Mapping[str, ParameterSet]:
        return FLUX_PARAMETER_SETS

    @property
    def text_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    def cross_attention_layers(self) -> list[CrossAttentionLayer]:
        """The one map of the T5 rows, ``context_embedder`` (``k`` and ``v`` both name it)."""
        return [CrossAttentionLayer("context_embedder", self.transformer.context_embedder, "transformer", _ONE_MAP)]

    def pooled_layers(self) -> list[CrossAttentionLayer]:
        """The one map of the raw CLIP pooled vector, the pooled projection's first linear."""
        name = "time_text_embed.text_embedder.linear_1"
        return [CrossAttentionLayer(name, self.transformer.get_submodule(name), "transformer", _ONE_MAP)]

    # text ---------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str], length: Literal["full", "longest"] = "full") -> Tensor:
        """T5 ids of cleaned prompts, padded with ``<pad>`` to 512 (``full``) or to the longest prompt."""
        return tokenize(self.tokenizer, prompts, T5_CONTEXT, pad_to="max_length" if length == "full" else "longest")

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(clean_prompt(text), add_special_tokens=False).input_ids)

    def token_embedding_table(self) -> Tensor:
        raise BackboneError(_UNSUPPORTED_TOKEN_ATTACKS)

    def encode_token_embeddings(self, input_ids: Tensor, token_embeds: Tensor) -> Tensor:
        raise BackboneError(_UNSUPPORTED_TOKEN_ATTACKS)

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        length: Literal["full", "longest"] = "full",
        batch_size: int = 32,
    ) -> PromptEncoding:
        """T5 rows as ``FluxPipeline.encode_prompt`` makes them (512 positions, no attention mask) and
        CLIP's pooled vectors; ``longest`` cuts the full rows after the longest prompt's ``</s>``."""
        prompts = list(prompts)
        if not prompts:
            raise EditError("no prompts to encode")
        ids = self.tokenize(prompts, "full")
        clip_ids = tokenize(self.clip_tokenizer, prompts)
        eos = int(self.tokenizer.eos_token_id)
        eot = first_eot_index(ids, eos)
        rows, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            batch = ids[start : start + batch_size].to(self.text_encoder_2.device)
            rows.append(self.text_encoder_2(batch)[0].float())
            clip_batch = clip_ids[start : start + batch_size].to(self.text_encoder.device)
            pooled.append(self.text_encoder(clip_batch).pooler_output.float().to(rows[-1].device))
        hidden, vectors = torch.cat(rows), torch.cat(pooled)
        if length == "longest":
            keep = int(eot.max()) + 1
            ids, hidden = ids[:, :keep], hidden[:, :keep]
        self.remember_pooled(hidden, vectors)
        return PromptEncoding(
            prompts=prompts, input_ids=ids, hidden=hidden, eot_index=eot, eos_token_id=eos, pooled=vectors
        )

    # the pooled vectors -------------------------------------------------------------------

    @property
    def pooled_rows(self) -> PooledRows:
        """The pipeline's remembered pooled vectors (shared by every adapter of the pipeline)."""
        rows = self.pipeline.__dict__.get(_REGISTRY_ATTR)
        if rows is None:
            rows = self.pipeline.__dict__[_REGISTRY_ATTR] = PooledRows(self.text_dim // 2, label="FLUX")
        return rows

    def remember_pooled(self, hidden: Tensor, pooled: Tensor) -> None:
        """Register ``pooled`` (``[B, P]``) as the pooled vector of the rows of ``hidden`` (``[B, L, D]``)."""
        self.pooled_rows.add(hidden, pooled, self.dtype)

    def pooled_for(self, hidden: Tensor) -> Tensor:
        """The pooled vector of each row of ``hidden`` (float32, on the rows' device)."""
        return self.pooled_rows.find(hidden, self.dtype).to(hidden.device)

    # the transformer ---------------------------------------------------------------------

    def predict_noise(
        self, latents: Tensor, timesteps: Tensor, hidden: Tensor, unet: nn.Module | None = None
    ) -> Tensor:
        """The flow velocity for ``[B, 16, h, w]`` latents at sampler timesteps (``1000 σ``), as
        ``FluxPipeline`` calls the transformer: packed latents, ``t / 1000``, the rows' pooled
        vectors, zero text ids and (row, column) image ids; returned unpacked."""
        model = unet if unet is not None else self.transformer
        dtype = self.dtype
        rows = hidden.to(dtype)
        batch, _, height, width = latents.shape
        t = timesteps.to(latents.device)
        t = (t.expand(batch) if t.ndim == 0 else t).to(dtype) / 1000
        output = model(
            hidden_states=pack_latents(latents.to(dtype)),
            timestep=t,
            guidance=None,
            pooled_projections=self.pooled_for(rows).to(dtype),
            encoder_hidden_states=rows,
            txt_ids=torch.zeros(rows.shape[1], 3, device=rows.device, dtype=dtype),
            img_ids=image_ids(height, width, latents.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """``[B, 16, H/8, W/8]`` (each side even, for the 2x2 patches); the native size is the VAE's ``sample_size``."""
        h, w = self._size(height, width)
        step = int(self.pipeline.vae_scale_factor) * 2
        return (batch, int(self.transformer.config.in_channels) // 4, 2 * (h // step), 2 * (w // step))

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        native = int(self.pipeline.vae.config.sample_size)
        return height or native, width or native

    def sampler(self, steps: int) -> Any:
        """FLUX's own sampler: flow-matching Euler from the pipeline's scheduler config on the pipeline's
        sigmas ``1, …, 1/steps``, shifted for the native image's token count when the config asks for it."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        config = scheduler.config
        _, _, h, w = self.latent_shape(1)
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler

    # sampling with the pipeline ------------------------------------------------------------

    def pipeline_embeds(self, hidden: Tensor, negative: Tensor) -> dict[str, Tensor]:
        return {
            "prompt_embeds": hidden,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": self.pooled_for(hidden).to(hidden.dtype),
            "negative_pooled_prompt_embeds": self.pooled_for(negative).to(negative.dtype),
        }

    def pipeline_arguments(self, guidance: float, height: int | None, width: int | None) -> dict[str, Any]:
        """True classifier-free guidance with the negative embeddings (``true_cfg_scale``: schnell-style
        FLUX has no distilled guidance), at the native size unless told."""
        h, w = self._size(height, width)
        return {"true_cfg_scale": guidance, "height": h, "width": w}

    def sampled_latents(self, latents: Tensor, height: int | None, width: int | None) -> Tensor:
        _, _, h, w = self.latent_shape(latents.shape[0], height, width)
        return unpack_latents(latents, h, w)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """As ``FluxPipeline`` decodes: un-scale, add the VAE's shift factor, decode."""
        vae: Any = self.pipeline.vae
        scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded: Tensor = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        return decoded
