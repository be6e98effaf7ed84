"""AdvUnlearn (``advunlearn``): erase a concept from the text encoder by adversarial training.

Zhang et al., "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models", NeurIPS 2024 (arXiv 2405.15234). Re-implemented from the paper and its
reference code, OPTML-Group/AdvUnlearn (CC-BY-4.0): nothing here is copied from it.

Only the text encoder φ trains; the UNet stays frozen and is what the loss is computed through.
On a latent ``x_t`` from a partial DDIM run (CFG) of the frozen original on the concept ``c``:

    attack   a* ≈ argmin_a ‖ε(x_t, t, E_φ([a; c])) − ε*(x_t, t, c)‖²       k token embeddings a, prefix
    erase    L_e = ‖ε(x_t, t, E_φ([a*; c])) − (ε*(x_t, t, ∅) − η (ε*(x_t, t, c) − ε*(x_t, t, ∅)))‖²
    retain   L_r = ‖ε(x_r, t, E_φ(r)) − ε*(x_r, t, E_0(r))‖²                r: a batch of retain prompts
    loss     L_e + γ L_r

ε* is the frozen original (its UNet and its text encoder E_0, ``ctx.reference_weights``), the
attack is the shared soft-prompt adversary (``ctx.adversary("soft_prompt")``, the object the
attack suites evaluate with) minimising the distance to the original's concept prediction, and
for the first ``warmup_steps`` steps the erase term uses the plain concept prompt (no attack).
``fast_at`` (the default) attacks with one signed step from random vocabulary tokens every step;
``pgd`` refreshes the prompt every ``attack_every`` steps with ``attack_steps`` Adam steps.
Because the UNet never changes and every latent is drawn with the original's conditioning, the
latents are those of the frozen original: sampled per draw, or once into a cached pool
(``trajectories``). ``docs/methods/advunlearn.md`` has the defaults, their source in the
reference code, and where this departs from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from torch import Tensor

from conceptedit import (
    AdversarialPrompt,
    EditContext,
    EditError,
    EditMethod,
    MethodParams,
    PathText,
    TrainingConfig,
    hookimpl,
)
from conceptedit.toolkit import (
    DrawCounter,
    PlannedLatents,
    compvis_latent_steps,
    ddim_timesteps,
    draw_pairs,
    explicit_prompts,
    legacy_compvis_timesteps,
    mentions_phrase,
    partial_ddim,
    read_prompts,
    resolve_prompt_file,
    sample_planned,
    seeded_noise,
)

#: Attack steps per refresh when ``attack_steps`` is not set.
DEFAULT_ATTACK_STEPS = {"fast_at": 1, "pgd": 30}
_LAYERS = re.compile(r"(?:all|(first|last):([1-9][0-9]*))")
_ENCODER_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)$")


class AdvUnlearnParams(MethodParams):
    concept: str = Field(description="Prompt of the concept to erase, e.g. 'nudity' (the reference trains the word).")
    layers: str | list[NonNegativeInt] = Field(
        "all",
        description="Text-encoder layers that train: all, first:N, last:N, or a list of layer indices (the "
        "reference's text_encoder_full, text_encoder_layer01 = first:2, text_encoder_layer0_11 = [0, 11]). "
        "Token and position embeddings never train.",
    )
    component: Literal["all", "attn", "ffn"] = Field(
        "all", description="Part of each chosen layer that trains: all, attn (self_attn only) or ffn (mlp only)."
    )
    final_layer_norm: bool | None = Field(
        None,
        description="Train the final layer norm too; None = the reference's rule: only with layers: all and "
        "component: all.",
    )
    eta: NonNegativeFloat = Field(1.0, description="Negative guidance η of the erase target (reference: 1.0).")
    sampling_guidance: NonNegativeFloat = Field(3.0, description="CFG scale of the partial DDIM runs making x_t.")
    sampling_steps: PositiveInt = Field(50, description="DDIM steps of a full run (reference: 50).")
    timestep_pairing: Literal["compvis", "exact"] = Field(
        "compvis",
        description="compvis = the reference's (ESD's CompVis) pairing: t ~ U[1000k/S, 1000(k+1)/S) on the latent "
        "its sampler leaves at that level; exact = the latent after k DDIM steps at its own timestep.",
    )
    trajectories: PositiveInt | None = Field(
        None,
        description="Distinct starting noises per prompt, sampled once and cached (None: a fresh noise for every "
        "draw, as the reference; no cache).",
    )
    retain: list[str] | None = Field(
        None,
        description="Retain prompts (None and no retain_file: the shapes world's 'a <colour> <shape>' prompts "
        "that do not mention the concept). The reference uses 243 COCO-object prompts.",
    )
    retain_file: PathText | None = Field(
        None,
        description="Retain prompts from a caption file (text, one per line, or CSV `prompt` column; relative to "
        "the recipe) or a known prompt source such as coco-30k; replaces retain.",
    )
    retain_limit: PositiveInt | None = Field(None, description="With retain_file: read only its first N prompts.")
    retain_batch: PositiveInt = Field(5, description="Retain prompts per draw (reference: 5).")
    retain_weight: NonNegativeFloat = Field(
        0.3, description="Weight γ of the retain term (reference README: 0.3; 0 drops the term)."
    )
    attack_method: Literal["fast_at", "pgd"] = Field(
        "fast_at",
        description="fast_at = Adam on the gradient's sign, one step by default (cheap); pgd = the reference's "
        "full attack: Adam on the gradient, attack_steps steps.",
    )
    attack_tokens: PositiveInt = Field(
        1, description="Adversarial token embeddings prefixed to the concept (reference: 1)."
    )
    attack_steps: PositiveInt | None = Field(
        None, description="Attack steps per refresh (None: 1 for fast_at, 30 for pgd, the reference's attack_step)."
    )
    attack_lr: PositiveFloat = Field(1e-3, description="Attack step size / Adam learning rate (reference: 1e-3).")
    attack_init: Literal["random", "latest"] = Field(
        "random",
        description="Start of each attack: random vocabulary tokens (reference README) or the previous adversarial "
        "embeddings (latest; the first attack starts at random tokens).",
    )
    attack_every: PositiveInt = Field(
        1, description="Refresh the adversarial prompt every N steps (reference: adv_prompt_update_step, 1)."
    )
    warmup_steps: NonNegativeInt | None = Field(
        None,
        description="Steps on the plain concept prompt before attacks start (None: a fifth of the training steps, "
        "the reference's 200 of 1000).",
    )
    reference: Literal["base", "edit_start"] = Field(
        "base",
        description="Frozen model ε*, E_0 of the targets and latents: base = before the run, edit_start = before "
        "this edit.",
    )

    @field_validator("concept")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name the concept to erase, e.g. concept: nudity")
        return value

    @field_validator("layers")
    @classmethod
    def _layer_choice(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, str) and not _LAYERS.fullmatch(value):
            raise ValueError(f"{value!r}: use all, first:N, last:N (N >= 1) or a list of layer indices")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list of layers must name at least one layer, each once")
        return value

    @field_validator("retain")
    @classmethod
    def _prompts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not x.strip() for x in value)):
            raise ValueError("retain needs at least one prompt and no blank ones (or leave it out for the default)")
        return value

    @model_validator(mode="after")
    def _one_retain_source(self) -> AdvUnlearnParams:
        if self.retain is not None and self.retain_file is not None:
            raise ValueError("give retain (a list) or retain_file (a caption file), not both")
        if self.retain_limit is not None and self.retain_file is None:
            raise ValueError("retain_limit applies to retain_file only")
        return self


class AdvUnlearnTraining(TrainingConfig):
    steps: int = Field(1000, gt=0, description="Optimiser steps (reference: 1000 iterations).")
    lr: float = Field(1e-5, gt=0, description="Learning rate (reference: 1e-5).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adam", description="Optimiser (reference: Adam).")


def text_encoder_parameters(
    names: Iterable[str], layers: str | Sequence[int], component: str, final_layer_norm: bool | None
) -> list[str]:
    """The ``text_encoder.*`` names among ``names`` that the layer choice trains (see the Params)."""
    by_layer: dict[int, list[tuple[str, str]]] = {}
    final: list[str] = []
    for name in names:
        if not name.startswith("text_encoder."):
            continue
        match = _ENCODER_LAYER.search(name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append((name, match.group(2)))
        elif ".final_layer_norm." in name:
            final.append(name)
    count = max(by_layer, default=-1) + 1
    if count == 0:
        raise EditError("the text encoder has no parameters named like encoder.layers.N.*")
    chosen = _chosen_layers(layers, count)
    parts = {"all": "", "attn": "self_attn.", "ffn": "mlp."}[component]
    picked = [n for i in chosen for n, rest in by_layer.get(i, []) if rest.startswith(parts)]
    if final_layer_norm or (final_layer_norm is None and layers == "all" and component == "all"):
        picked += final
    return picked


def _chosen_layers(layers: str | Sequence[int], count: int) -> list[int]:
    if not isinstance(layers, str):
        wrong = [i for i in layers if i >= count]
        if wrong:
            raise EditError(f"layers {wrong}: the text encoder has {count} layers (0..{count - 1})")
        return sorted(layers)
    if layers == "all":
        return list(range(count))
    side, n = layers.split(":")
    if int(n) > count:
        raise EditError(f"layers {layers}: the text encoder has only {count} layers")
    return list(range(int(n))) if side == "first" else list(range(count - int(n), count))


def default_retain(concept: str) -> list[str]:
    """The shapes world's explicit prompts (``a <colour> <shape>``) that do not mention ``concept``."""
    return [x.text for x in explicit_prompts() if not mentions_phrase(x.text, concept)]


def retain_batches(prompts: int, draws: int, batch: int, generator: torch.Generator) -> list[list[int]]:
    """Retain prompt indices per draw: without replacement, a new shuffled pass when too few are left."""
    out: list[list[int]] = []
    left: list[int] = []
    take = min(batch, prompts)
    for _ in range(draws):
        if len(left) < take:
            left = torch.randperm(prompts, generator=generator).tolist()
        out.append(left[:take])
        left = left[take:]
    return out


@dataclass
class Trajectories:
    """Where a plan's latents come from: rows of (trajectory, DDIM steps from noise), one prompt and
    one noise seed per trajectory, and the cached latents when the plan reads a pool."""

    plan: Tensor
    prompts: list[str]
    seeds: list[int]
    cached: PlannedLatents | None = None


class AdvUnlearn(EditMethod[AdvUnlearnParams]):
    """ESD's objective on the text encoder, against the shared soft-prompt adversary, plus a retain term."""

    name = "advunlearn"
    summary = "AdvUnlearn: adversarial ESD training of the text encoder, with a retain term (text-encoder delta)"
    kind = "training"
    paper = (
        "Zhang et al., Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion "
        "Models, NeurIPS 2024, arXiv:2405.15234 (reference code OPTML-Group/AdvUnlearn, CC-BY-4.0)"
    )
    Params = AdvUnlearnParams
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "sdxl": (
            "it trains the one text encoder of SD-1.x/2.x against soft-prompt attacks on its token "
            "embeddings; SDXL has two text encoders and a pooled embedding the trained rows would "
            "have to carry"
        ),
        "flux": (
            "it trains the one text encoder of SD-1.x/2.x against soft-prompt attacks on its token embeddings; "
            "FLUX's rows come from T5 and its pooled vector from CLIP, two encoders with different token tables"
        ),
    }
    Training = AdvUnlearnTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        p = self.params
        names = [name for name, _ in ctx.adapter.named_parameters()]
        return text_encoder_parameters(names, p.layers, p.component, p.final_layer_norm)

    # ------------------------------------------------------------------ plan, made once

    def prepare_training(self, ctx: EditContext) -> None:
        p = self.params
        if ctx.process_index is not None:
            raise EditError(
                f"{ctx.label}: advunlearn trains the text encoder outside the data-parallel wrapper, so its "
                "gradients would not be averaged across processes; run it in one process"
            )
        steps, accum = ctx.training.steps, ctx.training.grad_accum
        self.warmup = p.warmup_steps if p.warmup_steps is not None else steps // 5
        if self.warmup > steps:
            raise EditError(f"{ctx.label}: warmup_steps {self.warmup} is longer than the run ({steps} steps)")
        self.attack_steps = p.attack_steps or DEFAULT_ATTACK_STEPS[p.attack_method]
        due = range(self.warmup + 1, steps + 1, p.attack_every)
        self.refreshes = {s: r for r, s in enumerate(due)}  # step -> attack round
        self.draws = steps * accum
        self._draw = DrawCounter(accum)
        self.adversarial: AdversarialPrompt | None = None
        self.attack_losses: list[list[float]] = []
        with torch.no_grad(), ctx.reference_weights(p.reference):
            self.frozen = ctx.encode_prompts([p.concept, ""]).hidden  # E_0(c), E_0(∅)
        self.concept_ids = ctx.adapter.tokenize([p.concept])
        self._shape = ctx.adapter.latent_shape(1)[1:]
        self._plan_concept(ctx)
        self._plan_retain(ctx)

    def _plan_concept(self, ctx: EditContext) -> None:
        """(trajectory, DDIM steps from noise) and the UNet timestep of every erase draw, then every attack step."""
        p = self.params
        total = self.draws + len(self.refreshes) * self.attack_steps
        plan = draw_pairs(ctx.generator, total, p.trajectories or 1, p.sampling_steps)
        if p.trajectories is None:
            plan[:, 0] = torch.arange(total)
        k = plan[:, 1].clone()
        if p.timestep_pairing == "compvis":
            train_steps = int(ctx.pipeline.scheduler.config.num_train_timesteps)
            self.timesteps = legacy_compvis_timesteps(k, p.sampling_steps, ctx.generator, train_steps)
            plan[:, 1] = compvis_latent_steps(k, p.sampling_steps)
        else:
            self.timesteps = ddim_timesteps(ctx, p.sampling_steps)[k]
        seeds = [ctx.seed_for("advunlearn", "noise", j) for j in range(int(plan[:, 0].max()) + 1)]
        self.concept = Trajectories(plan, [p.concept] * len(seeds), seeds)
        self.concept.cached = self._cache(ctx, self.concept, "concept")

    def _plan_retain(self, ctx: EditContext) -> None:
        """Retain prompts of every draw, each on a trajectory of its own (or of the pool), at its draw's level."""
        p = self.params
        self.retain_rows: list[list[int]] = []
        if p.retain_weight == 0:
            return
        self.retain_prompts = self._retain_prompts(ctx)
        self.retain_rows = retain_batches(len(self.retain_prompts), self.draws, p.retain_batch, ctx.generator)
        width = len(self.retain_rows[0])
        if p.trajectories is None:
            ids = torch.arange(self.draws * width).reshape(self.draws, width)
            prompts = [self.retain_prompts[i] for row in self.retain_rows for i in row]
        else:
            slots = torch.randint(0, p.trajectories, (self.draws, width), generator=ctx.generator)
            ids = torch.tensor(self.retain_rows) * p.trajectories + slots
            prompts = [x for x in self.retain_prompts for _ in range(p.trajectories)]
        levels = self.concept.plan[: self.draws, 1:2].expand(-1, width)
        seeds = [ctx.seed_for("advunlearn", "retain", j) for j in range(len(prompts))]
        self.retain = Trajectories(torch.stack([ids, levels], dim=-1), prompts, seeds)
        self.retain.cached = self._cache(ctx, self.retain, "retain")

    def _retain_prompts(self, ctx: EditContext) -> list[str]:
        p = self.params
        if p.retain_file is not None:
            path, column = resolve_prompt_file(p.retain_file, ctx.cache_dir, ctx.base_dir)
            return read_prompts(path, column, p.retain_limit)
        prompts = list(p.retain) if p.retain is not None else default_retain(p.concept)
        if not prompts:
            raise EditError(f"{ctx.label}: every default retain prompt mentions {p.concept!r}; give retain prompts")
        return prompts

    def _cache(self, ctx: EditContext, source: Trajectories, label: str) -> PlannedLatents | None:
        p = self.params
        if p.trajectories is None:
            return None  # a fresh noise per draw: sampled when read, nothing kept
        return sample_planned(
            ctx,
            source.plan,
            source.prompts,
            source.seeds,
            guidance=p.sampling_guidance,
            steps=p.sampling_steps,
            weights=p.reference,
            label=label,
        )

    # ------------------------------------------------------------------ frozen quantities

    def latents(self, ctx: EditContext, source: Trajectories, row: int) -> Tensor:
        """The frozen original's latents of plan row ``row`` (its pairs share one DDIM level)."""
        if source.cached is not None:
            return source.cached.take(row, ctx.device)[0]
        p = self.params
        pairs = source.plan[row].reshape(-1, 2).tolist()
        (stop,) = {k for _, k in pairs}
        with torch.no_grad(), ctx.reference_weights(p.reference):
            hidden = ctx.encode_prompts([*(source.prompts[j] for j, _ in pairs), ""]).hidden
            noise = seeded_noise(self._shape, [source.seeds[j] for j, _ in pairs]).to(ctx.device)
            x = partial_ddim(ctx, noise, hidden[:-1], hidden[-1:], p.sampling_guidance, p.sampling_steps, stop)
        return x.float()

    def concept_sample(self, ctx: EditContext, row: int) -> tuple[Tensor, Tensor]:
        """Latent ``[1, C, H, W]`` and UNet timestep ``[1]`` of concept plan row ``row``."""
        return self.latents(ctx, self.concept, row), self.timesteps[row : row + 1].to(ctx.device)

    def frozen_predictions(self, ctx: EditContext, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """ε*(x, t, c) and ε*(x, t, ∅) of the frozen original, without gradients."""
        with torch.no_grad(), ctx.reference_weights(self.params.reference):
            both = ctx.predict_noise(x.expand(2, -1, -1, -1), t.expand(2), self.frozen, frozen=True)
        e_c, e_0 = both.float().chunk(2)
        return e_c, e_0

    def retain_sample(self, ctx: EditContext, draw: int, t: Tensor) -> tuple[list[str], Tensor, Tensor]:
        """A draw's retain prompts, their latents and the frozen original's predictions for them."""
        prompts = [self.retain_prompts[i] for i in self.retain_rows[draw]]
        x = self.latents(ctx, self.retain, draw)
        tt = t.expand(len(prompts))
        with torch.no_grad(), ctx.reference_weights(self.params.reference):
            goal = ctx.predict_noise(x, tt, ctx.encode_prompts(prompts).hidden, frozen=True).float()
        return prompts, x, goal

    # ------------------------------------------------------------------ the attack

    def attack(self, ctx: EditContext, round_: int) -> AdversarialPrompt:
        """The soft-prompt adversary against the current text encoder: prefix tokens that bring the
        original's concept prediction back, one fresh latent per attack step."""
        p = self.params
        first = self.draws + round_ * self.attack_steps
        goals = []
        for row in range(first, first + self.attack_steps):
            x, t = self.concept_sample(ctx, row)
            goals.append((x, t, self.frozen_predictions(ctx, x, t)[0]))
        pending = iter(goals)

        def objective(hidden: Tensor) -> Tensor:
            x, t, goal = next(pending)
            return F.mse_loss(ctx.predict_noise(x, t, hidden, frozen=True).float(), goal)

        start = None
        if p.attack_init == "latest" and self.adversarial is not None:
            start = self.adversarial.embeddings[0, list(self.adversarial.slots)]
        adversary = ctx.adversary(
            "soft_prompt",
            tokens=p.attack_tokens,
            position="prefix",
            radius=None,  # the reference bounds the adversarial embeddings by nothing
            steps=self.attack_steps,
            step_size=p.attack_lr,
            update="adam_sign" if p.attack_method == "fast_at" else "adam",
            start=start,
            seed=ctx.seed_for("advunlearn", "attack", round_),
        )
        found = adversary.attack(p.concept, objective)
        self.attack_losses.append(list(found.losses))
        return found

    def _round(self, step: int, first_micro: bool) -> int | None:
        """The attack round to run before this step's loss, if any: at each refresh step, and once
        at the first step of a run resumed between two refreshes (the prompt is not checkpointed)."""
        if step in self.refreshes:
            return self.refreshes[step] if first_micro else None
        if self.adversarial is not None or step <= self.warmup:
            return None
        return max(r for s, r in self.refreshes.items() if s <= step)

    # ------------------------------------------------------------------ the loss

    def encode(self, ctx: EditContext, ids: Tensor, embeddings: Tensor | None = None) -> Tensor:
        """The trained text encoder's output for token ids (and embeddings), with gradients."""
        if embeddings is None:
            table = ctx.adapter.token_embedding_table().detach()
            embeddings = table[ids.to(table.device)]
        return ctx.adapter.encode_token_embeddings(ids, embeddings.detach())

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        p = self.params
        draw = self._draw(step)
        x, t = self.concept_sample(ctx, draw)
        e_c, e_0 = self.frozen_predictions(ctx, x, t)
        retain = self.retain_sample(ctx, draw, t) if self.retain_rows else None
        round_ = self._round(step, draw % ctx.training.grad_accum == 0)
        if round_ is not None:
            self.adversarial = self.attack(ctx, round_)
        if step > self.warmup and self.adversarial is not None:
            hidden = self.encode(ctx, self.adversarial.ids, self.adversarial.embeddings)
        else:
            hidden = self.encode(ctx, self.concept_ids)
        pred = ctx.predict_noise(x, t, hidden).float()
        terms = {"erase": F.mse_loss(pred, e_0 - p.eta * (e_c - e_0))}
        if retain is not None:
            prompts, xr, goal = retain
            kept = ctx.predict_noise(xr, t.expand(len(prompts)), self.encode(ctx, ctx.adapter.tokenize(prompts)))
            terms["retain"] = p.retain_weight * F.mse_loss(kept.float(), goal)
        return terms


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(AdvUnlearn)
