"""SalUn (``salun``): unlearn a concept by training only its salient weights on pseudo-labelled images.

Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image
Classification and Generation", ICLR 2024 (arXiv 2310.12508). Two stages, on a forget set ``D_f``
of images of the concept (generated here by the base model from the concept prompts ``c``) and a
retain set ``D_r`` of other images with their own prompts ``c_r``:

1. **Weight saliency.** One pass over ``D_f`` accumulates the gradient of the forget loss at the
   model as the edit starts, with the classifier-free-guided prediction the reference uses
   (guidance ``w``; ``w = 0`` is the plain diffusion loss)::

       ε̂(x_t)  = (1 + w) ε_θ(x_t, t, c) − w ε_θ(x_t, t, ∅)
       g       = Σ_batches ∇_θ [ −‖ε − ε̂(x_t)‖² ]        x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε,  t ~ U{0..999}
       m       = 1 where |g| is among the top ``mask_fraction`` of all entries (one ranking), else 0

2. **Random-label unlearning, masked.** Each step, a forget batch is noised, and the model learns
   to denoise it under the concept prompt as it (the current model, stop-gradient) denoises it
   under the pseudo-label prompt ``c'``; a retain batch keeps the plain diffusion loss::

       L = ‖ε_θ(x_t, t, c) − sg[ε_θ(x_t, t, c')]‖² + α ‖ε_θ(x^r_t, t_r, c_r) − ε_r‖²

   and only the salient entries change: the engine zeroes the gradient outside ``m`` and keeps
   those entries bit for bit (:meth:`EditMethod.gradient_masks`), whatever the optimiser.

On a v-prediction model (SD-2.x 768) ε_θ is the model's output and the true noise ``ε`` (mask and
retain terms) becomes ``v = √ᾱ_t ε − √(1−ᾱ_t) x₀`` (``training_target``); the guided prediction
and the pseudo-label goal are combinations of outputs and stay as they are.

Reference: OPTML-Group/Unlearn-Saliency (MIT), ``SD/train-scripts/generate_mask.py`` (the mask)
and ``nsfw_removal.py`` / ``random_label.py`` (the training). Its sets hold 800 generated images
each for nudity; the defaults here are far smaller (see ``docs/methods/salun.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator, model_validator
from torch import Tensor

from conceptedit import ConceptRef, EditContext, EditError, EditMethod, MethodParams, PathText, TrainingConfig, hookimpl
from conceptedit.toolkit import (
    DrawCounter,
    add_noise,
    alphas_cumprod,
    read_prompts,
    resolve_prompt_file,
    sample_planned,
    select_parameter_set,
    training_target,
    uniform_timesteps,
)

#: SalUn's ``--train_method`` choices as engine parameter sets (``xattn``: every name with "attn2").
SALUN_PARAMETER_SETS = {"full": "full", "xattn": "cross_attention"}


class SalunParams(MethodParams):
    concepts: ConceptRef = Field(
        description="Concept set of [concept, pseudo-label] pairs × templates, e.g. pairs "
        "[['a nude person', 'a person wearing clothes']] with templates ['a photo of {}']: the forget images are "
        "generated from the concept prompts, and each is trained to denoise under its concept prompt as the "
        "model denoises it under the paired pseudo-label prompt."
    )
    retain_prompts: list[str] = Field(
        [],
        description="Prompts of the retain images (image j: prompt j mod R); empty = the concept set's "
        "pseudo-label prompts, as the reference's nudity setting ('a photo of a person wearing clothes').",
    )
    retain_captions: PathText | None = Field(
        None,
        description="Instead of retain_prompts, a caption file (text, one per line; CSV with a `prompt` column; or "
        "a known prompt source such as coco-30k), relative to the recipe; the first retain_samples are used.",
    )
    forget_samples: PositiveInt = Field(
        64, description="Forget images the base model generates, cycling the concept prompts (SalUn nudity: 800)."
    )
    retain_samples: PositiveInt = Field(
        64, description="Retain images the base model generates, cycling the retain prompts (SalUn nudity: 800)."
    )
    batch_size: PositiveInt = Field(8, description="Forget and retain images per step, and per mask batch (SalUn: 8).")
    alpha: NonNegativeFloat = Field(
        0.1,
        description="Weight α of the retain loss (SalUn: 0.1, its default and nudity setting; 0.5 in its "
        "object commands). 0 = no retain set.",
    )
    mask_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of the weights ranked that may train: the top by |gradient| (SalUn: 0.5).",
    )
    mask_guidance: NonNegativeFloat = Field(
        7.5,
        description="Guidance w of the mask's forget loss, on (1 + w) ε(c) − w ε(∅) (SalUn's c_guidance: 7.5); "
        "0 = the plain diffusion loss.",
    )
    mask_scope: Literal["unet", "trained"] = Field(
        "unet",
        description="Which weights the saliency ranking covers: unet = the whole UNet, one ranking (SalUn), so with "
        "parameters: xattn the share of attn2 weights that trains may differ from mask_fraction; trained = only the "
        "trained parameters.",
    )
    parameters: Literal["full", "xattn"] = Field(
        "full",
        description="What trains: full = the whole UNet (SalUn's commands); xattn = every cross-attention (attn2) "
        "parameter.",
    )
    generation_steps: PositiveInt = Field(50, description="DDIM (η=0) steps of each forget and retain generation.")
    generation_guidance: NonNegativeFloat = Field(7.5, description="CFG scale of the forget and retain generations.")

    @field_validator("retain_prompts")
    @classmethod
    def _no_blank_prompt(cls, prompts: list[str]) -> list[str]:
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"retain prompt {i} is blank; give a prompt or drop it")
        return prompts

    @model_validator(mode="after")
    def _one_retain_source(self) -> SalunParams:
        if self.retain_prompts and self.retain_captions is not None:
            raise ValueError("give retain_prompts or retain_captions, not both")
        return self


class SalunTraining(TrainingConfig):
    steps: int = Field(
        100, gt=0, description="Optimiser steps (SalUn nudity: one epoch of 800 images in batches of 8 = 100)."
    )
    lr: float = Field(1e-5, gt=0, description="Learning rate (SalUn: 1e-5).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field(
        "adam",
        description="Optimiser (SalUn: Adam, no weight decay). With any of them, entries outside the mask stay bit "
        "for bit: the engine puts them back after each step.",
    )


#: The bit pattern of float32's largest finite value, the top of the bisection.
LARGEST_FINITE_FLOAT32_BITS = 0x7F7FFFFF


def top_fraction_mask(scores: Sequence[Tensor], fraction: float) -> list[Tensor]:
    """Boolean masks of the ``int(N × fraction)`` largest of all ``N`` entries of ``scores``, ranked together.

    One ranking over every tensor, as SalUn's ``generate_mask.py`` ranks the whole UNet. Ties at the
    threshold are taken in order (tensor order, then flat order), so exactly that many are True.

    The scores are magnitudes (>= 0), whose float32 bit patterns read as integers sort as the values
    do, so the k-th largest is found by bisection on those integers, one counting pass per bit,
    tensor by tensor: no copy of all scores at once (the reference concatenates and sorts them,
    several times the UNet's size, which does not fit beside an SD-1.4 UNet in 24 GiB).
    """
    keys = [s.detach().float().cpu().contiguous().reshape(-1).view(torch.int32) for s in scores]
    for s in scores:
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise EditError("the saliency scores must be finite magnitudes; the forget loss's gradient overflowed")
    n = sum(key.numel() for key in keys)
    k = int(n * fraction)
    if k == 0:
        return [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
    low, high = 0, LARGEST_FINITE_FLOAT32_BITS
    while low < high:  # the largest key t with at least k scores >= t: the k-th largest
        mid = (low + high + 1) // 2
        if sum(int((key >= mid).sum()) for key in keys) >= k:
            low = mid
        else:
            high = mid - 1
    masks = [key > low for key in keys]
    short = k - sum(int(m.sum()) for m in masks)
    for key, mask in zip(keys, masks, strict=True):  # ties at the threshold, in order
        if short <= 0:
            break
        ties = (key == low).nonzero().reshape(-1)[:short]
        mask[ties] = True
        short -= ties.numel()
    return [mask.reshape(s.shape) for mask, s in zip(masks, scores, strict=True)]


def batch_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive batches of ``size`` over ``count`` items (the last may be short)."""
    return [(lo, min(lo + size, count)) for lo in range(0, count, size)]


@contextmanager
def _gradients_for(ctx: EditContext, names: Sequence[str]) -> Iterator[list[torch.nn.Parameter]]:
    """The UNet tracks gradients for ``names`` only during the block; its flags come back after."""
    wanted = set(names)
    unet = [(n, q) for n, q in ctx.adapter.named_parameters() if n.startswith("unet.")]
    saved = [(q, q.requires_grad) for _, q in unet]
    try:
        for n, q in unet:
            q.requires_grad_(n in wanted)
        yield [ctx.adapter.get_parameter(n) for n in names]
    finally:
        for q, flag in saved:
            q.requires_grad_(flag)


class Salun(EditMethod[SalunParams]):
    """SalUn for Stable Diffusion: saliency mask from the forget loss, then masked random-label training."""

    name = "salun"
    summary = "SalUn: random-label unlearning of a concept, training only the weights salient to it (trajectory loss)"
    kind = "training"
    paper = (
        "Fan et al., SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image "
        "Classification and Generation, ICLR 2024, arXiv:2310.12508"
    )
    Params = SalunParams
    backbones = frozenset({"sd1", "sd2", "sdxl"})
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "flux": (
            "its forget and retain losses (and the saliency mask made from their gradients) noise latents by the "
            "diffusion forward process (ᾱ_t) at uniformly drawn DDPM timesteps; FLUX is a flow-matching model "
            "(x_t = (1 − σ) x₀ + σ ε, trained on a shifted σ distribution), and the losses have not been ported to it"
        )
    }
    Training = SalunTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        return select_parameter_set(ctx.adapter, SALUN_PARAMETER_SETS[self.params.parameters])

    def prepare_training(self, ctx: EditContext) -> None:
        p = self.params
        pairs = self.prompt_pairs(ctx)
        self._draw = DrawCounter(ctx.training.grad_accum)
        self._alphas = alphas_cumprod(ctx.pipeline.scheduler.config)
        n = len(pairs)
        enc = ctx.encode_prompts([c for c, _ in pairs] + [a for _, a in pairs]).hidden
        self.concept_hidden, self.pseudo_hidden = enc[:n], enc[n:]
        self.forget_which = torch.arange(p.forget_samples) % n  # forget image j: pair j mod n
        self.forget = self.generate(ctx, "forget", [pairs[j % n][0] for j in range(p.forget_samples)])
        self.forget_batches = batch_bounds(p.forget_samples, p.batch_size)
        if p.alpha > 0:
            retain = self.retain_prompts(ctx, pairs)
            used = retain[: min(len(retain), p.retain_samples)]  # image j reads prompt j mod R
            self.retain_hidden = ctx.encode_prompts(used).hidden
            self.retain_which = torch.arange(p.retain_samples) % len(used)
            self.retain = self.generate(ctx, "retain", [used[j % len(used)] for j in range(p.retain_samples)])
            self.retain_batches = batch_bounds(p.retain_samples, p.batch_size)
        self.masks = self.saliency_masks(ctx)

    def prompt_pairs(self, ctx: EditContext) -> list[tuple[str, str]]:
        """(concept prompt, pseudo-label prompt) of the concept set, in order, without repeats."""
        p = self.params
        expanded = ctx.concept_pairs(p.concepts)
        if any(not x.target_concept.strip() for x in expanded):
            raise EditError(
                f"{ctx.label}: concept set {p.concepts!r} has an entry without a pseudo-label; give "
                "[concept, pseudo-label] pairs, e.g. pairs: [[a nude person, a person wearing clothes]]"
            )
        return list(dict.fromkeys((x.source, x.target) for x in expanded))

    def retain_prompts(self, ctx: EditContext, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """The retain prompts: listed, read from a caption file, or the pseudo-label prompts."""
        p = self.params
        if p.retain_prompts:
            return list(p.retain_prompts)
        if p.retain_captions is not None:
            path, column = resolve_prompt_file(p.retain_captions, ctx.cache_dir, ctx.base_dir)
            return read_prompts(path, column, limit=p.retain_samples)
        return list(dict.fromkeys(a for _, a in pairs))

    def generate(self, ctx: EditContext, which: str, prompts: Sequence[str]) -> Tensor:
        """Finished base-model generations of ``prompts``, one seeded noise each: [N, C, H, W], float16, CPU.

        Through the engine's trajectory cache, so a second run with the same settings samples nothing.
        """
        p = self.params
        steps = p.generation_steps
        plan = torch.tensor([[j, steps] for j in range(len(prompts))], dtype=torch.long)
        seeds = [ctx.seed_for("salun", which, j) for j in range(len(prompts))]
        planned = sample_planned(
            ctx,
            plan,
            prompts,
            seeds,
            guidance=p.generation_guidance,
            steps=steps,
            weights="base",
            label=which,
        )
        rows = planned.kept.lookup()
        return planned.kept.latents[[rows[(j, steps)] for j in range(len(prompts))]]

    def saliency_masks(self, ctx: EditContext) -> dict[str, Tensor]:
        """The mask of every trained parameter: the top ``mask_fraction`` of |Σ ∇ forget loss| (see module doc)."""
        p = self.params
        trained = list(self.trainable_parameters(ctx))
        ranked = select_parameter_set(ctx.adapter, "full") if p.mask_scope == "unet" else trained
        gradients = self.forget_gradients(ctx, ranked)
        masks = top_fraction_mask([g.abs_() for g in gradients], p.mask_fraction)
        wanted = set(trained)
        kept = {
            name: mask.to(ctx.adapter.get_parameter(name).device)
            for name, mask in zip(ranked, masks, strict=True)
            if name in wanted
        }
        if not any(bool(m.any()) for m in kept.values()):
            raise EditError(
                f"{ctx.label}: the saliency mask (mask_fraction {p.mask_fraction}, mask_scope {p.mask_scope}) "
                "leaves no trained weight free to change; raise mask_fraction or use mask_scope: trained"
            )
        return kept

    def forget_gradients(self, ctx: EditContext, names: Sequence[str]) -> list[Tensor]:
        """Σ over forget batches of ∇ −‖ε − ((1 + w) ε(c) − w ε(∅))‖², for each of ``names`` (float32).

        Each batch's loss is its mean; ``training.micro_batch`` splits a batch into chunks whose
        gradients add up to it. Timesteps and noise come from a generator of the mask's own.
        """
        p = self.params
        w = p.mask_guidance
        g = torch.Generator().manual_seed(ctx.seed_for("salun", "mask"))
        empty = ctx.encode_prompts([""]).hidden
        chunk = ctx.training.micro_batch or p.batch_size
        with (
            _gradients_for(ctx, names) as params,
            ctx.progress.task(f"{ctx.label}: saliency mask", len(self.forget_batches)) as bar,
        ):
            totals = [torch.zeros_like(q, dtype=torch.float32) for q in params]
            for lo, hi in self.forget_batches:
                x0 = self.forget[lo:hi].to(ctx.device, torch.float32)
                t = uniform_timesteps(g, hi - lo, len(self._alphas)).to(ctx.device)
                noise = torch.randn(x0.shape, generator=g).to(ctx.device)
                x = add_noise(self._alphas, x0, noise, t)
                truth = training_target(self._alphas, x0, noise, t, prediction=ctx.adapter.prediction_type)
                cond = self.concept_hidden[self.forget_which[lo:hi]]
                for a, b in batch_bounds(hi - lo, chunk):
                    n = b - a
                    hidden = torch.cat([cond[a:b], empty.expand(n, -1, -1)])
                    both = ctx.predict_noise(x[a:b].repeat(2, 1, 1, 1), t[a:b].repeat(2), hidden).float()
                    e_c, e_0 = both.chunk(2)
                    guided = (1 + w) * e_c - w * e_0
                    # The batch mean of the squared error, this chunk's share of it.
                    loss = -((guided - truth[a:b]) ** 2).sum() / noise.numel()
                    for total, grad in zip(totals, torch.autograd.grad(loss, params), strict=True):
                        total += grad.float()
                bar.advance()
        return totals

    def gradient_masks(self, ctx: EditContext) -> Mapping[str, Tensor]:
        return self.masks

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        p = self.params
        draw = self._draw(step)
        batch = draw % len(self.forget_batches)
        lo, hi = self.forget_batches[batch]
        x0 = self.forget[lo:hi].to(ctx.device, torch.float32)
        t = uniform_timesteps(ctx.generator, hi - lo, len(self._alphas)).to(ctx.device)
        noise = torch.randn(x0.shape, generator=ctx.generator).to(ctx.device)
        x = add_noise(self._alphas, x0, noise, t)
        which = self.forget_which[lo:hi]
        with torch.no_grad():  # the pseudo-label goal: the current model, stop-gradient
            goal = ctx.predict_noise(x, t, self.pseudo_hidden[which]).float()
        if p.alpha == 0:
            return {"forget": F.mse_loss(ctx.predict_noise(x, t, self.concept_hidden[which]).float(), goal)}
        # The reference restarts the retain set with every pass over the forget set.
        r_lo, r_hi = self.retain_batches[batch % len(self.retain_batches)]
        r0 = self.retain[r_lo:r_hi].to(ctx.device, torch.float32)
        r_t = uniform_timesteps(ctx.generator, r_hi - r_lo, len(self._alphas)).to(ctx.device)
        r_noise = torch.randn(r0.shape, generator=ctx.generator).to(ctx.device)
        r_x = add_noise(self._alphas, r0, r_noise, r_t)
        r_truth = training_target(self._alphas, r0, r_noise, r_t, prediction=ctx.adapter.prediction_type)
        hidden = torch.cat([self.concept_hidden[which], self.retain_hidden[self.retain_which[r_lo:r_hi]]])
        pred = ctx.predict_noise(torch.cat([x, r_x]), torch.cat([t, r_t]), hidden).float()
        forget, retain = pred[: hi - lo], pred[hi - lo :]
        return {"forget": F.mse_loss(forget, goal), "retain": p.alpha * F.mse_loss(retain, r_truth)}


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Salun)
