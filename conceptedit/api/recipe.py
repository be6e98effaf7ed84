"""The recipe as static pydantic models: what every recipe has, whatever methods are installed.

``extra="forbid"`` everywhere: a misspelt key is an error. The ``edits`` list is typed here
only as "edits"; :mod:`conceptedit.recipe.schema` builds the union of the installed methods'
edit models from these bases, so the schema, validation and ``conceptedit schema`` match
what is installed.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from conceptedit.api.method import EditMethod
from conceptedit.api.params import TrainingConfig
from conceptedit.api.paths import PathText

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


class GenerateSpec(BaseModel):
    """A concept set made by a concept source: ``{source: NAME, **options}``.

    Only ``source`` is checked here; the other keys are the source's options, which the
    recipe loader validates against the registered source's ``Options`` (and replaces by the
    resolved options, defaults included, so the resolved recipe reproduces the pairs).
    """

    model_config = ConfigDict(extra="allow")

    source: str = Field(description="Concept source name (`conceptedit plugins` lists who provides which).")

    @property
    def options(self) -> dict[str, Any]:
        """Every key but ``source``: the source's options as written."""
        return dict(self.model_extra or {})


class ConceptSet(Strict):
    """Prompts to edit: concepts (optionally paired with targets) expanded through templates.

    Give exactly one of ``pairs``, ``concepts``, ``file`` or ``generate``. A file holds a
    JSON/YAML list of strings or of ``[concept, target]`` pairs, or one concept per line
    (``.txt``). ``generate`` asks a concept source for the pairs; ``target`` and ``templates``
    do not apply to it (a source that uses them takes them as options), ``limit`` keeps the
    first N generated pairs.
    """

    pairs: list[tuple[str, str]] | None = Field(None, description="[concept, target] pairs.")
    concepts: list[str] | None = Field(None, description="Concepts; each maps to `target`.")
    file: PathText | None = Field(None, description="Path (relative to the recipe) of a concept file.")
    generate: GenerateSpec | None = Field(
        None, description="A concept source and its options: {source: NAME, ...}; the source makes the pairs."
    )
    target: str = Field("", description='Target for entries that give none ("" = unconditional).')
    templates: list[Annotated[str, AfterValidator(_one_slot)]] = Field(
        ["{}"], min_length=1, description="Prompt templates, each with one `{}`."
    )
    limit: PositiveInt | None = Field(
        None, description="Use only the first N entries of the list (of a generated set: its first N pairs)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ConceptSet:
        given = [name for name in ("pairs", "concepts", "file", "generate") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `pairs`, `concepts` or `file`, or a `generate:` block"
                + (f" (got {', '.join(given)})" if given else "")
            )
        for source in ("pairs", "concepts"):
            if getattr(self, source) == []:
                raise ValueError(f"`{source}` is empty")
        if self.generate is not None:  # the defaults pass, so a resolved recipe validates again
            for name, default in (("target", ""), ("templates", ["{}"])):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"`{name}` does not apply to a `generate:` set: the source makes whole prompt pairs; "
                        f"give it as an option of the source if it takes one (the `templates` source does)"
                    )
        return self


class OutputSpec(Strict):
    """Where and in which formats a run is written."""

    dir: PathText = Field(
        "runs/{recipe}-{time}",
        description="Run folder, relative to the working directory; {recipe} is the recipe file's stem, "
        "{time} the start time.",
    )
    formats: list[str] = Field(
        ["delta"],
        description="Formats to write (`conceptedit export --list RUN` names them): delta (edit.safetensors, the run "
        "folder itself, always), diffusers, lora, kohya, single-file, te-delta...; each but delta goes to "
        "<run>/exports/<format>/, as `conceptedit export` writes it.",
    )
    export_options: dict[str, dict[str, Any]] = Field(
        {}, description="Options per format, e.g. {lora: {rank: 16}} or {lora: {max_error: 0.001}}."
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

    method_cls: ClassVar[type[EditMethod[Any]]]

    name: str | None = Field(None, description="Label for logs and outputs (default: method name).")
    weight: PositiveFloat = Field(1.0, description="Weight of this edit's loss inside a training group.")

    @property
    def label(self) -> str:
        return self.name or self.method_cls.name

    def build(self) -> EditMethod[Any]:
        """The method object for this edit."""
        return self.method_cls(self.params)  # type: ignore[attr-defined]


class GroupBase(Strict):
    """Training methods trained together on the sum of their weighted losses."""

    group: str = Field(description="Label of the group.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The shared training loop.")
    #: Re-declared by the installed methods' schema as a list of their training edits (2 or more).
    edits: list[Any] = Field(min_length=2, description="Training edits trained together.")

    @property
    def label(self) -> str:
        return self.group


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
    #: Re-declared by the installed methods' schema (``conceptedit.recipe.schema``) as the union
    #: of their edit models and training groups; each item is an :class:`EditBase` or :class:`GroupBase`.
    edits: list[Any] = Field(min_length=1, description="Edits, applied in this order.")

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
        for index, item in enumerate(self.edits):
            members = item.edits if isinstance(item, GroupBase) else [item]
            out.extend((index, member) for member in members)
        return out
