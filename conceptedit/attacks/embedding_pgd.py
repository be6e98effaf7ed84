"""Embedding PGD: projected gradient descent on the whole text-encoder output of a prompt.

Soft-prompt PGD moves a few token embeddings *before* the text encoder; this attack moves every
row of the encoder's *output* ``[1, L, D]``, which is what the denoiser's cross-attention reads,
inside an L∞ ball of radius ε around the clean encoding. It is the inner attack of RACE (Kim et
al., "R.A.C.E.: Robust Adversarial Concept Erasure for Secure Text-to-Image Diffusion Model",
ECCV 2024):

    h_0     = clip(h + u, lo, hi),  u ~ U[−ε, ε]^{L×D}                  (random_start; else h_0 = h)
    h_{i+1} = clip(h + clamp(h_i − α·sign(∇ objective(h_i)) − h, −ε, ε), lo, hi)

with ``lo``/``hi`` the smallest and largest value in the clean encoding ``h`` (``clamp_to_range``;
otherwise no clip), α = ``step_size`` (ε/4 when not given) and ``steps`` iterations. Each step
costs one forward and backward of the caller's objective and none of the text encoder, which is
why a training method can afford it every step. No position is singled out: ``slots`` is every
position, and the result has no nearer discrete prompt than the one it started from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conceptedit.api.adversary import AdversarialPrompt, Check, Objective
from conceptedit.api.backbone import BackboneAdapter
from conceptedit.errors import AttackError


class EmbeddingPGD:
    """L∞ PGD on a prompt's hidden states, within ``radius`` of the clean ones (see the module)."""

    kind = "embedding_pgd"

    def __init__(
        self,
        adapter: BackboneAdapter,
        *,
        radius: float = 0.1,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        clamp_to_range: bool = True,
        seed: int = 0,
    ) -> None:
        if steps < 1 or not radius > 0 or (step_size is not None and not step_size > 0):
            raise AttackError(
                f"embedding_pgd: steps must be at least 1 and radius and step_size positive "
                f"(got steps={steps}, radius={radius}, step_size={step_size})"
            )
        self.adapter = adapter
        self.radius, self.steps, self.seed = float(radius), int(steps), int(seed)
        self.step_size = float(step_size) if step_size is not None else self.radius / 4
        self.random_start, self.clamp_to_range = bool(random_start), bool(clamp_to_range)

    def attack(
        self, prompt: str, objective: Objective, *, check: Check | None = None, check_every: int | None = None
    ) -> AdversarialPrompt:
        """Encode ``prompt`` (this runs the text encoder) and attack its hidden states."""
        enc = self.adapter.encode_prompts([prompt])
        return self.attack_hidden(enc.hidden, objective, check=check, check_every=check_every, prompt=prompt)

    def attack_hidden(
        self,
        hidden: Tensor,
        objective: Objective,
        *,
        check: Check | None = None,
        check_every: int | None = None,
        prompt: str | None = None,
        seed: int | None = None,
    ) -> AdversarialPrompt:
        """Lower ``objective`` by moving ``hidden`` ``[1, L, D]`` (already encoded) within the ball.

        ``seed`` replaces the adversary's own seed for this call's random start (a training loop
        passes one per draw). With ``prompt`` the result records its token ids and embeddings;
        without, they are empty (``[1, 0]``, ``[1, 0, D]``) and the text encoder is not touched,
        so it may stay parked while a training loop runs.
        """
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        clean = hidden.detach().to(dtype)
        low, high = (clean.min(), clean.max()) if self.clamp_to_range else (None, None)
        adv = clean.clone()
        if self.random_start:
            generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
            start = torch.empty(clean.shape, dtype=dtype).uniform_(-self.radius, self.radius, generator=generator)
            adv = self._clip(adv + start.to(clean.device), low, high)
        losses: list[float] = []
        step = 0
        for step in range(1, self.steps + 1):
            adv.requires_grad_(True)
            with torch.enable_grad():
                loss = objective(adv)
            if not torch.isfinite(loss):
                raise AttackError(f"embedding_pgd: the objective is {float(loss)} at step {step}")
            (grad,) = torch.autograd.grad(loss, [adv])  # only the embedding: the model gets no gradient
            with torch.no_grad():
                moved = adv.detach() - self.step_size * grad.sign()
                adv = self._clip(clean + (moved - clean).clamp(-self.radius, self.radius), low, high)
            losses.append(float(loss.detach()))
            due = step % (check_every or self.steps) == 0 and step < self.steps
            if check is not None and due and check(self._found(adv, prompt, losses, step)):
                break
        return self._found(adv, prompt, losses, step)

    @staticmethod
    def _clip(values: Tensor, low: Tensor | None, high: Tensor | None) -> Tensor:
        return values if low is None else values.clamp(low, high)

    @torch.no_grad()
    def _found(self, adv: Tensor, prompt: str | None, losses: list[float], step: int) -> AdversarialPrompt:
        hidden = adv.detach().clone()
        if prompt is None:
            ids = torch.zeros((1, 0), dtype=torch.long)
            embeddings = hidden.new_zeros((1, 0, hidden.shape[-1]))
        else:
            ids = self.adapter.tokenize([prompt])
            table = self.adapter.token_embedding_table().detach()
            embeddings = table[ids.to(table.device)].float()
        slots = tuple(range(hidden.shape[1]))
        return AdversarialPrompt(ids, embeddings, hidden, slots, prompt or "", list(losses), step)

    def protocol(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "space": "text-encoder output, every position",
            "norm": "linf",
            "radius": self.radius,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "clamp_to_range": self.clamp_to_range,
            "start": "uniform in the ball (seeded)" if self.random_start else "the clean encoding",
        }
