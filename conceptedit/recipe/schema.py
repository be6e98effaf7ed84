"""The recipe schema of the installed methods: the static models plus the union of edit models.

Each method contributes one model whose ``params`` is the method's own ``Params`` class, so the
schema, validation and ``conceptedit schema`` always match what is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, create_model

from conceptedit.api.method import EditMethod
from conceptedit.api.params import TrainingConfig
from conceptedit.api.recipe import EditBase, GroupBase, RecipeBase


def _edit_model(cls: type[EditMethod[Any]]) -> type[EditBase]:
    fields: dict[str, Any] = {
        "method": (Literal[cls.name], Field(description=cls.summary)),
        # Params with a required field get no default: a default factory that fails would replace
        # every other error of the recipe with its own, pointing at the wrong place.
        "params": (cls.Params, _params_field(cls)),
    }
    if cls.kind == "training":
        training = _constrained_training(cls.Training)
        fields["training"] = (training, Field(default_factory=training, description="Training loop."))
    model = create_model(f"Edit_{cls.name}", __base__=EditBase, **fields)
    model.method_cls = cls
    model.__doc__ = f"{cls.name}: {cls.summary}"
    return model


def _params_field(cls: type[EditMethod[Any]]) -> Any:
    description = f"Parameters of {cls.name}."
    if any(field.is_required() for field in cls.Params.model_fields.values()):
        return Field(description=description)
    return Field(default_factory=cls.Params, description=description)


def _constrained_training(training: type[TrainingConfig]) -> type[TrainingConfig]:
    """``training`` with TrainingConfig's bounds put back on fields a subclass re-declared as a plain type.

    ``steps: int = 4`` in a subclass replaces the base's ``PositiveInt`` field whole, so without
    this ``steps: 0`` or ``lr: -1`` would pass validation and fail (or do nothing) mid-run.
    """
    restored: dict[str, Any] = {}
    for name, base in TrainingConfig.model_fields.items():
        field = training.model_fields.get(name)
        if field is None or field.metadata or not base.metadata or field.annotation != base.annotation:
            continue
        info = copy(field)
        info.metadata = [*base.metadata]
        info.description = field.description or base.description
        restored[name] = (field.annotation, info)
    if not restored:
        return training
    # The pydantic mypy plugin types the result as a new class unrelated to ``training``; it is a subclass.
    model = cast(
        "type[TrainingConfig]",
        create_model(training.__name__, __base__=training, __module__=training.__module__, **restored),
    )
    model.__doc__ = training.__doc__
    return model


def _tag_of(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return "group" if "group" in value else value.get("method")
    if isinstance(value, GroupBase):
        return "group"
    return getattr(value, "method", None)


class RecipeSchema:
    """The recipe model for one set of installed methods, plus what error rendering needs."""

    def __init__(self, methods: Mapping[str, type[EditMethod[Any]]]) -> None:
        self.methods = dict(methods)
        self.edit_models = {name: _edit_model(cls) for name, cls in sorted(self.methods.items())}
        training = {n: m for n, m in self.edit_models.items() if self.methods[n].kind == "training"}
        self.group_model: type[GroupBase] | None = None
        if training:
            member: Any = _union(training)
            self.group_model = create_model(
                "TrainingGroup",
                __base__=GroupBase,
                edits=(list[member], Field(min_length=2, description="Training edits trained together.")),
            )
            self.group_model.model_rebuild()
        tagged: dict[str, type[BaseModel]] = dict(self.edit_models)
        if self.group_model is not None:
            tagged["group"] = self.group_model
        self.tag_models = tagged
        edit_union: Any = _union(tagged) if tagged else Annotated[Any, BeforeValidator(_no_methods)]
        self.model: type[RecipeBase] = create_model(
            "Recipe",
            __base__=RecipeBase,
            edits=(list[edit_union], Field(min_length=1, description="Edits, applied in this order.")),
        )

    def json_schema(self) -> dict[str, Any]:
        schema = self.model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = "conceptedit recipe"
        # `model: NAME` is accepted as shorthand for `model: {id: NAME}` (see RecipeBase._model_shorthand)
        spec = schema["properties"]["model"]
        shorthand = {"type": "string", "minLength": 1, "description": "Shorthand for `model: {id: ...}`."}
        schema["properties"]["model"] = {"anyOf": [shorthand, spec]}
        return schema


def _no_methods(value: Any) -> Any:
    raise ValueError(
        "no edit methods are installed; `conceptedit plugins` shows what failed to load "
        "(CONCEPTEDIT_LOAD_PLUGINS / CONCEPTEDIT_DISABLE_PLUGINS may be filtering them)"
    )


def _union(models: Mapping[str, type[BaseModel]]) -> Any:
    members = tuple(Annotated[model, Tag(tag)] for tag, model in models.items())
    inner = members[0] if len(members) == 1 else Union[members]  # noqa: UP007 - built dynamically
    return Annotated[
        inner,
        Discriminator(
            _tag_of,
            custom_error_type="unknown_method",
            custom_error_message="unknown edit method",
            custom_error_context={"known": ", ".join(models)},
        ),
    ]


def resolve_relative(base_dir: Path | None, path: str) -> Path:
    """A recipe-relative path made absolute (``~`` expanded)."""
    target = Path(path).expanduser()
    if not target.is_absolute() and base_dir is not None:
        target = base_dir / target
    return target
