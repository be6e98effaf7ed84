"""conceptedit: erase concepts from text-to-image diffusion models, by recipe.

The curated public API. Users run recipes with :func:`apply` and reload results with
:func:`load`; plugin authors subclass :class:`EditMethod` and register it with
:data:`hookimpl`. Everything else is internal and may change.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from conceptedit.engine.context import EditContext, RunContext
from conceptedit.engine.encoding import PromptEncoding
from conceptedit.engine.guards import Guard, installed_guards, suspend_guards
from conceptedit.engine.kv_solver import KVEdit
from conceptedit.engine.reload import load, read_manifest
from conceptedit.engine.runner import apply
from conceptedit.errors import (
    BackboneError,
    ConceptEditError,
    EditError,
    ModelLoadError,
    PluginError,
    RecipeError,
    RunDirError,
    SingularSystemError,
    TrainingError,
    UnknownMethodError,
    UnknownSuiteError,
)
from conceptedit.hookspecs import hookimpl
from conceptedit.methods import EditMethod, MethodParams, TrainingConfig
from conceptedit.models.backbone import BackboneAdapter
from conceptedit.models.loading import load_model
from conceptedit.recipe.concepts import PromptPair
from conceptedit.recipe.loader import load_recipe
from conceptedit.recipe.schema import ConceptRef, PathText
from conceptedit.results import EditOutcome, RunResult

try:
    __version__ = version("conceptedit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BackboneAdapter",
    "BackboneError",
    "ConceptEditError",
    "ConceptRef",
    "EditContext",
    "EditError",
    "EditMethod",
    "EditOutcome",
    "Guard",
    "KVEdit",
    "MethodParams",
    "ModelLoadError",
    "PathText",
    "PluginError",
    "PromptEncoding",
    "PromptPair",
    "RecipeError",
    "RunContext",
    "RunDirError",
    "RunResult",
    "SingularSystemError",
    "TrainingConfig",
    "TrainingError",
    "UnknownMethodError",
    "UnknownSuiteError",
    "__version__",
    "apply",
    "hookimpl",
    "installed_guards",
    "load",
    "load_model",
    "load_recipe",
    "read_manifest",
    "suspend_guards",
]
