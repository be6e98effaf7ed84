"""Choosing parameters by name: the trainable subsets training methods declare."""

from __future__ import annotations

from collections.abc import Sequence

from conceptedit.api.backbone import BackboneAdapter
from conceptedit.errors import TrainingError


def select_parameters(
    adapter: BackboneAdapter, include: Sequence[str], exclude: Sequence[str] = (), component: str = "unet"
) -> list[str]:
    """Full names of ``component`` parameters containing any ``include`` substring and no ``exclude`` one.

    Raises:
        TrainingError: when nothing matches (a typo would otherwise train nothing).
    """
    prefix = component + "."
    names = [
        name
        for name, _ in adapter.named_parameters()
        if name.startswith(prefix)
        and any(part in name for part in include)
        and not any(part in name for part in exclude)
    ]
    if not names:
        raise TrainingError(f"no {component} parameter name contains any of {list(include)}")
    return names


#: Named parameter sets of the published training methods, over diffusers UNet names. Each maps
#: to (include, exclude) substrings of full names; ``None`` includes every UNet parameter.
PARAMETER_SETS: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {
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


def select_parameter_set(adapter: BackboneAdapter, name: str) -> list[str]:
    """Full names of the UNet parameters in the named set (see :data:`PARAMETER_SETS`).

    Raises:
        TrainingError: for an unknown name or a set the model has no parameters for.
    """
    if name not in PARAMETER_SETS:
        raise TrainingError(f"unknown parameter set {name!r}; use one of {', '.join(PARAMETER_SETS)}")
    include, exclude = PARAMETER_SETS[name]
    names = [
        full
        for full, _ in adapter.named_parameters()
        if full.startswith("unet.")
        and (include is None or any(part in full for part in include))
        and not any(part in full for part in exclude)
    ]
    if not names:
        raise TrainingError(f"parameter set {name!r} matches no UNet parameter of this model")
    return names
