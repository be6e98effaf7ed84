"""Preservation priors: second-moment matrices of text embeddings over a caption set.

``C = (1/N) Σ_prompts Σ_positions h hᵀ`` summarises what cross-attention keys/values must
keep producing for ordinary prompts. It does not depend on the layer, so one ``D×D`` matrix
serves every projection. Building it means encoding thousands of captions, so it is cached
on disk, keyed by the text encoder's weights, the caption list and the positions used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal

import torch
from safetensors.torch import load_file, save

from conceptedit.api.context import EditContext
from conceptedit.api.edits import PromptEncoding
from conceptedit.errors import EditError
from conceptedit.io.atomic import atomic_write_bytes
from conceptedit.models.loading import module_digest

Positions = Literal["all", "through_eot"]


def embedding_prior(
    ctx: EditContext,
    prompts: Sequence[str],
    positions: Positions = "all",
    batch_size: int = 64,
    *,
    stream: Literal["rows", "pooled"] = "rows",
) -> torch.Tensor:
    """``(1/N) Σ h hᵀ`` over ``prompts`` (float64, ``[D, D]``), from the cache when possible.

    Args:
        ctx: The edit (its text encoder and cache folder are used).
        prompts: Caption set.
        positions: ``all`` 77 token rows (padding included, like the MACE-style cache TRCE's
            reference loads; FLUX's 512), or only the rows up to and including each prompt's first [EoT].
        batch_size: Prompts encoded at once.
        stream: ``pooled``: the second moment of the prompts' pooled vectors instead (one per
            prompt; ``positions`` does not apply), for edits of FLUX's pooled projection.
    """
    adapter = ctx.adapter
    # Every text encoder's weights (SDXL's rows come from two; SD's key is its one encoder's digest).
    encoders = sorted((name, m) for name, m in adapter.components().items() if name.startswith("text_encoder"))
    encoder_key = "|".join(module_digest(module) for _, module in encoders)
    prompt_key = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    what = positions if stream == "rows" else "pooled"
    key = hashlib.sha256(f"{encoder_key}|{prompt_key}|{what}".encode()).hexdigest()[:32]
    path = ctx.cache_path("priors", key)
    if path.is_file():
        return load_file(str(path))["prior"]
    total: torch.Tensor | None = None
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    with ctx.progress.task(f"{ctx.label}: preservation prior ({len(prompts)} prompts)", len(chunks)) as bar:
        for chunk in chunks:
            enc = adapter.encode_prompts(chunk, length="full", batch_size=batch_size)
            hidden = (enc.hidden if stream == "rows" else _pooled(enc, adapter.family)).to(torch.float64)
            if stream == "rows" and positions == "through_eot":
                keep = torch.arange(hidden.shape[1])[None, :] <= enc.eot_index[:, None]
                hidden = hidden * keep[..., None].to(hidden.device)
            flat = hidden.reshape(-1, hidden.shape[-1])
            moment = (flat.T @ flat).cpu()
            total = moment if total is None else total + moment
            bar.advance()
    if total is None:
        raise EditError("a preservation prior needs at least one prompt")
    prior = total / len(prompts)
    meta = {
        "prompts": str(len(prompts)),
        "positions": what,
        "text_encoder": encoder_key,
        "prompt_sha256": prompt_key,
    }
    atomic_write_bytes(path, save({"prior": prior}, metadata=meta))
    return prior


def _pooled(encoding: PromptEncoding, family: str) -> torch.Tensor:
    if encoding.pooled is None:
        raise EditError(f"the {family} text encoder gives no pooled vector to build a pooled prior from")
    return encoding.pooled
