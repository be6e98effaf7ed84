"""TRCE stage 2 (``trce_steer``): contrastive steering of early denoising predictions.

Chen et al., "TRCE", ICCV 2025 (arXiv 2503.07389). On latents from the original model's own
sampling runs on malicious prompts (early steps only, t ≥ 480 of 1000), the model being
trained is pushed toward the original model's *safe* guided prediction and away from its
*unsafe* one, with a hinge:

    f_safe   = ε(x,t,c_s) + g (ε(x,t,c_s) − ε(x,t,∅))        ε: the original model
    f_unsafe = ε(x,t,c_m) + g (ε(x,t,c_m) − ε(x,t,∅))
    L_erase  = mean over a ∈ {ε_θ(x,t,c_m), ε_θ(x,t,∅)} of max(0, MSE(a, f_safe) − MSE(a, f_unsafe) + margin)
    L        = L_erase + λ · MSE(ε_θ(x',t',∅), ε_stage1(x',t',∅))   x' from unconditional runs

Lean by construction: the original and stage-1 references are the one resident UNet with
the few tensors they differ in swapped in (``ctx.reference_weights``), not extra copies. With
``training.frozen_targets: cached`` (the default) they do not even run during training: the latents
come from a plan drawn up front and the references do not train, so ε(x,t,c_m), ε(x,t,∅) (by-products
of sampling the malicious runs), ε(x,t,c_s) and ε_stage1(x',t',∅) are computed once with the
trajectories and stored beside them (float16, :class:`~conceptedit.toolkit.FrozenTarget`); each step
runs only the trained model. ``recompute`` runs the references every step, as before. The loss is a
sum over the step's samples (a hinge per anchor, an MSE per regulariser latent), so it goes through
``ctx.separable_loss``: with ``training.micro_batch`` each sample is back-propagated as soon as its
share is computed, one forward and one backward per sample.

On a v-prediction model (SD-2.x 768) every ε above is the model's output, v: ``f_safe`` and
``f_unsafe`` weigh outputs at the same ``x`` with weights summing to one, so they are the v of the
ε-space targets, and each MSE is the ε-space one divided by ᾱ_t; the margin is in the output's units.

Differences from the reference code, on purpose (docs/methods/trce.md):
* gradients are zeroed every step; the reference never zeroes them, so each of its AdamW steps
  sees the sum of all earlier gradients (``training.zero_grad: false`` reproduces that, and it
  is the largest of these differences);
* every cached latent is paired with its own timestep; the reference feeds the latent *after*
  DDIM step k with t_k (one step noisier), and the regulariser a t drawn from [t_k, t_k + 20);
* trajectories, steps and regulariser latents are drawn uniformly with replacement from the
  seeded generator; the reference visits trajectories in order once per epoch and reuses the
  same regulariser files every epoch;
* the reference's constant 0.01 inside its regulariser sum is left out (it has no gradient);
* ``anchors: conditional`` (not the default) steers only the conditional prediction;
* ``preserve_captions`` (not the default) adds a second regulariser on the original model's own
  runs over captions without the concept: ``λ · MSE(ε_θ(x'',t'',c_k), ε_stage1(x'',t'',c_k))``.
  TRCE keeps only the unconditional prediction, which leaves every other concept's conditional
  prediction free to move with the erased one (on builtin:shapes, blue's neighbours lost 14% of
  their accuracy to stage 2 that way).
* ``adversarial`` (not the default) is robust TRCE: every ``every`` steps the shared adversary
  (soft-prompt PGD or concept inversion, ``ctx.adversary``) finds, for the drawn malicious prompt,
  the prompt with which the model being trained predicts at the drawn latent what the original
  predicted for the malicious one, ``min_h MSE(ε_θ(x,t,h), ε(x,t,c_m))``; the hinge then also
  steers ``ε_θ(x,t,h_adv)`` (term ``erase_adversarial``, times ``weight``). The attack needs the
  text encoder, so it stays loaded; a resumed run finds its adversarial prompts again on the
  weights it resumes from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor

from conceptedit import ConceptRef, EditContext, EditMethod, MethodParams, PathText, TrainingConfig, hookimpl
from conceptedit.toolkit import (
    DrawCounter,
    FrozenTarget,
    PlannedLatents,
    ddim_timesteps,
    draw_pairs,
    read_prompts,
    resolve_prompt_file,
    sample_planned,
    select_parameters,
)


class AdversarialSteer(MethodParams):
    """Robust TRCE stage 2: also steer the prediction under an adversarial prompt the shared adversary
    finds against the model being trained (``ctx.adversary``, the attack suites' implementation)."""

    attack: Literal["soft_prompt", "concept_inversion"] = Field(
        "soft_prompt",
        description="soft_prompt: PGD on `tokens` prefix token embeddings in an L∞ ball of `radius`; "
        "concept_inversion: `tokens` free token embeddings in the concept's place (CCE), from its embedding.",
    )
    tokens: PositiveInt = Field(5, description="Adversarial token embeddings (soft_prompt: 5; CCE uses 1).")
    steps: PositiveInt = Field(10, description="Attack steps per refresh.")
    radius: PositiveFloat = Field(0.05, description="soft_prompt: L∞ radius of the ball.")
    step_size: PositiveFloat = Field(
        0.005, description="soft_prompt: PGD step; concept_inversion: AdamW learning rate."
    )
    every: PositiveInt = Field(10, description="Refresh each pair's adversarial prompt every N steps.")
    weight: NonNegativeFloat = Field(1.0, description="Weight of the adversarial hinge next to the plain one.")


class TrceSteerParams(MethodParams):
    concepts: ConceptRef = Field(description="Concept set of [malicious, safe] pairs (see `prompts`).")
    prompt_template: str = Field("a photo of {}", description="Trajectory prompt for each concept and its safe twin.")
    prompts: Literal["template", "pairs"] = Field(
        "template",
        description="template (TRCE): each bare concept in prompt_template; pairs: each pair's own prompts as "
        "they are, so the trajectories cover the varied sentences of a generated concept set.",
    )
    trajectories_per_concept: PositiveInt = Field(5, description="Sampling runs per malicious concept.")
    trajectory_guidance: PositiveFloat = Field(3.0, description="CFG scale of the malicious sampling runs.")
    sampling_steps: PositiveInt = Field(50, description="DDIM (η=0) steps of a sampling run.")
    min_timestep: int = Field(480, ge=0, lt=1000, description="Early steps only: timesteps t ≥ this (of 1000).")
    unconditional_trajectories: PositiveInt = Field(2000, description="Unconditional runs for the regulariser.")
    regularization_batch: PositiveInt = Field(4, description="Unconditional latents per step.")
    guidance: NonNegativeFloat = Field(15.0, description="g in f_safe/f_unsafe (β = g + 1 in the paper's notation).")
    margin: NonNegativeFloat = Field(0.01, description="Hinge margin δ.")
    anchors: Literal["both", "conditional"] = Field(
        "both",
        description="Predictions the hinge steers: both (TRCE's code: ε_θ(x,t,c_m) and ε_θ(x,t,∅), averaged) or "
        "conditional (ε_θ(x,t,c_m) only; this project's option: the unconditional branch is left to the regulariser).",
    )
    preserve_weight: NonNegativeFloat = Field(100.0, description="λ on the unconditional regulariser.")
    preserve_captions: PathText | None = Field(
        None,
        description="This project's option (null: TRCE): a prompt file of captions without the concept; their "
        "conditional predictions on the original model's runs are kept too, with the same λ.",
    )
    caption_trajectories: PositiveInt = Field(
        64, description="Runs over preserve_captions (the first N captions, one seed each), when it is set."
    )
    adversarial: AdversarialSteer | None = Field(
        None,
        description="This project's option (null: TRCE): every `every` steps find, per malicious prompt, the "
        "prompt the shared adversary makes the model being trained draw the concept from, and add the hinge on "
        "the prediction under it.",
    )
    trainable: list[str] = Field(
        ["attn1.", "attn2.to_q."],
        min_length=1,
        description="UNet parameter-name substrings to train (TRCE: attn1.* + attn2.to_q).",
    )


class TrceSteerTraining(TrainingConfig):
    steps: int = Field(300, gt=0, description="Optimiser steps (TRCE: 3 epochs over 100 trajectories).")
    lr: float = Field(1e-6, gt=0, description="Learning rate (TRCE: 1e-6).")


class TrceSteer(EditMethod[TrceSteerParams]):
    """TRCE stage 2: hinge loss on early denoising predictions, one resident UNet."""

    name = "trce_steer"
    summary = "TRCE stage 2: contrastive steering of early denoising predictions (trajectory loss)"
    kind = "training"
    paper = "Chen et al., TRCE, ICCV 2025, arXiv:2503.07389"
    Params = TrceSteerParams
    backbones = frozenset({"sd1", "sd2", "sdxl"})
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "flux": (
            "it trains the UNet's image-side attention (attn1, attn2.to_q by default) on early DDPM steps "
            "(t >= 480); FLUX's joint attention does not separate self- from cross-attention, and its flow "
            "schedule has no counterpart of that step window"
        )
    }
    Training = TrceSteerTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        p = self.params
        return select_parameters(ctx.adapter, p.trainable)

    def prepare_training(self, ctx: EditContext) -> None:
        p = self.params
        pairs = self._prompt_pairs(ctx)
        enc = ctx.encode_prompts([m for m, _ in pairs] + [s for _, s in pairs] + [""])
        n = len(pairs)
        self.malicious, self.safe, self.empty = enc.hidden[:n], enc.hidden[n : 2 * n], enc.hidden[2 * n :]
        self.pairs = pairs
        self.adversarial: dict[int, tuple[int, Tensor]] = {}  # pair -> (refresh, adversarial hidden)

        timesteps = ddim_timesteps(ctx, p.sampling_steps)
        early = int((timesteps >= p.min_timestep).sum())
        if early == 0:
            raise ValueError(f"no DDIM step has t >= {p.min_timestep}")
        # Draw the whole training schedule now, so only the latents it reads are ever sampled.
        self._draw = DrawCounter(ctx.training.grad_accum)
        draws = ctx.training.steps * self._draw.grad_accum
        runs = n * p.trajectories_per_concept
        g = ctx.generator
        # Frozen predictions stored with the latents (frozen_targets: cached); none when recomputed per step.
        self.cached_targets = ctx.training.frozen_targets == "cached"
        stage1 = {"stage1": FrozenTarget("edit_start")} if self.cached_targets else {}
        mal_targets = {
            "malicious": FrozenTarget("base"),
            "safe": FrozenTarget("base", [pairs[j // p.trajectories_per_concept][1] for j in range(runs)]),
            "empty": FrozenTarget("base", ""),
        }
        mal_plan = draw_pairs(g, draws, runs, early)
        reg_plan = draw_pairs(g, draws, p.unconditional_trajectories, p.sampling_steps, per_draw=p.regularization_batch)
        self.mal = sample_planned(
            ctx,
            mal_plan,
            [pairs[j // p.trajectories_per_concept][0] for j in range(runs)],
            [ctx.seed_for("trce_steer", "malicious", j) for j in range(runs)],
            guidance=p.trajectory_guidance,
            steps=p.sampling_steps,
            weights="base",
            label="malicious",
            targets=mal_targets if self.cached_targets else None,
        )
        self.reg = sample_planned(
            ctx,
            reg_plan,
            [""] * p.unconditional_trajectories,
            [ctx.seed_for("trce_steer", "unconditional", u) for u in range(p.unconditional_trajectories)],
            guidance=1.0,
            steps=p.sampling_steps,
            weights="base",
            label="unconditional",
            targets=stage1,
        )
        self.kept: PlannedLatents | None = None
        if p.preserve_captions is not None:
            path, column = resolve_prompt_file(p.preserve_captions, ctx.cache_dir, ctx.base_dir)
            kept = read_prompts(path, column, p.caption_trajectories)
            self.kept_hidden = ctx.encode_prompts(kept).hidden
            kept_plan = draw_pairs(g, draws, len(kept), p.sampling_steps, per_draw=p.regularization_batch)
            self.kept = sample_planned(
                ctx,
                kept_plan,
                kept,
                [ctx.seed_for("trce_steer", "kept", k) for k in range(len(kept))],
                guidance=p.trajectory_guidance,
                steps=p.sampling_steps,
                weights="base",
                label="kept captions",
                targets=stage1,
            )

    def _prompt_pairs(self, ctx: EditContext) -> list[tuple[str, str]]:
        """Distinct (malicious, safe) trajectory prompts, in the concept set's order."""
        p = self.params
        found = ctx.concept_pairs(p.concepts)
        if p.prompts == "pairs":
            return list(dict.fromkeys((x.source, x.target) for x in found))
        fill = p.prompt_template.replace
        return list(dict.fromkeys((fill("{}", x.concept), fill("{}", x.target_concept)) for x in found))

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        p = self.params
        draw = self._draw(step)
        x, t, (j,) = self.mal.take(draw, ctx.device)
        pair = j // p.trajectories_per_concept
        c_m, c_s, empty = self.malicious[pair : pair + 1], self.safe[pair : pair + 1], self.empty
        xr, tr, _ = self.reg.take(draw, ctx.device)
        u = xr.shape[0]  # unconditional regulariser latents; caption ones follow
        cr = empty.expand(u, -1, -1)
        if self.kept is not None:  # the caption regulariser's latents join the unconditional ones
            xk, tk, ks = self.kept.take(draw, ctx.device)
            xr, tr, cr = torch.cat([xr, xk]), torch.cat([tr, tk]), torch.cat([cr, self.kept_hidden[ks]])

        with torch.no_grad():
            if self.cached_targets:  # computed when the latents were sampled
                e_m, e_s, e_0 = (self.mal.target(name, draw, ctx.device) for name in ("malicious", "safe", "empty"))
                reg_target = self.reg.target("stage1", draw, ctx.device)
                if self.kept is not None:
                    reg_target = torch.cat([reg_target, self.kept.target("stage1", draw, ctx.device)])
            else:
                with ctx.reference_weights("base"):  # the original model
                    hidden = torch.cat([c_m, c_s, empty])
                    e_m, e_s, e_0 = _wide(
                        ctx.predict_noise(x.expand(3, -1, -1, -1), t.expand(3), hidden, frozen=True)
                    ).chunk(3)
                with ctx.reference_weights("edit_start"):  # the stage-1 model
                    reg_target = _wide(ctx.predict_noise(xr, tr, cr, frozen=True))
            f_safe = e_s + p.guidance * (e_s - e_0)
            f_unsafe = e_m + p.guidance * (e_m - e_0)

        steered = 2 if p.anchors == "both" else 1  # ε_θ(x,t,c_m), and ε_θ(x,t,∅) with "both"
        conditions = [*[c_m, empty][:steered]]
        if p.adversarial is not None:  # the prompt that brings the concept back, as the model is now
            conditions.append(self._adversarial(ctx, step, pair, x, t, e_m))
        a, kept = len(conditions), len(xr) - u  # anchor rows, then u unconditional and `kept` caption rows

        def shares(pred: Tensor, rows: range) -> dict[str, Tensor]:
            """Each row's share of the terms: a hinge per anchor, an MSE per regulariser latent."""
            pred = _wide(pred)
            terms: dict[str, Tensor] = {}

            def add(key: str, value: Tensor) -> None:
                terms[key] = terms[key] + value if key in terms else value

            anchors = [i for i in rows if i < a]
            for i in anchors:
                hinge = F.relu(
                    F.mse_loss(pred[i - rows.start], f_safe[0])
                    - F.mse_loss(pred[i - rows.start], f_unsafe[0])
                    + p.margin
                )
                if i < steered:
                    add("erase", hinge / steered)
                else:
                    assert p.adversarial is not None
                    add("erase_adversarial", p.adversarial.weight * hinge)
            # A batch MSE over n regulariser rows is n/u of the MSE over all u: the shares add up to it.
            for key, lo, hi, count in (("preserve", a, a + u, u), ("preserve_captions", a + u, a + u + kept, kept)):
                first, last = max(rows.start, lo), min(rows.stop, hi)
                if first < last:
                    mse = F.mse_loss(pred[first - rows.start : last - rows.start], reg_target[first - a : last - a])
                    add(key, p.preserve_weight * mse * ((last - first) / count))
            return terms

        return ctx.separable_loss(
            torch.cat([x.expand(a, -1, -1, -1), xr]), torch.cat([t.expand(a), tr]), torch.cat([*conditions, cr]), shares
        )

    def _adversarial(self, ctx: EditContext, step: int, pair: int, x: Tensor, t: Tensor, e_m: Tensor) -> Tensor:
        """Pair ``pair``'s adversarial hidden states, found again every ``every`` steps: the prompt with
        which the model being trained predicts, at this draw's latent, what the original model predicted
        for the malicious prompt (the concept coming back)."""
        adv = self.params.adversarial
        assert adv is not None
        refresh = (step - 1) // adv.every
        cached = self.adversarial.get(pair)
        if cached is not None and cached[0] == refresh:
            return cached[1]
        prompt, template, init = self._attacked(ctx, pair)
        seed = ctx.seed_for("trce_steer", "adversary", pair, refresh)
        if adv.attack == "soft_prompt":
            adversary = ctx.adversary(
                "soft_prompt", tokens=adv.tokens, steps=adv.steps, radius=adv.radius, step_size=adv.step_size, seed=seed
            )
        else:
            adversary = ctx.adversary(
                "concept_inversion", tokens=adv.tokens, steps=adv.steps, lr=adv.step_size, init=init, seed=seed
            )

        def objective(hidden: Tensor) -> Tensor:
            return F.mse_loss(_wide(ctx.predict_noise(x, t, hidden, frozen=True)), e_m)

        found = adversary.attack(prompt if adv.attack == "soft_prompt" else template, objective)
        hidden = found.hidden.detach().to(self.malicious.dtype)
        self.adversarial[pair] = (refresh, hidden)
        return hidden

    def _attacked(self, ctx: EditContext, pair: int) -> tuple[str, str, str | None]:
        """The malicious prompt, its template with ``{}`` in the concept's place (first when absent), and
        the concept's words (concept inversion starts from them)."""
        prompt = self.pairs[pair][0]
        for found in ctx.concept_pairs(self.params.concepts):
            if found.concept and found.concept in prompt:
                return prompt, prompt.replace(found.concept, "{}", 1), found.concept
        return prompt, "{} " + prompt, None


def _wide(prediction: Tensor) -> Tensor:
    """The prediction in at least float32: half-precision models get a float32 loss, a float64 model
    keeps float64 (so exactness checks can compare the loss to a hand computation)."""
    return prediction.to(torch.promote_types(prediction.dtype, torch.float32))


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(TrceSteer)
