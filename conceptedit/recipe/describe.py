"""Human-readable descriptions of methods and their parameter models, for ``conceptedit methods``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from conceptedit.api.method import EditMethod


def describe_model(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One entry per field: name, type, default (``None`` if required) and description."""
    out = []
    for name, info in model.model_fields.items():
        if info.default is not PydanticUndefined:
            default: Any = info.default
        elif info.default_factory is not None:
            default = info.default_factory()  # type: ignore[call-arg]
        else:
            default = "<required>"
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        out.append(
            {
                "name": name,
                "type": _type_name(info.annotation),
                "default": default,
                "description": info.description or "",
            }
        )
    return out


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def describe_method(cls: type[EditMethod[Any]]) -> dict[str, object]:
    """Name, kind, backbones and every parameter with type, default and description."""
    out: dict[str, object] = {
        "name": cls.name,
        "summary": cls.summary,
        "kind": cls.kind,
        "paper": cls.paper,
        "backbones": sorted(cls.backbones),
        "unsupported_backbones": dict(cls.unsupported_backbones),
        "params": describe_model(cls.Params),
    }
    if cls.kind == "training":
        out["training"] = describe_model(cls.Training)
    return out
