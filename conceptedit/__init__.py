"""conceptedit: erase concepts from text-to-image diffusion models, by recipe.

The curated public API. Users run recipes with :func:`apply` and reload results with
:func:`load`; plugin authors subclass :class:`EditMethod` and register it with
:data:`hookimpl`. Everything else is internal and may change.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from conceptedit.api.adversary import AdversarialPrompt, Adversary
from conceptedit.api.backbone import BackboneAdapter, CrossAttentionLayer, PredictionType
from conceptedit.api.concepts import ConceptSource, ConceptSourceOptions
from conceptedit.api.context import EditContext, RunContext
from conceptedit.api.edits import Guard, KVEdit, PromptEncoding, PromptPair
from conceptedit.api.evaluator import EvaluatedModel, Evaluator, Sample
from conceptedit.api.export import Exporter, ExportOptions, ExportReport, ExportSource
from conceptedit.api.hooks import hookimpl
from conceptedit.api.method import EditMethod
from conceptedit.api.params import MethodParams, TrainingConfig
from conceptedit.api.paths import PathText
from conceptedit.api.recipe import ConceptRef
from conceptedit.api.results import EditOutcome, Example, RunResult, SuiteResult
from conceptedit.api.suite import AttackSettings, PromptSuite, SuiteOptions, SuitePrompt
from conceptedit.engine.guards import installed_guards, suspend_guards
from conceptedit.engine.reload import load, load_guards, read_manifest
from conceptedit.errors import (
    AttackError,
    BackboneError,
    ConceptEditError,
    EditError,
    ExportError,
    ModelLoadError,
    PluginError,
    RecipeError,
    RunDirError,
    SingularSystemError,
    TrainingError,
    UnknownMethodError,
    UnknownSuiteError,
)
from conceptedit.export_run import ExportResult, export, export_formats
from conceptedit.models.loading import load_model
from conceptedit.recipe.loader import load_recipe
from conceptedit.run import apply

try:
    __version__ = version("conceptedit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AdversarialPrompt",
    "Adversary",
    "AttackError",
    "AttackSettings",
    "BackboneAdapter",
    "BackboneError",
    "ConceptEditError",
    "ConceptRef",
    "ConceptSource",
    "ConceptSourceOptions",
    "CrossAttentionLayer",
    "EditContext",
    "EditError",
    "EditMethod",
    "EditOutcome",
    "EvaluatedModel",
    "Evaluator",
    "Example",
    "ExportError",
    "ExportOptions",
    "ExportReport",
    "ExportResult",
    "ExportSource",
    "Exporter",
    "Guard",
    "KVEdit",
    "MethodParams",
    "ModelLoadError",
    "PathText",
    "PluginError",
    "PredictionType",
    "PromptEncoding",
    "PromptPair",
    "PromptSuite",
    "RecipeError",
    "RunContext",
    "RunDirError",
    "RunResult",
    "Sample",
    "SingularSystemError",
    "SuiteOptions",
    "SuitePrompt",
    "SuiteResult",
    "TrainingConfig",
    "TrainingError",
    "UnknownMethodError",
    "UnknownSuiteError",
    "__version__",
    "apply",
    "export",
    "export_formats",
    "hookimpl",
    "installed_guards",
    "load",
    "load_guards",
    "load_model",
    "load_recipe",
    "read_manifest",
    "suspend_guards",
]
