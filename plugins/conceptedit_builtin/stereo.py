"""STEREO (``stereo``): mine adversarial tokens against ESD erasures, then erase them all at once.

Srivatsan et al., "STEREO: A Two-Stage Framework for Adversarially Robust Concept Erasing from
Text-to-Image Diffusion Models", CVPR 2025. Reference code: github.com/koushiksrivats/STEREO,
which has **no licence**: this is a re-implementation from the paper and the formulas, not a copy.

**Stage one, STE** ("search thoroughly enough"), ``iterations`` rounds on a working copy of the
trained tensors, starting from the edit-start weights θ₀ and the concept prompt ``c₀ = c``:

    θ_r   = θ_{r−1} after ``ste_steps`` Adam steps on  ‖ε_θ(x_t, t, c_{r−1}) − target_ste‖²
    target_ste = ε*(c_{r−1}) − (s − 1) U(ε*(c_{r−1}), ε*(∅))              s = ste_guidance
    v_r   = textual inversion of new token rows on θ_r, fitted to a gallery of the concept
    c_r   = the text encoding of v_r alone (the next round's concept)

``x_t`` comes from a partial DDIM run (CFG ``sampling_guidance``) on the concept being erased, with
the weights as they are; ``ε*`` is the frozen ``reference`` model; ``U`` is APG's normalised
guidance direction (:func:`~conceptedit.toolkit.normalized_update`: the difference split into its
parts parallel and orthogonal to ``ε*(c)``, the parallel part times ``apg_eta``, after an optional
norm threshold). The inversion is the shared ``concept_inversion`` adversary (CCE), lowering the
diffusion loss of ``gallery_size`` images the base model draws of the concept (made once).

**Stage two, REO** ("robustly erase once"): the weights go back to θ₀ bit for bit (REO fine-tunes
the *original* model), and the engine's loop trains, on a stratified plan of erase concepts
``c_e ∈ {c, v_1, …}`` and anchor prompts ``a``, with ``g`` = ``compositional_guidance_scale``:

    target_reo = ε*(∅) + (g − 1) U(ε*(a), ε*(∅)) + (−g − 1) mean_n U(ε*(c_n), ε*(∅))
    L          = ‖ε_θ(x_t, t, c_e) − target_reo‖²

(:func:`~conceptedit.toolkit.compositional_guidance`), ``x_t`` again from a partial DDIM run on
``c_e`` with the model being trained, ``n`` over every erase concept.

On a v-prediction model (SD-2.x 768) ε is the model's output, v. With ``apg_eta`` 1 and no norm
threshold (the defaults) both targets weigh outputs at one ``x_t`` with weights summing to one, so
they are exactly the v of the ε-space targets; the inversion's diffusion loss compares to the true
v (``training_target``). Otherwise APG's projection and threshold act on v, as APG run on a
v-model does.

Why stage one runs inside ``prepare_training``: the engine owns one optimisation loop per edit,
over one set of parameters, and REO is that loop. STE is a different optimisation (its own
target, optimiser, learning rate and step count, interleaved with attacks) over the same tensors,
whose result is thrown away except for the mined tokens. It is the set-up REO needs, so it runs in
the hook that builds REO's inputs, on the trained tensors themselves (no second UNet), and puts
them back to their edit-start values (the ledger's copies) before the engine's loop starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from conceptedit import EditContext, EditMethod, MethodParams, TrainingConfig, hookimpl
from conceptedit.toolkit import (
    ESD_PARAMETER_SETS,
    DrawCounter,
    alphas_cumprod,
    compositional_guidance,
    ddim_timesteps,
    denoising_objective,
    encode_with_rows,
    mentions_phrase,
    normalized_update,
    partial_ddim,
    sample_planned,
    seeded_noise,
    select_parameter_set,
)

#: Anchor prompts for a colour of the built-in shapes world, erased toward gray (its usual anchor).
#: The reference reads its anchors per concept from ``utils/anchor_prompts.json``.
SHAPES_ANCHORS = ("a gray circle", "a gray square", "a gray triangle", "a gray cross")

#: Where a mined token stands when it is erased: alone, as the reference erases its placeholder word.
TOKEN_ALONE = "{}"


# (No docstring: it would become the recipe schema's description of these params.)
class StereoParams(MethodParams):
    concept: str = Field(description="Prompt of the concept to erase, e.g. 'nudity' or 'red'.")
    anchors: list[str] = Field(
        list(SHAPES_ANCHORS),
        min_length=1,
        description="Anchor prompts REO pulls the concept toward, one per step, stratified (the reference's "
        "utils/anchor_prompts.json lists them per concept). The default suits a colour of builtin:shapes; no "
        "anchor may mention the concept.",
    )
    parameters: Literal["x", "x-strict", "u", "full"] = Field(
        "u",
        description="What trains, in both stages: u = everything except cross-attention, time embedding and output "
        "head (the reference's noxattn, its README's choice); x = cross-attention (xattn); x-strict = attn2 keys and "
        "values; full = the whole UNet.",
    )
    iterations: PositiveInt = Field(2, description="STE rounds of erase-then-attack (reference README: 2).")
    ste_steps: PositiveInt = Field(50, description="ESD steps per STE round (reference --iterations: 200).")
    ste_lr: PositiveFloat = Field(5e-6, description="Adam learning rate of the STE erase (reference --ste_lr).")
    ste_guidance: float = Field(
        2.0,
        ge=1,
        description="s of STE's target ε*(c) − (s − 1)·U (reference --negative_guidance: 2). With apg_eta 1 and no "
        "threshold this is ESD's target with η = s − 2, so the default trains toward ε*(∅).",
    )
    inversion_steps: PositiveInt = Field(
        200, description="Textual-inversion steps per STE round (reference --ti_max_train_steps: 3000)."
    )
    inversion_lr: PositiveFloat = Field(5e-3, description="AdamW learning rate of the token rows (reference --ci_lr).")
    inversion_weight_decay: NonNegativeFloat = Field(
        1e-2, description="AdamW weight decay of the token rows (the reference's: torch's default, 0.01)."
    )
    inversion_tokens: PositiveInt = Field(1, description="New token rows learned per round (reference: one).")
    inversion_init: str | None = Field(
        "object",
        description="Word whose embedding starts the rows (reference --initializer_token: person, object or art); "
        "none = seeded random vocabulary tokens.",
    )
    inversion_template: str = Field(
        TOKEN_ALONE,
        description="Prompt the rows are fitted in, {} where they stand (the reference draws ImageNet templates "
        "such as 'a photo of a {}').",
    )
    gallery_size: PositiveInt = Field(
        8, description="Images of the concept the base model draws once for the inversions (reference: about 500)."
    )
    gallery_prompt: str | None = Field(None, description="Prompt of the gallery images (none: the concept).")
    gallery_guidance: NonNegativeFloat = Field(7.5, description="CFG scale of the gallery images.")
    adversarial_concepts: PositiveInt | None = Field(
        None,
        description="Mined tokens REO erases, the first ones (reference --num_of_adv_concepts; none = all, which at "
        "the README's 2 rounds is its 2).",
    )
    compositional_guidance_scale: PositiveFloat = Field(
        2.0,
        description="g of REO's target: anchors pull with weight g − 1, erase concepts push with g + 1 (reference "
        "--compositional_guidance_scale: 2).",
    )
    apg_eta: NonNegativeFloat = Field(
        1.0, description="Weight of the guidance's part parallel to the conditional prediction (reference: 1)."
    )
    apg_norm_threshold: NonNegativeFloat = Field(
        0.0, description="Guidance differences longer than this are scaled down to it; 0 = none (reference: 0)."
    )
    sampling_guidance: NonNegativeFloat = Field(3.0, description="CFG scale of the partial DDIM runs making x_t.")
    sampling_steps: int = Field(
        50, ge=3, description="DDIM steps of a full run; x_t is after k ~ U{1..steps-2}; also the gallery's steps."
    )
    reference: Literal["base", "edit_start"] = Field(
        "base", description="Frozen model ε* of both targets: base = before the run, edit_start = before this edit."
    )

    @field_validator("concept", "inversion_init", "gallery_prompt")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank (give words, or leave it out)")
        return value

    @field_validator("inversion_template")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{}") > 1:
            raise ValueError(f"{value!r} has more than one {{}}: mark the one place where the new token stands")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StereoParams:
        for anchor in self.anchors:
            if not anchor.strip():
                raise ValueError("anchors: an anchor prompt is blank")
            if mentions_phrase(anchor, self.concept):
                raise ValueError(
                    f"anchors: {anchor!r} mentions the concept {self.concept!r}, which REO pulls toward its anchors; "
                    "give anchors without it (the default anchors are for a colour of builtin:shapes)"
                )
        if self.adversarial_concepts is not None and self.adversarial_concepts > self.iterations:
            raise ValueError(
                f"adversarial_concepts: {self.adversarial_concepts} asked, but {self.iterations} STE round(s) mine "
                f"only {self.iterations} token(s); raise iterations or lower adversarial_concepts"
            )
        return self


class StereoTraining(TrainingConfig):
    steps: int = Field(200, gt=0, description="REO optimiser steps (reference --iterations: 200, batch 1).")
    lr: float = Field(2e-5, gt=0, description="REO learning rate (reference --reo_lr: 2e-5).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adam", description="REO optimiser (Adam, as esd).")


@dataclass
class StereoDraw:
    """One REO latent: ``x`` after ``k`` DDIM steps from seed ``seed`` on erase concept ``erase``, fed at ``t``."""

    x: Tensor
    t: Tensor
    k: int
    erase: int
    anchor: int
    seed: int


def stratified(count: int, n: int, generator: torch.Generator) -> Tensor:
    """The reference's stratified order of ``n`` items over ``count`` draws: each item ``count // n`` times,
    shuffled, then ``count % n`` distinct items at random."""
    whole = torch.arange(n).repeat(count // n)
    order = whole[torch.randperm(len(whole), generator=generator)]
    return torch.cat([order, torch.randperm(n, generator=generator)[: count % n]])


@contextmanager
def trainable_only(ctx: EditContext, names: Sequence[str]) -> Iterator[list[nn.Parameter]]:
    """Only ``names`` track gradients during the block (none: nothing does); every flag comes back after."""
    wanted = set(names)
    everything = list(ctx.adapter.named_parameters())
    saved = [(q, q.requires_grad) for _, q in everything]
    try:
        for n, q in everything:
            q.requires_grad_(n in wanted)
        yield [ctx.adapter.get_parameter(n) for n in names]
    finally:
        for q, flag in saved:
            q.requires_grad_(flag)


def edit_start_values(ctx: EditContext, names: Sequence[str]) -> dict[str, Tensor]:
    """Each tensor's value at the edit's start: the ledger's own copy (no second copy of the trained
    tensors), or a clone of the tensor where the ledger holds none."""
    with torch.no_grad(), ctx.reference_weights("edit_start", names):
        held = {n: ctx.adapter.get_parameter(n).data for n in names}
    live = {n: ctx.adapter.get_parameter(n).data.data_ptr() for n in names}
    return {n: v.clone() if v.data_ptr() == live[n] else v for n, v in held.items()}


def restore(ctx: EditContext, values: dict[str, Tensor]) -> None:
    """Copy ``values`` back into the parameters, bit for bit, and drop their gradients."""
    with torch.no_grad():
        for name, value in values.items():
            param = ctx.adapter.get_parameter(name)
            param.copy_(value)
            param.grad = None


class Stereo(EditMethod[StereoParams]):
    """STEREO: STE mines adversarial tokens against ESD erasures; REO erases them with the concept (see the module)."""

    name = "stereo"
    summary = (
        "STEREO: ESD erasures attacked by textual inversion mine adversarial tokens, then a compositional "
        "anchor objective erases concept and tokens from the original model (trajectory loss)"
    )
    kind = "training"
    paper = (
        "Srivatsan et al., STEREO: A Two-Stage Framework for Adversarially Robust Concept Erasing from "
        "Text-to-Image Diffusion Models, CVPR 2025"
    )
    Params = StereoParams
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "sdxl": (
            "its search phase inverts the concept into token embeddings (concept inversion), which "
            "SDXL's two text encoders do not share, and an inverted prompt has no pooled embedding"
        ),
        "flux": (
            "its search phase inverts the concept into token embeddings (concept inversion); FLUX's two text "
            "encoders (T5 rows, CLIP pooled vector) read different tables, and an inverted prompt has no pooled vector"
        ),
    }
    Training = StereoTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        return select_parameter_set(ctx.adapter, ESD_PARAMETER_SETS[self.params.parameters])

    def prepare_training(self, ctx: EditContext) -> None:
        # Stage one (STE) runs here, before the engine's loop (REO); the module docstring says why.
        p = self.params
        self.timesteps = ddim_timesteps(ctx, p.sampling_steps)
        enc = ctx.encode_prompts([p.concept, ""]).hidden
        self.concept, self.empty = enc[:1], enc[1:]
        self.ste_losses: list[list[float]] = []
        self.rows = self.search(ctx, list(self.trainable_parameters(ctx)))
        self.prepare_reo(ctx)

    # ------------------------------------------------------------------------- stage one: STE

    def search(self, ctx: EditContext, names: Sequence[str]) -> list[Tensor]:
        """STE: ``iterations`` rounds of erase-then-invert on the working weights; the mined rows ``[tokens, D]``
        of each round. The trained tensors hold their edit-start values again afterwards, bit for bit."""
        gallery = self.gallery(ctx)
        start = edit_start_values(ctx, names)
        rows: list[Tensor] = []
        hidden = self.concept
        try:
            for round_ in range(self.params.iterations):
                self.erase_round(ctx, names, hidden, round_)
                rows.append(self.invert(ctx, gallery, round_))
                hidden = self.token_hidden(ctx, rows[-1])
        finally:
            restore(ctx, start)
        return rows

    def gallery(self, ctx: EditContext) -> Tensor:
        """Finished base-model generations of the concept ``[gallery_size, C, H, W]`` (the trajectory cache)."""
        p = self.params
        n, steps = p.gallery_size, p.sampling_steps
        plan = torch.tensor([[j, steps] for j in range(n)], dtype=torch.long)
        seeds = [ctx.seed_for("stereo", "gallery", j) for j in range(n)]
        prompts = [p.gallery_prompt or p.concept] * n
        planned = sample_planned(
            ctx, plan, prompts, seeds, guidance=p.gallery_guidance, steps=steps, weights="base", label="gallery"
        )
        rows = planned.kept.lookup()
        return planned.kept.latents[[rows[(j, steps)] for j in range(n)]].to(ctx.device)

    def erase_round(self, ctx: EditContext, names: Sequence[str], hidden: Tensor, round_: int) -> None:
        """``ste_steps`` ESD steps with STE's APG target that erase ``hidden`` from the working weights (own Adam)."""
        p = self.params
        plan = torch.Generator().manual_seed(ctx.seed_for("stereo", "ste", round_))
        ks = torch.randint(1, p.sampling_steps - 1, (p.ste_steps,), generator=plan).tolist()
        losses: list[float] = []
        with (
            trainable_only(ctx, names) as params,
            ctx.progress.task(f"{ctx.label}: STE round {round_ + 1} erase", p.ste_steps) as bar,
        ):
            optimiser = torch.optim.Adam(params, lr=p.ste_lr)
            for i, k in enumerate(ks):
                x, t = self.partial(ctx, hidden, ctx.seed_for("stereo", "ste", round_, i), k)
                target = self.ste_target(ctx, x, t, hidden)
                loss = F.mse_loss(ctx.predict_noise(x, t, hidden).float(), target)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                bar.advance(info=f"loss {losses[-1]:.4g}")
        self.ste_losses.append(losses)

    def ste_target(self, ctx: EditContext, x: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
        """ε*(c) − (s − 1) U(ε*(c), ε*(∅)) of the frozen reference, without gradients."""
        p = self.params
        with torch.no_grad(), ctx.reference_weights(p.reference):
            both = ctx.predict_noise(x.expand(2, -1, -1, -1), t.expand(2), torch.cat([hidden, self.empty]), frozen=True)
        e_c, e_0 = both.float().chunk(2)
        update = normalized_update(e_c, e_0, eta=p.apg_eta, norm_threshold=p.apg_norm_threshold)
        return e_c - (p.ste_guidance - 1) * update

    def invert(self, ctx: EditContext, gallery: Tensor, round_: int) -> Tensor:
        """The round's attack: new token rows fitted on the erased working weights to the gallery (CCE)."""
        p = self.params
        adversary = ctx.adversary(
            "concept_inversion",
            tokens=p.inversion_tokens,
            steps=p.inversion_steps,
            lr=p.inversion_lr,
            weight_decay=p.inversion_weight_decay,
            init=p.inversion_init,
            seed=ctx.seed_for("stereo", "inversion", round_),
        )
        draws = torch.Generator().manual_seed(ctx.seed_for("stereo", "objective", round_))
        objective = denoising_objective(ctx.adapter, gallery, alphas_cumprod(ctx.pipeline.scheduler.config), draws)
        with trainable_only(ctx, []):  # only the new rows learn; no graph through the model's own weights
            found = adversary.attack(p.inversion_template, objective)
        return found.embeddings[0, list(found.slots)].detach().float().clone()

    def token_hidden(self, ctx: EditContext, rows: Tensor) -> Tensor:
        """The text encoding ``[1, 77, D]`` of mined rows standing alone (the reference erases its token alone)."""
        with torch.no_grad():
            return encode_with_rows(ctx.adapter, TOKEN_ALONE, rows).float()

    def partial(self, ctx: EditContext, hidden: Tensor, seed: int, k: int) -> tuple[Tensor, Tensor]:
        """``x_t`` after ``k`` guided DDIM steps on ``hidden`` from seeded noise, with the weights as they are,
        and its own timestep."""
        p = self.params
        noise = seeded_noise(ctx.adapter.latent_shape(1)[1:], [seed]).to(ctx.device)
        x = partial_ddim(ctx, noise, hidden, self.empty, p.sampling_guidance, p.sampling_steps, k).float()
        return x, self.timesteps[k : k + 1].to(ctx.device)

    # ------------------------------------------------------------------------- stage two: REO

    def prepare_reo(self, ctx: EditContext) -> None:
        """REO's encodings (the concept, the mined tokens, the anchors) and its whole plan of draws."""
        p = self.params
        tokens = [self.token_hidden(ctx, rows) for rows in self.rows[: p.adversarial_concepts]]
        self.erase_hidden = torch.cat([self.concept, *tokens])
        self.anchor_hidden = ctx.encode_prompts(p.anchors).hidden
        self.draws = DrawCounter(ctx.training.grad_accum)
        count = ctx.training.steps * self.draws.grad_accum
        g = ctx.generator
        self.erase_plan = stratified(count, len(self.erase_hidden), g)
        self.anchor_plan = stratified(count, len(self.anchor_hidden), g)
        self.k_plan = torch.randint(1, p.sampling_steps - 1, (count,), generator=g)

    def draw(self, ctx: EditContext, d: int) -> StereoDraw:
        """The latent, timestep, erase concept and anchor of REO draw ``d`` (sampled by the model being trained)."""
        e, a, k = int(self.erase_plan[d]), int(self.anchor_plan[d]), int(self.k_plan[d])
        seed = ctx.seed_for("stereo", "reo", d)
        x, t = self.partial(ctx, self.erase_hidden[e : e + 1], seed, k)
        return StereoDraw(x=x, t=t, k=k, erase=e, anchor=a, seed=seed)

    def reo_target(self, ctx: EditContext, s: StereoDraw) -> Tensor:
        """ε*(∅) + (g − 1) U(ε*(a)) + (−g − 1) mean_n U(ε*(c_n)) of the frozen reference, without gradients."""
        p = self.params
        hidden = torch.cat([self.empty, self.erase_hidden, self.anchor_hidden[s.anchor : s.anchor + 1]])
        n = hidden.shape[0]
        with torch.no_grad(), ctx.reference_weights(p.reference):
            preds = ctx.predict_noise(s.x.expand(n, -1, -1, -1), s.t.expand(n), hidden, frozen=True).float()
        g = p.compositional_guidance_scale
        erased = list(preds[1:-1].split(1))
        return compositional_guidance(
            preds[:1],
            [*erased, preds[-1:]],
            [-g] * len(erased) + [g],
            eta=p.apg_eta,
            norm_threshold=p.apg_norm_threshold,
        )

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        s = self.draw(ctx, self.draws(step))
        target = self.reo_target(ctx, s)
        pred = ctx.predict_noise(s.x, s.t, self.erase_hidden[s.erase : s.erase + 1]).float()
        return {"erase": F.mse_loss(pred, target)}


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Stereo)
