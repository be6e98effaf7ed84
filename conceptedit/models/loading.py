"""Loading base models: hub ids and local folders (``from_pretrained``), single checkpoint files
(``from_single_file``) and the built-in models that need no network.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch

from conceptedit.api.paths import path_text_problem, shown
from conceptedit.errors import ModelLoadError, did_you_mean
from conceptedit.io.hashing import file_sha256
from conceptedit.models.builtin import BUILTIN_MODELS

BUILTIN_PREFIX = "builtin:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A pipeline plus what the manifest records about where it came from.

    Attributes:
        pipeline: The loaded diffusers pipeline (safety checker off).
        kind: ``builtin``, ``folder``, ``single_file`` or ``hub``.
        id: The model id as given.
        revision: Hub revision asked for (hub only).
        file_hashes: sha256 of each weight file read (relative path → hex), or of the
            built-in model's state for built-ins.
    """

    pipeline: Any
    kind: str
    id: str
    revision: str | None = None
    file_hashes: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "revision": self.revision, "file_hashes": self.file_hashes}


def load_model(
    model_id: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Load a base model from any supported source onto ``device`` in ``dtype``."""
    torch_dtype = DTYPES[dtype]
    problem = path_text_problem(model_id)
    if problem is not None:
        raise ModelLoadError(f"model {shown(model_id)}: the id {problem}; give a hub id, a folder or a file path")
    if model_id.startswith(BUILTIN_PREFIX):
        loaded = _load_builtin(model_id)
    else:
        path = Path(model_id).expanduser()
        if path.suffix in WEIGHT_SUFFIXES:
            loaded = _load_single_file(model_id, path, torch_dtype)
        elif path.is_dir():
            loaded = _load_folder(model_id, path, torch_dtype, variant)
        elif _looks_like_path(model_id):
            raise ModelLoadError(
                f"model {model_id!r}: no such folder ({path.resolve()}); give a diffusers folder "
                "(with model_index.json), a .safetensors file, a hub id or builtin:NAME"
            )
        else:
            loaded = _load_hub(model_id, revision, torch_dtype, variant)
    loaded.pipeline.to(device=device)
    if loaded.pipeline.dtype != torch_dtype:
        loaded.pipeline.to(dtype=torch_dtype)
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded


def builtin_family(model_id: str) -> str | None:
    """The backbone family of a ``builtin:NAME`` model without building it; None for any other id
    (its family is known once loaded)."""
    if not model_id.startswith(BUILTIN_PREFIX):
        return None
    entry = BUILTIN_MODELS.get(model_id[len(BUILTIN_PREFIX) :])
    return entry.family if entry is not None else None


def model_id_problem(model_id: str) -> tuple[str, str] | None:
    """``(message, fix)`` for a model id that cannot load, found without loading anything; None
    if it may load. The recipe loader reports it at ``model.id``; :func:`load_model` decides the same way."""
    if model_id.startswith(BUILTIN_PREFIX):
        if model_id[len(BUILTIN_PREFIX) :] in BUILTIN_MODELS:
            return None
        known = [BUILTIN_PREFIX + n for n in BUILTIN_MODELS]
        return f"unknown built-in model {model_id!r}", did_you_mean(model_id, known, label="built-ins")
    target = Path(model_id).expanduser()
    if target.suffix in WEIGHT_SUFFIXES and target.suffix != ".safetensors":
        return (
            f"{model_id!r}: only .safetensors checkpoints are loaded ({target.suffix} files are pickles, "
            "which can run arbitrary code when loaded)",
            "convert the checkpoint to .safetensors, or give a diffusers folder",
        )
    if target.suffix in WEIGHT_SUFFIXES and not target.is_file():
        return (
            f"checkpoint file {model_id!r} does not exist (looked for {target.resolve()})",
            "model paths are relative to the current folder",
        )
    if target.suffix not in WEIGHT_SUFFIXES and _looks_like_path(model_id) and not target.is_dir():
        return (
            f"model folder {model_id!r} does not exist (looked for {target.resolve()})",
            "give a diffusers folder (with model_index.json), a .safetensors file, a hub id "
            "(owner/name) or builtin:tiny-sd; model paths are relative to the current folder",
        )
    if target.suffix not in WEIGHT_SUFFIXES and target.is_dir() and not (target / "model_index.json").is_file():
        return (
            f"model folder {model_id!r} has no model_index.json, so it is not a diffusers pipeline folder",
            "give the folder that holds model_index.json (e.g. one written by save_pretrained)",
        )
    return None


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or model_id.count("/") != 1 or "\\" in model_id


def _load_builtin(model_id: str) -> LoadedModel:
    name = model_id[len(BUILTIN_PREFIX) :]
    entry = BUILTIN_MODELS.get(name)
    if entry is None:
        close = get_close_matches(name, list(BUILTIN_MODELS), n=1)
        hint = f"did you mean builtin:{close[0]}? " if close else ""
        raise ModelLoadError(
            f"unknown built-in model {model_id!r}; {hint}built-ins: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        )
    pipeline = entry.build()
    return LoadedModel(pipeline, "builtin", model_id, file_hashes={"state": state_digest(pipeline)})


def _pipeline_class(model_index: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The diffusers pipeline class a ``model_index.json`` names (SDXL, FLUX or, by default, SD) and the
    keyword arguments that turn its safety checker off (SDXL and FLUX have none)."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if model_index.get("_class_name") == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline, {}
    if model_index.get("_class_name") == "FluxPipeline":
        return FluxPipeline, {}
    return StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}


def _load_folder(model_id: str, path: Path, dtype: torch.dtype, variant: str | None) -> LoadedModel:
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model folder {path} has no model_index.json; is it a diffusers pipeline folder?")
    try:
        cls, extra = _pipeline_class(json.loads((path / "model_index.json").read_text(encoding="utf-8")))
        pipeline = cls.from_pretrained(str(path), torch_dtype=dtype, variant=variant, local_files_only=True, **extra)
    except Exception as exc:
        raise ModelLoadError(f"could not load the diffusers folder {path}: {exc}") from exc
    return LoadedModel(pipeline, "folder", model_id, file_hashes=_hash_weights(path))


def _load_single_file(model_id: str, path: Path, dtype: torch.dtype) -> LoadedModel:
    from diffusers import StableDiffusionPipeline

    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{path.name}: only .safetensors checkpoints are loaded (other formats unpickle arbitrary code); "
            "convert it to safetensors first"
        )
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist")
    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load the checkpoint {path}: {exc}") from exc
    return LoadedModel(pipeline, "single_file", model_id, file_hashes={path.name: file_sha256(path)})


def _load_hub(model_id: str, revision: str | None, dtype: torch.dtype, variant: str | None) -> LoadedModel:
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(model_id, revision=revision))
    except Exception:  # unreachable or not a pipeline: from_pretrained below says why
        index = {}
    cls, extra = _pipeline_class(index)
    try:
        pipeline = cls.from_pretrained(model_id, revision=revision, torch_dtype=dtype, variant=variant, **extra)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {model_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without network access, download the model elsewhere and pass its local folder, "
            f"or use a built-in model such as builtin:tiny-sd (no local folder {Path(model_id).resolve()} exists)"
        ) from exc
    hashes: dict[str, str] = {}
    folder = _hub_snapshot(model_id, revision)
    if folder is not None:
        hashes = _hash_weights(folder)
    return LoadedModel(pipeline, "hub", model_id, revision, hashes)


def _hub_snapshot(model_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:  # the hashes are informative; a cache layout we cannot read is not fatal
        return None


def _hash_weights(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return {str(p.relative_to(folder)): file_sha256(p) for p in files}


def state_digest(pipeline: Any) -> str:
    """sha256 over every weight of the pipeline's denoiser (UNet or transformer), text encoder(s) and
    VAE, in name order."""
    digest = hashlib.sha256()
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipeline, component, None)
        if module is not None:
            _update_with_module(digest, component, module)
    return digest.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over one module's weights in name order (cache keys of derived data)."""
    digest = hashlib.sha256()
    _update_with_module(digest, "", module)
    return digest.hexdigest()


def _update_with_module(digest: Any, prefix: str, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{prefix}.{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
