"""Building blocks for method plugins: the engine's shared maths and data sources.

Built-in methods are written with these and with the classes in :mod:`conceptedit`, nothing
else, so a third-party method has every tool a built-in has. Grouped by hook point:

* prompt encoding: token-row choices (:func:`select_rows`, :func:`aligned_rows`, ...);
* attention edit: the erase-toward-guide problem (:func:`erase_edit`) and the parameters of a
  method built on it (:class:`ErasureParams`, whose ``erase_edit`` makes that edit), the linear maps
  an edit solves on (:func:`text_maps`: every layer's ``to_k``/``to_v``, FLUX's ``context_embedder``,
  or the maps of the pooled vector), closed-form adversarial inputs (:func:`matching_inputs`), the
  preservation prior (:func:`embedding_prior`)
  and caption files (:func:`read_prompts`); for null-space edits (``KVEdit.projector``), the
  projector onto a kept set's low-energy directions (:func:`null_space_projector` of a
  :func:`second_moment`), k-means representatives of invariant rows (:func:`kmeans_centers`),
  the solver's closed form itself (:func:`null_space_delta`) and the one map ``W' = W M`` of an
  unconstrained edit (:func:`edit_map`, e.g. to rank inputs by how much an erasure moves them);
* trajectory loss: cached or fresh DDIM latents (:func:`sample_planned`, :func:`partial_ddim`) and
  frozen-model targets stored with them (:class:`FrozenTarget`),
  training plans and timestep samplers, named parameter sets, seeds; the forward process
  (:func:`add_noise`) and the true target in the model's prediction type (:func:`training_target`:
  ε, v on SD-2.x 768, the flow velocity on FLUX; :func:`output_from_noise` for latents known by ``x_t``;
  :func:`output_per_noise` to read output differences in ε units); ESD's negative-guidance
  latents and target for methods built on ESD (:class:`NegativeGuidance`); APG's normalised
  guidance and STEREO's compositional sum of it, for training targets (:func:`normalized_guidance`,
  :func:`normalized_update`, :func:`compositional_guidance`);
* inference time: the denoising state a guard reads (:func:`denoising_state`);
* outside a run: the backbone adapters (:class:`StableDiffusionAdapter`, SDXL's
  :class:`StableDiffusionXLAdapter`, FLUX's :class:`FluxAdapter`), to encode prompts or call the
  denoiser of a pipeline directly (tests, evaluators);
* concept sources: today's (concept × template) expansion (:func:`template_pairs`) and the shapes
  world's caption grammar by parts (:func:`shapes_caption`, :class:`ShapesContext`,
  :func:`sample_shapes_context`, :func:`mentions_phrase`), with the phrasings a recipe may name
  (:data:`SHAPES_ERASE_NAMES`) and those held out for evaluation (:data:`SHAPES_IMPLICIT_EVAL`);
* evaluation: suite metrics (:func:`attack_metrics`, :func:`change_metrics`), rates with Wilson
  intervals (:class:`Rate`, :func:`wilson_interval`), label vocabularies (:data:`NUDENET_EXPOSED`),
  the shapes testbed's prompts and judge (:func:`judge_shapes_image`, strict mode, :func:`hue_drift`)
  and the benchmark's held-out splits with their overlap check (:func:`shapes_benchmark_splits`);
* evaluation data: published prompt files by source (:data:`prompt_sources`), checked local
  copies or cached downloads (:func:`local_copy`) and their rows (:func:`read_rows`); FID from
  two feature sets (:func:`fid_from_features`); prompt cleaning as the tokenizer does it
  (:func:`clean_prompt`).
"""

from __future__ import annotations

from conceptedit.api.evaluator import EXTRA_IMAGE
from conceptedit.api.suite import ATTACK_DIRECTIONS
from conceptedit.attacks import (
    ADVERSARIES,
    ConceptInversion,
    EmbeddingPGD,
    RingABell,
    SoftPromptPGD,
    adversarial_slots,
    concept_vector,
    denoising_objective,
    embedding_target_objective,
    encode_with_rows,
    make_adversary,
    placeholder_slots,
    prompt_text,
    ring_a_bell_target,
)
from conceptedit.data import sources as prompt_sources
from conceptedit.data.labels import NUDENET_EXPOSED
from conceptedit.data.prompt_files import PromptFileError, local_copy, read_prompts, read_rows, resolve_prompt_file
from conceptedit.data.sources import PromptSource
from conceptedit.engine.context import default_cache_dir, derive_seed
from conceptedit.engine.edits import text_maps
from conceptedit.engine.erase import ErasureParams, erase_edit
from conceptedit.engine.guards import DenoisingState, denoising_state
from conceptedit.engine.guidance import (
    MomentumBuffer,
    compositional_guidance,
    normalized_guidance,
    normalized_update,
)
from conceptedit.engine.guidance import project as project_guidance
from conceptedit.engine.kv_solver import edit_map, matching_inputs, null_space_delta
from conceptedit.engine.negative_guidance import (
    ESD_PARAMETER_SETS,
    EsdSample,
    EsdUnetParams,
    NegativeGuidance,
    NegativeGuidanceParams,
)
from conceptedit.engine.priors import embedding_prior
from conceptedit.engine.rows import RowSelection, aligned_rows, encoding_length, select_rows
from conceptedit.engine.schedules import (
    DrawCounter,
    alphas_cumprod,
    compvis_latent_steps,
    draw_pairs,
    legacy_compvis_timesteps,
    uniform_timesteps,
)
from conceptedit.engine.selectors import select_parameter_set, select_parameters
from conceptedit.engine.subspaces import ThresholdRule, kmeans_centers, null_space_projector, second_moment
from conceptedit.engine.trajectories import (
    FrozenTarget,
    PlannedLatents,
    ddim_timesteps,
    partial_ddim,
    sample_planned,
    seeded_noise,
)
from conceptedit.evaluation.metrics import attack_metrics, change_metrics, fid_from_features
from conceptedit.evaluation.stats import Rate, wilson_interval
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.flux import FluxAdapter
from conceptedit.models.prediction import (
    add_noise,
    output_from_noise,
    output_per_noise,
    prediction_type,
    training_target,
)
from conceptedit.models.sdxl import StableDiffusionXLAdapter
from conceptedit.models.tokenizer import clean_prompt
from conceptedit.recipe.concepts import template_pairs
from conceptedit.shapes.contexts import CONTEXT_WORDS as SHAPES_CONTEXT_WORDS
from conceptedit.shapes.contexts import Context as ShapesContext
from conceptedit.shapes.contexts import caption as shapes_caption
from conceptedit.shapes.contexts import mentions as mentions_phrase
from conceptedit.shapes.contexts import mentions_any as mentions_any_phrase
from conceptedit.shapes.contexts import sample_context as sample_shapes_context
from conceptedit.shapes.erasure import anchor_reached, hue_drift, row_shows, row_verdict
from conceptedit.shapes.erasure import prompt_sets as shapes_prompt_sets
from conceptedit.shapes.judge import STRICT_HUE_RADIUS
from conceptedit.shapes.judge import judge as judge_shapes_image
from conceptedit.shapes.splits import benchmark_splits as shapes_benchmark_splits
from conceptedit.shapes.splits import overlap_problems as shapes_overlap_problems
from conceptedit.shapes.world import COLOUR_NAMES, HUED_COLOUR_NAMES, SHAPE_NAMES, explicit_prompts, implicit_prompts
from conceptedit.shapes.world import CONCEPTS as SHAPES_CONCEPTS
from conceptedit.shapes.world import ERASE_NAMES as SHAPES_ERASE_NAMES
from conceptedit.shapes.world import IMPLICIT_EVAL as SHAPES_IMPLICIT_EVAL
from conceptedit.shapes.world import Prompt as ShapesPrompt

__all__ = [
    "ADVERSARIES",
    "ATTACK_DIRECTIONS",
    "COLOUR_NAMES",
    "ESD_PARAMETER_SETS",
    "EXTRA_IMAGE",
    "HUED_COLOUR_NAMES",
    "NUDENET_EXPOSED",
    "SHAPES_CONCEPTS",
    "SHAPES_CONTEXT_WORDS",
    "SHAPES_ERASE_NAMES",
    "SHAPES_IMPLICIT_EVAL",
    "SHAPE_NAMES",
    "STRICT_HUE_RADIUS",
    "ConceptInversion",
    "DenoisingState",
    "DrawCounter",
    "EmbeddingPGD",
    "ErasureParams",
    "EsdSample",
    "EsdUnetParams",
    "FluxAdapter",
    "FrozenTarget",
    "MomentumBuffer",
    "NegativeGuidance",
    "NegativeGuidanceParams",
    "PlannedLatents",
    "PromptFileError",
    "PromptSource",
    "Rate",
    "RingABell",
    "RowSelection",
    "ShapesContext",
    "ShapesPrompt",
    "SoftPromptPGD",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "ThresholdRule",
    "add_noise",
    "adversarial_slots",
    "aligned_rows",
    "alphas_cumprod",
    "anchor_reached",
    "attack_metrics",
    "change_metrics",
    "clean_prompt",
    "compositional_guidance",
    "compvis_latent_steps",
    "concept_vector",
    "ddim_timesteps",
    "default_cache_dir",
    "denoising_objective",
    "denoising_state",
    "derive_seed",
    "draw_pairs",
    "edit_map",
    "embedding_prior",
    "embedding_target_objective",
    "encode_with_rows",
    "encoding_length",
    "erase_edit",
    "explicit_prompts",
    "fid_from_features",
    "hue_drift",
    "implicit_prompts",
    "judge_shapes_image",
    "kmeans_centers",
    "legacy_compvis_timesteps",
    "local_copy",
    "make_adversary",
    "matching_inputs",
    "mentions_any_phrase",
    "mentions_phrase",
    "normalized_guidance",
    "normalized_update",
    "null_space_delta",
    "null_space_projector",
    "output_from_noise",
    "output_per_noise",
    "partial_ddim",
    "placeholder_slots",
    "prediction_type",
    "project_guidance",
    "prompt_sources",
    "prompt_text",
    "read_prompts",
    "read_rows",
    "resolve_prompt_file",
    "ring_a_bell_target",
    "row_shows",
    "row_verdict",
    "sample_planned",
    "sample_shapes_context",
    "second_moment",
    "seeded_noise",
    "select_parameter_set",
    "select_parameters",
    "select_rows",
    "shapes_benchmark_splits",
    "shapes_caption",
    "shapes_overlap_problems",
    "shapes_prompt_sets",
    "template_pairs",
    "text_maps",
    "training_target",
    "uniform_timesteps",
    "wilson_interval",
]
