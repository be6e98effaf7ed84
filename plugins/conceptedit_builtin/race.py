"""RACE (``race``): ESD trained against an attack on the concept's text embedding.

Kim, Min and Yang, "R.A.C.E.: Robust Adversarial Concept Erasure for Secure Text-to-Image
Diffusion Model", ECCV 2024 (arXiv 2405.16341); reference code: github.com/chkimmmmm/R.A.C.E.
(MIT), ``train-scripts/train-esd.py`` run with ``--adv_train``. Every training step is an ESD
step (the engine's ``NegativeGuidance``: the same latents, timestep pairing and target as
``esd``) whose concept embedding is attacked first:

    x_t, t, x_T   one draw: the latent, the timestep the UNet is fed, the trajectory's starting noise
    c             the concept prompt's text-encoder output [1, 77, D]
    c_adv         PGD in the L∞ ball ‖c' − c‖∞ ≤ ε, lowering ℓ(ε_θ(x_t, t, c'), x_T)
                  (ℓ: mean squared error, adv_loss l2, or mean absolute error, l1)
    target        ε*(x_t, t, ∅) − η (ε*(x_t, t, c) − ε*(x_t, t, ∅))          ε*: the frozen original
    L             ‖ε_θ(x_t, t, c_adv) − target‖²  [+ λ Σ_W mean|W − W₀|]     W₀: W at this edit's start

The attack looks near ``c`` for the embedding with which the model being trained, as it is at
this step, predicts the trajectory's starting noise best (the embedding that still leads back to
the concept); the step then applies ESD's target to that embedding, so the erasure holds in an
ε-neighbourhood of the concept's embedding and not only at the embedding itself. On a
v-prediction model (SD-2.x 768) ``x_T`` is compared in the model's terms, as the output that
predicts it at ``x_t`` (``output_from_noise``: ``(x_T − σ_t x_t)/α_t``); the target needs no change. The attack is
the ``embedding_pgd`` adversary (:class:`~conceptedit.toolkit.EmbeddingPGD`): random start in
the ball, ``attack_steps`` sign steps of ``attack_step_size`` (ε/4), each projected back into the
ball and clamped to [min, max] of ``c``'s values, as the reference's ``pgd_attack``.

RACE starts from an ESD-erased model (the reference's ``--pretrained_esd``) and keeps the
original model as ``ε*`` (its frozen model is always the original SD): in a recipe, an ``esd``
edit listed before ``race``, both with ``reference: base``. The lasso term (``--lasso``) pulls
the trained tensors toward their values at the start of this edit (the ESD model), as the
reference clones them after loading the ESD weights.

Where this departs from the reference (``docs/methods/race.md``):

* randomness is seeded: each draw's random start comes from its own seed
  (``ctx.seed_for("race", "attack", draw)``), its starting noise from ``ctx.seed_for("race",
  "noise", j)``; the reference draws both from the global generator;
* the adversary is made once, before training, and each draw passes its seed: asking
  ``ctx.adversary`` inside the loop would bring back the parked text encoder and VAE, which an
  attack on the encoder's output never runs;
* ``attack_steps`` is honoured; the reference parses ``--pgd_num_step`` but always takes 10;
* ``parameters`` has no default, as the reference's required ``--train_method``: use the set the
  ESD edit before it trained;
* one concept prompt (the reference can cycle several words split by ``--seperator``, as ESD's);
* the lasso keeps one copy of the trained tensors, as the reference does (memory: their size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor

from conceptedit import AdversarialPrompt, EditContext, EditError, EditMethod, TrainingConfig, hookimpl
from conceptedit.toolkit import (
    ESD_PARAMETER_SETS,
    EmbeddingPGD,
    EsdSample,
    EsdUnetParams,
    NegativeGuidance,
    alphas_cumprod,
    output_from_noise,
    select_parameter_set,
)


# The engine's negative-guidance fields (ESD's), with the reference script's defaults where they differ,
# and the attack's. (No docstring: it would become the recipe schema's description of these params.)
class RaceParams(EsdUnetParams):
    concept: str = Field(
        description="Prompt of the concept to erase, the one the esd edit before it erased (the bare word, "
        "e.g. 'nudity')."
    )
    parameters: Literal["x", "x-strict", "u", "full"] = Field(
        description="What trains; required, as the reference's --train_method: the set the esd edit before it "
        "trained. x = cross-attention (attn2) only; x-strict = attn2 keys and values; u = everything except "
        "cross-attention, time embedding and output head (ESD-u, nudity); full = the whole UNet.",
    )
    timestep_pairing: Literal["exact", "compvis"] = Field(
        "compvis",
        description="How x_t and the UNet's timestep pair up (see esd). compvis (default) = the reference script's: "
        "t ~ U[1000k/S, 1000(k+1)/S) on the latent its sampler leaves at that noise level; exact = the latent after "
        "k DDIM steps at its own timestep.",
    )
    epsilon: PositiveFloat = Field(
        0.1, description="L∞ radius ε of the attack on the concept's text embedding (reference --epsilon: 0.1)."
    )
    attack_steps: PositiveInt = Field(10, description="PGD steps per training step (the reference always takes 10).")
    attack_step_size: PositiveFloat | None = Field(None, description="PGD step size α (None: ε/4, the reference's).")
    adv_loss: Literal["l2", "l1"] = Field(
        "l2",
        description="Distance the attack lowers between the prediction and the trajectory's starting noise: "
        "l2 = mean squared error (reference default), l1 = mean absolute error.",
    )
    lasso: bool = Field(
        False, description="Add λ Σ mean|W − W₀| over the trained tensors, W₀ = their values at this edit's start."
    )
    lasso_lambda: NonNegativeFloat = Field(0.1, description="λ of the lasso term (the reference's 0.1).")


class RaceTraining(TrainingConfig):
    steps: int = Field(1000, gt=0, description="Optimiser steps (reference --iterations: 1000, batch 1).")
    lr: float = Field(1e-5, gt=0, description="Learning rate (reference --lr: 1e-5).")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adam", description="Optimiser (the reference's: Adam).")


class Race(EditMethod[RaceParams]):
    """RACE: ESD's loss on the concept embedding's worst case within an L∞ ball (see the module)."""

    name = "race"
    summary = "RACE: ESD trained on adversarial text embeddings of the concept, PGD in an L∞ ball (trajectory loss)"
    kind = "training"
    paper = (
        "Kim, Min & Yang, R.A.C.E.: Robust Adversarial Concept Erasure for Secure Text-to-Image Diffusion Model, "
        "ECCV 2024, arXiv:2405.16341"
    )
    Params = RaceParams
    unsupported_backbones: ClassVar[dict[str, str]] = {
        "sdxl": (
            "its attack perturbs text embeddings directly (embedding PGD), and a perturbed row has no"
            " pooled embedding of its own for SDXL's added conditioning"
        ),
        "flux": (
            "its attack perturbs the text rows directly (embedding PGD), and a perturbed row has no CLIP pooled "
            "vector of its own for FLUX's conditioning"
        ),
    }
    Training = RaceTraining

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        return select_parameter_set(ctx.adapter, ESD_PARAMETER_SETS[self.params.parameters])

    def prepare_training(self, ctx: EditContext) -> None:
        p = self.params
        self.guidance = NegativeGuidance(ctx, p, purpose="race")
        self.alphas = alphas_cumprod(ctx.pipeline.scheduler.config)
        adversary = ctx.adversary("embedding_pgd", radius=p.epsilon, steps=p.attack_steps, step_size=p.attack_step_size)
        if not isinstance(adversary, EmbeddingPGD):
            raise EditError(
                f"{ctx.label}: the embedding_pgd adversary is a {type(adversary).__name__}, not EmbeddingPGD"
            )
        self.adversary = adversary
        self.anchor: dict[str, Tensor] = {}
        if p.lasso:  # W₀: this edit's starting values, read from the ledger (the same after a resume)
            names = list(self.trainable_parameters(ctx))
            with torch.no_grad(), ctx.reference_weights("edit_start", names):
                self.anchor = {n: ctx.adapter.get_parameter(n).detach().clone() for n in names}

    def attack(self, ctx: EditContext, s: EsdSample, draw: int) -> AdversarialPrompt:
        """The concept embedding within ε that makes the current model predict ``x_T`` best at ``(x_t, t)``."""
        noise = self.guidance.start_noise(ctx, s.seed)
        start = output_from_noise(self.alphas, s.x, noise, s.t, prediction=ctx.adapter.prediction_type)
        distance = F.mse_loss if self.params.adv_loss == "l2" else F.l1_loss

        def objective(hidden: Tensor) -> Tensor:
            return distance(ctx.predict_noise(s.x, s.t, hidden, frozen=True).float(), start)

        seed = ctx.seed_for("race", "attack", draw)
        return self.adversary.attack_hidden(self.guidance.concept, objective, seed=seed)

    def lasso_term(self, ctx: EditContext) -> Tensor:
        """Σ over the trained tensors of mean |W − W₀| (torch's L1Loss per tensor, summed)."""
        return torch.stack([F.l1_loss(ctx.adapter.get_parameter(n), w0) for n, w0 in self.anchor.items()]).sum()

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        p = self.params
        draw = self.guidance.draws(step)
        s = self.guidance.sample(ctx, draw)
        target = self.guidance.target(ctx, s)
        found = self.attack(ctx, s, draw)
        pred = ctx.predict_noise(s.x, s.t, found.hidden).float()
        terms = {"erase": F.mse_loss(pred, target)}
        if p.lasso:
            terms["lasso"] = p.lasso_lambda * self.lasso_term(ctx)
        return terms


@hookimpl
def conceptedit_register_methods(register: Callable[[type[EditMethod]], None]) -> None:
    register(Race)
