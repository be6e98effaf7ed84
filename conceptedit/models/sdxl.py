"""The SDXL backbone adapter (``StableDiffusionXLPipeline``): two text encoders and pooled conditioning.

SDXL's UNet reads, per prompt, three things (docs/backbones.md, "SDXL"):

* **text rows**: the penultimate hidden states of text encoder 1 (OpenAI CLIP ViT-L/14, 768 wide,
  its tokenizer padding with [EoT]) and text encoder 2 (OpenCLIP ViT-bigG/14, 1280 wide, padding
  with ``!``, id 0), concatenated per position: ``[B, 77, 2048]``, exactly as diffusers'
  ``encode_prompt``. Every ``attn2`` (several per transformer block) projects these rows;
* **the pooled embedding**: text encoder 2's projected output at the first [EoT]
  (``added_cond_kwargs["text_embeds"]``);
* **time ids**: ``(original height, width, crop top, left, target height, width)``
  (``added_cond_kwargs["time_ids"]``), here ``(H, W, 0, 0, H, W)`` for the image size the latents
  decode to, what the pipeline passes when called without size arguments.

**How the pooled embedding travels.** Methods call ``predict_noise(latents, t, hidden)`` with rows
they sliced, indexed, concatenated or repeated from encodings; the contract has no room for a second
tensor. The adapter therefore remembers, for every row :meth:`StableDiffusionXLAdapter.encode_prompts`
returns, its pooled embedding, keyed by the row's values (:class:`PooledRows`), and ``predict_noise``
finds it again for any copy of the row, whatever batch it stands in. It cannot be derived from the
row alone: the pooled vector is text encoder 2's *last* layer, final norm and projection at the
[EoT] position, which the row (the penultimate layer's output) does not mark. Rows not made by
``encode_prompts`` (arithmetic on embeddings, soft prompts, a trained text encoder's output) have
no pooled embedding: ``predict_noise`` refuses them with :class:`BackboneError`, and the methods that
make such rows declare SDXL unsupported. :meth:`StableDiffusionXLAdapter.remember_pooled` registers
rows a plugin builds itself.

**Token positions.** Both tokenizers are CLIP's BPE with the same vocabulary and merges, but
tokenizer 2's pad token ``!`` is a special token to transformers: every ``!`` of a prompt becomes id 0
on its own, where tokenizer 1 reads ``!`` as ordinary BPE (``"!</w>"`` 256, ``"!!"`` 748). So the
two streams agree token for token except around ``!`` (``"hello!!"``: ``[SoT, hello, !!, EoT]`` and
``[SoT, hello, !, !, EoT]``), and the padding differs ([EoT] in stream 1, ``!`` in stream 2). Row ``p``
of the concatenation is stream 1's position ``p`` next to stream 2's position ``p``, as the UNet
reads it. ``input_ids`` are stream 1's (what :meth:`tokenize` returns, padded with [EoT]);
``eot_index`` is the **later of the two streams' first [EoT]** (by the end-of-text id, never the pad
id): the first row whose two halves have both read the whole prompt, the same position as either
stream's [EoT] for every prompt without ``!``. ``last_word`` is the row before it; keywords are found
among stream 1's words. The pooled embedding is text encoder 2's output at stream 2's first [EoT],
as transformers pools it. The ``last_pad`` row (76) joins stream 1's [EoT] pad and stream 2's ``!``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from conceptedit.api.backbone import BackboneAdapter
from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import BackboneError, EditError
from conceptedit.models.backbone import StableDiffusionAdapter, first_eot_index
from conceptedit.models.builtin import SDXL_TIME_IDS
from conceptedit.models.tokenizer import tokenize

#: Pooled embeddings remembered per pipeline (least recently used dropped first): 65536 rows are
#: 335 MB at SDXL's 1280 wide, held on the CPU.
POOLED_CAPACITY = 65536
_REGISTRY_ATTR = "_conceptedit_pooled_rows"

_UNSUPPORTED_TOKEN_ATTACKS = (
    "token-embedding attacks (soft prompts, concept inversion, Ring-A-Bell, UnlearnDiffAtk) are not "
    "supported on SDXL: its two text encoders read different token-embedding tables (768 and 1280 wide) and "
    "the pooled embedding of a soft prompt has no encoding to come from"
)


class PooledRows:
    """The pooled embedding of every text row encoded so far, found again by the row's values.

    A row's key is the sha256 of a few of its columns (the first and last of each encoder's part)
    at every position, cast to the UNet's dtype: any copy of the row that reaches the UNet has the
    same key (slices, indexing, ``cat``, ``repeat``, ``expand``, device moves, and casts to the UNet's
    dtype keep values), and two prompts with different tokens differ at once in every later
    position. FLUX's adapter keeps its CLIP pooled vectors the same way (``label`` names the
    backbone in errors).
    """

    def __init__(self, split: int, capacity: int = POOLED_CAPACITY, label: str = "SDXL") -> None:
        self.split = split  # the width of text encoder 1's part
        self.capacity = capacity
        self.label = label
        self._rows: OrderedDict[bytes, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self, hidden: Tensor, dtype: torch.dtype) -> list[bytes]:
        width = hidden.shape[-1]
        columns = [0, self.split - 1, self.split, width - 1]
        probe = hidden.detach()[..., columns].to(dtype).float().cpu().contiguous()
        return [hashlib.sha256(row.numpy().tobytes()).digest() for row in probe]

    def add(self, hidden: Tensor, pooled: Tensor, dtype: torch.dtype) -> None:
        for key, row in zip(self.keys(hidden, dtype), pooled.detach().float().cpu(), strict=True):
            self._rows[key] = row
            self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def find(self, hidden: Tensor, dtype: torch.dtype) -> Tensor:
        keys = self.keys(hidden, dtype)
        missing = [i for i, key in enumerate(keys) if key not in self._rows]
        if missing:
            raise BackboneError(
                f"{self.label}: text rows {missing[:8]} of {len(keys)} were not made by this pipeline's adapter "
                "(encode_prompts), so their pooled embedding is unknown; pass rows of encode_prompts outputs "
                "(sliced, concatenated or repeated as you like), or register new rows with "
                "adapter.remember_pooled(hidden, pooled)"
            )
        for key in keys:
            self._rows.move_to_end(key)
        return torch.stack([self._rows[key] for key in keys])


def encode_rows(
    text_encoder: nn.Module, text_encoder_2: nn.Module, ids: Tensor, ids_2: Tensor
) -> tuple[Tensor, Tensor]:
    """What SDXL's UNet reads of one batch: both encoders' penultimate states concatenated per
    position (float32), and text encoder 2's pooled projection."""
    first = text_encoder(ids.to(_device(text_encoder)), output_hidden_states=True)
    second = text_encoder_2(ids_2.to(_device(text_encoder_2)), output_hidden_states=True)
    rows_1 = first.hidden_states[-2].float()
    rows_2 = second.hidden_states[-2].float().to(rows_1.device)
    return torch.cat([rows_1, rows_2], dim=-1), second.text_embeds.float().to(rows_1.device)


def second_stream_ids(ids: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Tokenizer 2's ids from tokenizer 1's for prompts without ``!``: the same tokens, padded after
    the first [EoT] with tokenizer 2's pad id instead of [EoT] (token-level edits, such as inserted
    tokens, are so made once, on stream 1)."""
    eot = first_eot_index(ids, eos_id)
    after = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) > eot.to(ids.device).unsqueeze(1)
    return ids.masked_fill(after, pad_id)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL (``StableDiffusionXLPipeline``): CLIP ViT-L + OpenCLIP bigG text encoders whose penultimate
    states are concatenated, a UNet with ``text_time`` added conditioning. :attr:`family` is ``sdxl``.

    The UNet, its cross-attention layers, the scheduler, latents and tokenizer 1 are reached as for
    SD-1.x/2.x (the base class); the text side and every UNet call are SDXL's.
    """

    family = "sdxl"
    description = "SDXL: two CLIP text encoders (concatenated rows, pooled embedding), UNet with text_time"

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
        if not all(getattr(pipeline, part, None) is not None for part in parts):
            return False
        return getattr(pipeline.unet.config, "addition_embed_type", None) == "text_time"

    def __init__(self, pipeline: Any) -> None:
        BackboneAdapter.__init__(self, pipeline)  # not the base class's: the family is fixed
        self._check_added_conditioning()

    def _check_added_conditioning(self) -> None:
        unet = self.unet.config
        pooled = int(self.text_encoder_2.config.projection_dim)
        wanted = int(unet.addition_time_embed_dim) * SDXL_TIME_IDS + pooled
        if int(unet.projection_class_embeddings_input_dim) != wanted:
            raise BackboneError(
                f"the UNet's added conditioning is {unet.projection_class_embeddings_input_dim} wide, not "
                f"{SDXL_TIME_IDS} time ids x {unet.addition_time_embed_dim} + a {pooled}-wide pooled embedding "
                "(an SDXL refiner, with an aesthetic score, is not supported)"
            )
        width = int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)
        if width != self.text_dim:
            raise BackboneError(f"the text encoders give {width}-wide rows; the UNet reads {self.text_dim}")

    @property
    def text_encoder_2(self) -> Any:  # a transformers CLIPTextModelWithProjection
        return self.pipeline.text_encoder_2

    @property
    def tokenizer_2(self) -> Any:
        return self.pipeline.tokenizer_2

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    # the pooled embeddings -------------------------------------------------------------

    @property
    def pooled_rows(self) -> PooledRows:
        """The pipeline's remembered pooled embeddings (shared by every adapter of the pipeline)."""
        rows = self.pipeline.__dict__.get(_REGISTRY_ATTR)
        if rows is None:
            rows = self.pipeline.__dict__[_REGISTRY_ATTR] = PooledRows(int(self.text_encoder.config.hidden_size))
        return rows

    def _unet_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def remember_pooled(self, hidden: Tensor, pooled: Tensor) -> None:
        """Register ``pooled`` (``[B, P]``) as the pooled embedding of the rows of ``hidden`` (``[B, L, D]``)."""
        self.pooled_rows.add(hidden, pooled, self._unet_dtype())

    def pooled_for(self, hidden: Tensor) -> Tensor:
        """The pooled embedding of each row of ``hidden`` (float32, on the rows' device)."""
        return self.pooled_rows.find(hidden, self._unet_dtype()).to(hidden.device)

    def time_ids(self, batch: int, height: int, width: int) -> Tensor:
        """``(H, W, 0, 0, H, W)`` per sample for latents of ``height`` x ``width``: the pipeline's
        default (no crop, original and target size the generated size)."""
        scale = int(self.pipeline.vae_scale_factor)
        h, w = height * scale, width * scale
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(batch, -1)

    def added_conditioning(self, hidden: Tensor, latents: Tensor) -> dict[str, Tensor]:
        """SDXL's ``added_cond_kwargs`` for a UNet call on ``latents`` with text rows ``hidden``."""
        dtype = self._unet_dtype()
        pooled = self.pooled_for(hidden).to(dtype)
        time_ids = self.time_ids(latents.shape[0], latents.shape[-2], latents.shape[-1])
        return {"text_embeds": pooled, "time_ids": time_ids.to(hidden.device, dtype)}

    # computation ------------------------------------------------------------------------

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
        prompts = list(prompts)
        if not prompts:
            raise EditError("no prompts to encode")
        ids = self.tokenize(prompts, length)
        ids_2 = tokenize(self.tokenizer_2, prompts, pad_to="max_length" if length == "full" else "longest")
        if ids.shape != ids_2.shape:
            raise BackboneError(
                f"SDXL's tokenizers disagree on the context: {tuple(ids.shape)} vs {tuple(ids_2.shape)}"
            )
        eos = int(self.tokenizer.eos_token_id)
        # Both halves of a row have read the whole prompt from the later first [EoT] on (the streams
        # differ around "!", which tokenizer 2 splits off as its pad token).
        eot = torch.maximum(first_eot_index(ids, eos), first_eot_index(ids_2, int(self.tokenizer_2.eos_token_id)))
        hidden, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            rows, pool = encode_rows(
                self.text_encoder,
                self.text_encoder_2,
                ids[start : start + batch_size],
                ids_2[start : start + batch_size],
            )
            hidden.append(rows)
            pooled.append(pool)
        encoding = PromptEncoding(
            prompts=prompts,
            input_ids=ids,
            hidden=torch.cat(hidden),
            eot_index=eot,
            eos_token_id=eos,
            pooled=torch.cat(pooled),
        )
        self.remember_pooled(encoding.hidden, encoding.pooled)  # type: ignore[arg-type]
        return encoding

    def predict_noise(
        self, latents: Tensor, timesteps: Tensor, hidden: Tensor, unet: nn.Module | None = None
    ) -> Tensor:
        model = unet if unet is not None else self.unet
        dtype = self._unet_dtype()
        rows = hidden.to(dtype)
        added = self.added_conditioning(rows, latents)
        return model(latents.to(dtype), timesteps, encoder_hidden_states=rows, added_cond_kwargs=added).sample

    # sampling with the pipeline ---------------------------------------------------------

    def pipeline_embeds(self, hidden: Tensor, negative: Tensor) -> dict[str, Tensor]:
        return {
            "prompt_embeds": hidden,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": self.pooled_for(hidden).to(hidden.dtype),
            "negative_pooled_prompt_embeds": self.pooled_for(negative).to(negative.dtype),
        }

    def decode_latents(self, latents: Tensor) -> Tensor:
        """As the SDXL pipeline decodes: in float32 when a float16 VAE asks for it (``force_upcast``),
        un-normalised by ``latents_mean``/``latents_std`` when the VAE config has them."""
        vae: Any = self.pipeline.vae
        config = vae.config
        upcast = vae.dtype == torch.float16 and bool(getattr(config, "force_upcast", False))
        dtype = torch.float32 if upcast else vae.dtype
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        if not upcast:
            return vae.decode(latents.to(dtype), return_dict=False)[0]
        vae.to(dtype=torch.float32)
        try:
            return vae.decode(latents.to(dtype), return_dict=False)[0]
        finally:
            vae.to(dtype=torch.float16)
