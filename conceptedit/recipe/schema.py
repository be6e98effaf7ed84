"""Pydantic models of a recipe. ``extra="forbid"`` everywhere: a misspelt key is an error.

The ``edits`` list is a union built at run time from the installed methods: each method
contributes one model whose ``params`` is the method's own ``Params`` class, so the schema,
validation and ``conceptedit schema`` always match what is installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from copy import copy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conceptedit.io.paths import path_text_problem
from conceptedit.methods import EditMethod, TrainingConfig

SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConceptRefMarker:
    """Marks a method parameter whose value names a concept set of the recipe."""


#: A method parameter naming one of the recipe's ``concepts:`` sets.
ConceptRef = Annotated[
    str,
    ConceptRefMarker(),
    Field(
        description="Name of a concept set under the recipe's `concepts:`.", json_schema_extra={"x-concept-ref": True}
    ),
]


def _usable_path_text(value: str) -> str:
    problem = path_text_problem(value)
    if problem is not None:
        raise PydanticCustomError("path_text", "the path {problem}", {"problem": problem})
    return value


def _path_as_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


#: A recipe field or method parameter that names a file or folder: text the operating system
#: can take as a path (no NUL, not over the length limits), checked when the recipe loads.
#: ``pathlib.Path`` values given from Python are taken as their text.
PathText = Annotated[str, BeforeValidator(_path_as_text), AfterValidator(_usable_path_text)]


class ModelSpec(Strict):
    """The base model an edit starts from."""

    id: PathText = Field(
        description="A hub id (CompVis/stable-diffusion-v1-4), a local diffusers folder, "
        "a single .safetensors checkpoint, or builtin:NAME (builtin:tiny-sd, builtin:sd14-random)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weight variant to load, e.g. fp16.")

    @field_validator("id")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty; use a hub id, a folder, a .safetensors file or builtin:NAME")
        return value


def _one_slot(template: str) -> str:
    if template.count("{}") != 1:
        raise ValueError(
            f"template {template!r} must contain `{{}}` exactly once, where the concept goes (e.g. 'a photo of {{}}')"
        )
    return template


class ConceptSet(Strict):
    """Prompts to edit: concepts (optionally paired with targets) expanded through templates.

    Give exactly one of ``pairs``, ``concepts`` or ``file``. A file holds a JSON/YAML list of
    strings or of ``[concept, target]`` pairs, or one concept per line (``.txt``).
    """

    pairs: list[tuple[str, str]] | None = Field(None, description="[concept, target] pairs.")
    concepts: list[str] | None = Field(None, description="Concepts; each maps to `target`.")
    file: PathText | None = Field(None, description="Path (relative to the recipe) of a concept file.")
    target: str = Field("", description='Target for entries that give none ("" = unconditional).')
    templates: list[Annotated[str, AfterValidator(_one_slot)]] = Field(
        ["{}"], min_length=1, description="Prompt templates, each with one `{}`."
    )
    limit: PositiveInt | None = Field(None, description="Use only the first N entries of the list.")

    @model_validator(mode="after")
    def _one_source(self) -> ConceptSet:
        given = [name for name in ("pairs", "concepts", "file") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `pairs`, `concepts` or `file`" + (f" (got {', '.join(given)})" if given else "")
            )
        for source in ("pairs", "concepts"):
            if getattr(self, source) == []:
                raise ValueError(f"`{source}` is empty")
        return self


class OutputSpec(Strict):
    """Where and in which formats a run is written."""

    dir: PathText = Field(
        "runs/{recipe}-{time}",
        description="Run folder, relative to the working directory; {recipe} is the recipe file's stem, "
        "{time} the start time.",
    )
    formats: list[str] = Field(
        ["delta"], description="Exporters to run: delta (edit.safetensors, always), diffusers (full pipeline)."
    )
    overwrite: bool = Field(False, description="Replace an existing run folder.")


class EvaluateSpec(Strict):
    """One evaluation run at the end of the recipe: a prompt suite, generated and scored."""

    suite: str = Field(description="Prompt suite name (`conceptedit suites` lists them).")
    options: dict[str, Any] = Field({}, description="The suite's options (e.g. `target: red`).")
    limit: PositiveInt | None = Field(None, description="Use only the first N prompts of the suite.")
    steps: PositiveInt = Field(25, description="Sampling steps (the pipeline's scheduler).")
    guidance: PositiveFloat | None = Field(
        None, description="CFG scale; None uses each prompt's own when the suite has one, else 7.5."
    )
    compare_base: bool = Field(True, description="Also score the base model on the same prompts and seeds.")
    batch_size: PositiveInt = Field(16, description="Images per pipeline call.")


class EditBase(Strict):
    """Fields every edit has, whatever its method."""

    method_cls: ClassVar[type[EditMethod]]

    name: str | None = Field(None, description="Label for logs and outputs (default: method name).")
    weight: PositiveFloat = Field(1.0, description="Weight of this edit's loss inside a training group.")

    @property
    def label(self) -> str:
        return self.name or self.method_cls.name

    def build(self) -> EditMethod:
        """The method object for this edit."""
        return self.method_cls(self.params)  # type: ignore[attr-defined]


class GroupBase(Strict):
    """Training methods trained together on the sum of their weighted losses."""

    group: str = Field(description="Label of the group.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The shared training loop.")

    @property
    def label(self) -> str:
        return self.group


# EditSpec is the union of the per-method models; spelled Any in signatures outside this module.
EditSpec = EditBase


class RecipeBase(Strict):
    """A recipe: a base model and an ordered list of edits."""

    schema_version: Literal[1] = Field(description="Recipe format version; write 1.")
    model: ModelSpec
    seed: NonNegativeInt = Field(0, description="Global seed; each edit derives its own from it.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights' dtype.")
    plugins: list[PathText] = Field([], description="Plugin files or folders to load, relative to the recipe.")
    concepts: dict[str, ConceptSet] = Field({}, description="Named concept sets the edits refer to.")
    output: OutputSpec = Field(default_factory=OutputSpec)
    evaluate: list[EvaluateSpec] = Field([], description="Suites to evaluate once the edits are done.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @field_validator("concepts")
    @classmethod
    def _concept_names(cls, value: dict[str, ConceptSet]) -> dict[str, ConceptSet]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"concept set name {name!r} may only use letters, digits, _ . -")
        return value

    def flat_edits(self) -> list[tuple[int, Any]]:
        """Every single edit with its position in ``edits`` (group members share their group's)."""
        out: list[tuple[int, Any]] = []
        for index, item in enumerate(self.edits):  # type: ignore[attr-defined]
            members = item.edits if isinstance(item, GroupBase) else [item]
            out.extend((index, member) for member in members)
        return out


def _edit_model(cls: type[EditMethod]) -> type[EditBase]:
    fields: dict[str, Any] = {
        "method": (Literal[cls.name], Field(description=cls.summary)),  # type: ignore[valid-type]
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


def _params_field(cls: type[EditMethod]) -> Any:
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
    model = create_model(training.__name__, __base__=training, __module__=training.__module__, **restored)
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

    def __init__(self, methods: Mapping[str, type[EditMethod]]) -> None:
        self.methods = dict(methods)
        self.edit_models = {name: _edit_model(cls) for name, cls in sorted(self.methods.items())}
        training = {n: m for n, m in self.edit_models.items() if self.methods[n].kind == "training"}
        member: Any = _union(training) if training else None
        if member is not None:
            group_model = create_model(
                "TrainingGroup",
                __base__=GroupBase,
                edits=(list[member], Field(min_length=2, description="Training edits trained together.")),
            )
            group_model.model_rebuild()
        else:
            group_model = None
        self.group_model = group_model
        tagged = dict(self.edit_models)
        if group_model is not None:
            tagged["group"] = group_model
        self.tag_models: dict[str, type[BaseModel]] = tagged
        edit_union = _union(tagged) if tagged else Annotated[Any, BeforeValidator(_no_methods)]
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
