"""``single-file``: the edited model as one ``.safetensors`` checkpoint in the original Stable Diffusion layout.

The original (CompVis/LDM) code names the three networks ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.*`` (the CLIP text encoder of
SD-1.x). That is the layout AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` read.
The renaming below goes from diffusers names to that layout; the only shape change is the VAE's
mid-block attention, whose q/k/v/output projections are ``Linear`` layers in diffusers and 1x1
convolutions in the original, so their weights gain two trailing singleton dimensions. Every
other tensor is written as it is, so a float32 model loads back bit for bit.

Only SD-1.x pipelines are written. SD-2.x keeps its OpenCLIP text encoder under
``cond_stage_model.model.*`` with fused q/k/v projections; that layout is not written here, and
such a pipeline is refused with the formats that do hold it.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from conceptedit.api.export import Exporter, ExportOptions, ExportReport, ExportSource
from conceptedit.errors import ExportError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
FORMAT = "conceptedit.single_file"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# --------------------------------------------------------------------------- names: UNet

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# A diffusers ResnetBlock2D's layers and their place in the original ResBlock's Sequentials.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_UPSAMPLE = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)")


@dataclass(frozen=True)
class UNetLayout:
    """What the original names of a UNet depend on.

    Attributes:
        layers_per_block: Resnets per down block (an up block has one more).
        up_with_attention: The up blocks that have cross-attention (their upsampler then comes
            third in the original block, after the resnet and the transformer).
    """

    layers_per_block: int
    up_with_attention: frozenset[int]

    @classmethod
    def of(cls, names: list[str], layers_per_block: int) -> UNetLayout:
        up = {int(m[1]) for m in map(_UP.fullmatch, names) if m is not None and m[2] == "attentions"}
        return cls(layers_per_block, frozenset(up))

    def original(self, key: str) -> str | None:
        """The original name of the diffusers UNet tensor ``key`` (no ``model.diffusion_model.``), or None."""
        module, _, leaf = key.rpartition(".")
        if module in _UNET_TOP:
            return f"{_UNET_TOP[module]}.{leaf}"
        step = self.layers_per_block + 1
        if (m := _DOWN.fullmatch(key)) and int(m[3]) < self.layers_per_block:
            return _unet_part(f"input_blocks.{1 + int(m[1]) * step + int(m[3])}", m[2], m[4])
        if m := _DOWNSAMPLE.fullmatch(key):
            return f"input_blocks.{1 + int(m[1]) * step + self.layers_per_block}.0.op.{m[2]}"
        if (m := _MID.fullmatch(key)) and (m[1], m[2]) in {("resnets", "0"), ("resnets", "1"), ("attentions", "0")}:
            position = 1 if m[1] == "attentions" else 2 * int(m[2])
            return _unet_part(f"middle_block.{position}", m[1], m[3], nested=False)
        if (m := _UP.fullmatch(key)) and int(m[3]) < step:
            return _unet_part(f"output_blocks.{int(m[1]) * step + int(m[3])}", m[2], m[4])
        if m := _UPSAMPLE.fullmatch(key):
            block = int(m[1])
            after = 2 if block in self.up_with_attention else 1
            return f"output_blocks.{block * step + self.layers_per_block}.{after}.conv.{m[2]}"
        return None


def _unet_part(block: str, kind: str, rest: str, *, nested: bool = True) -> str | None:
    """In an original input or output block a resnet is the first module (``.0``), its transformer
    the second (``.1``); the middle block is one sequence of the three (``nested=False``)."""
    if kind == "attentions":
        return f"{block}.1.{rest}" if nested else f"{block}.{rest}"
    layer, _, leaf = rest.rpartition(".")
    if layer not in _UNET_RESNET:
        return None
    return f"{block}.0.{_UNET_RESNET[layer]}.{leaf}" if nested else f"{block}.{_UNET_RESNET[layer]}.{leaf}"


# --------------------------------------------------------------------------- names: VAE

_VAE_SAME = {
    "encoder.conv_in",
    "encoder.conv_out",
    "decoder.conv_in",
    "decoder.conv_out",
    "quant_conv",
    "post_quant_conv",
}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(?:resnets\.(\d+)\.(\w+)|downsamplers\.0\.(conv))\.(weight|bias)")
_VAE_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)\.(\w+)|upsamplers\.0\.(conv))\.(weight|bias)")
_VAE_MID = re.compile(
    r"(encoder|decoder)\.mid_block\.(?:resnets\.([01])\.(\w+)|attentions\.0\.(\w+(?:\.0)?))\.(weight|bias)"
)


def vae_original(key: str, up_blocks: int) -> str | None:
    """The original name of the diffusers VAE tensor ``key`` (no ``first_stage_model.``), or None.

    The decoder's up blocks run in the opposite order: diffusers' ``up_blocks.0`` is the
    original ``up.{n-1}``.
    """
    module, _, leaf = key.rpartition(".")
    if module in _VAE_SAME:
        return key
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{leaf}"
    if m := _VAE_DOWN.fullmatch(key):
        return _vae_block(f"encoder.down.{m[1]}", m[2], m[3], "downsample" if m[4] else None, m[5])
    if m := _VAE_UP.fullmatch(key):
        return _vae_block(f"decoder.up.{up_blocks - 1 - int(m[1])}", m[2], m[3], "upsample" if m[4] else None, m[5])
    if m := _VAE_MID.fullmatch(key):
        if m[4] is not None:
            return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[4]]}.{m[5]}" if m[4] in _VAE_ATTENTION else None
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET[m[3]]}.{m[5]}" if m[3] in _VAE_RESNET else None
    return None


def _vae_block(block: str, resnet: str | None, layer: str | None, sampler: str | None, leaf: str) -> str | None:
    if sampler is not None:
        return f"{block}.{sampler}.conv.{leaf}"
    return f"{block}.block.{resnet}.{_VAE_RESNET[layer]}.{leaf}" if layer in _VAE_RESNET else None


def _vae_conv_weight(original: str, value: Tensor) -> Tensor:
    """The VAE attention's Linear weights become 1x1 convolution weights (``[out, in]`` -> ``[out, in, 1, 1]``)."""
    is_projection = re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", original) is not None
    return value.reshape(*value.shape, 1, 1) if is_projection and value.ndim == 2 else value


# --------------------------------------------------------------------------- names: the whole pipeline


def _weights(module: Any) -> dict[str, Tensor]:
    """A component's state dict without what guards may have hung on it (custom attention processors)."""
    state: dict[str, Tensor] = module.state_dict()
    return {name: value for name, value in state.items() if ".processor." not in f".{name}"}


def original_names(pipeline: Any) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``{original name: (component, diffusers name)}`` for every weight of an SD-1.x pipeline,
    and the ``component.name`` of each weight that has no place in the original layout."""
    names: dict[str, tuple[str, str]] = {}
    unplaced: list[str] = []
    unet_keys = list(_weights(pipeline.unet))
    layout = UNetLayout.of(unet_keys, int(pipeline.unet.config.layers_per_block))
    up_blocks = len(pipeline.vae.config.up_block_types)
    placed: dict[str, dict[str, str | None]] = {
        "unet": {key: _prefixed(UNET_PREFIX, layout.original(key)) for key in unet_keys},
        "vae": {key: _prefixed(VAE_PREFIX, vae_original(key, up_blocks)) for key in _weights(pipeline.vae)},
        "text_encoder": {key: CLIP_PREFIX + key.removeprefix("text_model.") for key in _weights(pipeline.text_encoder)},
    }
    for component, table in placed.items():
        for key, original in table.items():
            if original is None or original in names:
                unplaced.append(f"{component}.{key}")
            else:
                names[original] = (component, key)
    return names, unplaced


def _prefixed(prefix: str, name: str | None) -> str | None:
    return None if name is None else prefix + name


def original_state_dict(pipeline: Any, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The pipeline's UNet, VAE and text encoder under their original names, on the CPU, in name order."""
    names, unplaced = original_names(pipeline)
    if unplaced:
        raise ExportError(f"{len(unplaced)} tensors have no place in the original SD-1.x layout: {unplaced[:5]}")
    states = {c: _weights(getattr(pipeline, c)) for c in ("unet", "vae", "text_encoder")}
    out: dict[str, Tensor] = {}
    for original in sorted(names):
        component, key = names[original]
        value = states[component][key].detach()
        if component == "vae":
            value = _vae_conv_weight(original, value)
        out[original] = value.to("cpu", dtype if dtype is not None and value.is_floating_point() else value.dtype)
    return {name: value.contiguous() for name, value in out.items()}


# --------------------------------------------------------------------------- the exporter


class SingleFileOptions(ExportOptions):
    """``dtype``: the checkpoint's float type (default: the run's); float16 halves the file."""

    dtype: Literal["float32", "float16", "bfloat16"] | None = None


def backbone_problem(pipeline: Any) -> str | None:
    """Why ``pipeline`` is not an SD-1.x pipeline this format writes, or None."""
    parts: dict[str, Any] = {name: getattr(pipeline, name, None) for name in ("unet", "vae", "text_encoder")}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        return (
            f"the pipeline has no {', '.join(missing)}; a Stable Diffusion checkpoint holds UNet, VAE and text encoder"
        )
    wanted = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
    odd = [
        f"{name} is a {type(parts[name]).__name__}"
        for name, kind in wanted.items()
        if type(parts[name]).__name__ != kind
    ]
    if odd:
        return f"not a Stable Diffusion 1.x pipeline ({'; '.join(odd)}); export `diffusers` instead"
    activation = getattr(parts["text_encoder"].config, "hidden_act", None)
    if activation != "quick_gelu":
        return (
            f"its text encoder is not SD-1.x's OpenAI CLIP (hidden_act {activation!r}; SD-2.x's OpenCLIP uses 'gelu'). "
            "SD-2.x's original layout (cond_stage_model.model.*, fused q/k/v projections) is not written by this "
            "format; export `diffusers` (a full diffusers folder) or `lora` instead"
        )
    config = parts["unet"].config
    extra = [k for k in ("class_embed_type", "addition_embed_type") if config.get(k) is not None]
    if extra or not isinstance(config.get("layers_per_block"), int):
        what = ", ".join(extra) or f"layers_per_block {config.get('layers_per_block')}"
        return f"its UNet is not SD-1.x's ({what}); export `diffusers` instead"
    return None


def _available(source: ExportSource) -> str | None:
    problem = backbone_problem(source.pipeline)
    if problem is not None:
        return problem
    _, unplaced = original_names(source.pipeline)
    if unplaced:
        shown = ", ".join(unplaced[:3])
        return (
            f"{len(unplaced)} of its tensors have no place in the original SD-1.x layout ({shown}...); "
            "export `diffusers` instead"
        )
    return None


def checkpoint_name(source: ExportSource) -> str:
    """The checkpoint's file name: the run folder's name, which UIs list it by."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.run_dir.resolve().name).strip("-.") or "model"
    return f"{stem}.safetensors"


def _export(source: ExportSource, folder: Path) -> ExportReport:
    name = getattr(source.options, "dtype", None)
    state = original_state_dict(source.pipeline, DTYPES[name] if name else None)
    file = checkpoint_name(source)
    save_file(state, str(folder / file), metadata=_metadata(source, state))
    counts = {prefix: sum(k.startswith(prefix) for k in state) for prefix in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)}
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    return ExportReport(
        files=[file],
        details={
            "layout": "original Stable Diffusion (CompVis/LDM), SD-1.x",
            "tensors": len(state),
            "tensors_by_prefix": counts,
            "dtype": dtypes,
            "bytes": (folder / file).stat().st_size,
            "usage": usage(source, file),
        },
        notes=[
            f"{file} is the whole edited model (UNet, VAE, CLIP text encoder) in the original Stable Diffusion "
            "layout: AUTOMATIC1111 and ComfyUI load it as a checkpoint; diffusers loads it with "
            "StableDiffusionPipeline.from_single_file(path, config=<the base model's diffusers folder or hub id>).",
            "It carries no scheduler or tokenizer (the loader takes them from its config) and none of the "
            "original checkpoint's training-only entries (EMA weights, noise-schedule buffers).",
        ],
    )


def _metadata(source: ExportSource, state: dict[str, Tensor]) -> dict[str, str]:
    base_id = str(source.base_model.get("id", "?"))
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layout": "ldm",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": source.run_dir.resolve().name,
        "modelspec.description": f"{base_id} with concepts erased by conceptedit (see the export's README.md)",
        "base_model": json.dumps(source.base_model, sort_keys=True, default=str),
        "recipe": json.dumps(source.recipe, sort_keys=True, default=str),
        "tensors": str(len(state)),
    }


def usage(source: ExportSource, file: str) -> str:
    """How to load the checkpoint with diffusers: the base model's configs give the architecture."""
    base_id = str(source.base_model.get("id", "BASE"))
    lines = ["from diffusers import StableDiffusionPipeline", ""]
    if base_id.startswith("builtin:"):  # no files of its own: write its configs first
        lines[:0] = ["import conceptedit"]
        lines += [f'conceptedit.load_model("{base_id}").pipeline.save_pretrained("base")  # the configs', ""]
        config = ', config="base"'
    elif base_id.endswith(".safetensors"):  # an SD-1 checkpoint itself: diffusers infers the same configs
        config = ""
    else:  # a hub id or a diffusers folder
        config = f', config="{base_id}"'
    lines += [
        f'pipe = StableDiffusionPipeline.from_single_file("{file}"{config})',
        "# AUTOMATIC1111 / ComfyUI: put the file in models/Stable-diffusion (models/checkpoints) and pick it.",
    ]
    return "\n".join(lines)


def checkpoint_file(folder: Path) -> Path:
    """The one ``.safetensors`` checkpoint of an export folder."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ExportError(f"{folder}: expected one .safetensors checkpoint, found {[f.name for f in files]}")
    return files[0]


def config_folder(pipeline: Any, folder: Path) -> Path:
    """A diffusers folder of ``pipeline`` without weights: ``model_index.json``, each component's
    config, the tokenizer's files. ``from_single_file(config=folder)`` builds the same architecture
    from it without the hub, and without guessing sizes from the checkpoint."""
    pipeline.save_config(str(folder))
    for name, component in pipeline.components.items():
        target = folder / name
        if component is None:
            continue
        if hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(str(target))
        elif hasattr(getattr(component, "config", None), "save_pretrained"):  # transformers models
            component.config.save_pretrained(str(target))
        elif hasattr(component, "save_pretrained"):  # tokenizers, feature extractors: small files
            component.save_pretrained(str(target))
    return folder


def reload(base_pipeline: Any, folder: Path) -> Any:
    """Load the checkpoint the way diffusers users do: ``from_single_file`` with the base's config, offline."""
    from diffusers import StableDiffusionPipeline

    path = checkpoint_file(folder)
    with tempfile.TemporaryDirectory(prefix="conceptedit-config-") as tmp:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_folder(base_pipeline, Path(tmp))),
            local_files_only=True,
            torch_dtype=base_pipeline.unet.dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    pipeline.to(base_pipeline.unet.device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


SINGLE_FILE = Exporter(
    name="single-file",
    description="one .safetensors checkpoint in the original SD-1.x layout (AUTOMATIC1111, ComfyUI, from_single_file)",
    export=_export,
    Options=SingleFileOptions,
    available=_available,
    reload=reload,
)
