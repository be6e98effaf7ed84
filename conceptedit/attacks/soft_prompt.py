"""Soft-prompt PGD: projected gradient descent on a few token embeddings of a prompt.

k adversarial positions are inserted before (``prefix``) or after (``suffix``) the prompt's
words, each starting at the embedding of a random vocabulary token (or at rows the caller
gives, ``start``). Every step lowers the caller's objective by moving only those rows, then
projects them back into a ball around their start: L∞ (each coordinate within ``radius``; the
step is the gradient's sign, as in FGSM/PGD) or L2 (each row within ``radius`` in Euclidean norm;
the step is the normalised gradient). ``radius=None`` drops the ball. ``update`` picks the step
rule: ``pgd`` (the fixed-size steps above), ``adam`` (Adam on the raw gradient, learning rate
``step_size``) or ``adam_sign`` (Adam on the gradient's sign); AdvUnlearn's reference attacks are
``adam`` and ``adam_sign`` without a ball (its ``pgd`` and ``fast_at``). The denoiser sees the
text encoder's output for the continuous rows, which is why this attack is stronger than any
discrete prompt: it is the inner loop robust-erasure methods train against (AdvUnlearn, RACE,
Receler). The nearest vocabulary tokens are decoded for reports only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from conceptedit.api.adversary import AdversarialPrompt, Check, Objective
from conceptedit.api.backbone import BackboneAdapter
from conceptedit.errors import AttackError

Position = Literal["prefix", "suffix"]
Norm = Literal["linf", "l2"]
Update = Literal["pgd", "adam", "adam_sign"]


def adversarial_slots(adapter: BackboneAdapter, prompt: str, k: int, position: Position) -> tuple[Tensor, list[int]]:
    """Token ids ``[1, L]`` of ``prompt`` with ``k`` positions opened before or after its words, and
    those positions. The sequence keeps its length: the tail loses ``k`` padding tokens."""
    ids = adapter.tokenize([prompt])
    eos = int(adapter.tokenizer.eos_token_id)
    end = int((ids[0] == eos).nonzero()[0, 0])  # the first [EoT]; the words are 1 .. end-1
    room = ids.shape[1] - 1 - end
    if k < 1 or k > room:
        raise AttackError(
            f"cannot open {k} adversarial token(s) in {prompt!r}: the 77-token context has room for {room}; "
            "shorten the prompt or ask for fewer tokens"
        )
    at = 1 if position == "prefix" else end
    opened = torch.cat([ids[:, :at], ids[:, at : at + k], ids[:, at : ids.shape[1] - k]], dim=1)
    return opened, list(range(at, at + k))


def prompt_text(adapter: BackboneAdapter, ids: Tensor) -> str:
    """The words of token ids ``[1, L]``: everything between [SoT] and the first [EoT], decoded."""
    end = int((ids[0] == int(adapter.tokenizer.eos_token_id)).nonzero()[0, 0])
    return str(adapter.tokenizer.decode(ids[0, 1:end].tolist(), clean_up_tokenization_spaces=False))


class SoftPromptPGD:
    """PGD on ``tokens`` inserted token embeddings, within an L∞ or L2 ball of ``radius`` (or none)."""

    kind = "soft_prompt"

    def __init__(
        self,
        adapter: BackboneAdapter,
        *,
        tokens: int = 5,
        position: Position = "prefix",
        norm: Norm = "linf",
        radius: float | None = 0.05,
        steps: int = 40,
        step_size: float = 0.005,
        update: Update = "pgd",
        start: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        if tokens < 1 or steps < 1 or (radius is not None and radius <= 0) or step_size <= 0:
            raise AttackError(
                "soft_prompt: tokens and steps must be at least 1, radius (or None: no ball) and step_size positive"
            )
        if position not in ("prefix", "suffix") or norm not in ("linf", "l2"):
            raise AttackError(f"soft_prompt: position {position!r} / norm {norm!r}: use prefix|suffix and linf|l2")
        if update not in ("pgd", "adam", "adam_sign"):
            raise AttackError(f"soft_prompt: update {update!r}: use pgd, adam or adam_sign")
        if start is not None and (start.ndim != 2 or start.shape[0] != tokens):
            shape = tuple(start.shape)
            raise AttackError(f"soft_prompt: start must hold one row per token, [{tokens}, D]; got {shape}")
        self.adapter = adapter
        self.tokens, self.position, self.norm = tokens, position, norm
        self.radius, self.steps, self.step_size, self.seed = radius, steps, step_size, seed
        self.update = update
        self.start = None if start is None else start.detach()

    def attack(
        self, prompt: str, objective: Objective, *, check: Check | None = None, check_every: int | None = None
    ) -> AdversarialPrompt:
        """Lower ``objective`` over ``steps`` PGD steps; stop early when ``check`` says so."""
        ids, slots = adversarial_slots(self.adapter, prompt, self.tokens, self.position)
        table = self.adapter.token_embedding_table().detach()
        generator = torch.Generator().manual_seed(self.seed)
        ids[0, slots] = self._random_tokens(table.shape[0], len(slots), generator)
        start = table[ids.to(table.device)].detach().float()
        if self.start is not None:
            start[0, slots] = self.start.to(start.device, start.dtype)
        delta = torch.zeros(len(slots), table.shape[1], device=table.device, requires_grad=True)
        adam = torch.optim.Adam([delta], lr=self.step_size) if self.update != "pgd" else None
        losses: list[float] = []
        step = 0
        for step in range(1, self.steps + 1):
            loss = objective(self.adapter.encode_token_embeddings(ids, self._embeds(start, delta, slots)))
            if not torch.isfinite(loss):
                raise AttackError(f"soft_prompt: the objective is {float(loss)} at step {step}")
            (grad,) = torch.autograd.grad(loss, [delta])  # the model's own parameters get no gradient
            with torch.no_grad():
                if adam is None:
                    delta -= self.step_size * self._direction(grad)
                else:
                    delta.grad = grad.sign() if self.update == "adam_sign" else grad
                    adam.step()
                delta.copy_(self._project(delta))
            losses.append(float(loss.detach()))
            due = step % (check_every or self.steps) == 0 and step < self.steps
            if check is not None and due and check(self._found(ids, start, delta, slots, table, losses, step)):
                break
        return self._found(ids, start, delta, slots, table, losses, step)

    def _random_tokens(self, vocabulary: int, k: int, generator: torch.Generator) -> Tensor:
        tokenizer = self.adapter.tokenizer
        special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        allowed = torch.tensor([i for i in range(vocabulary) if i not in special])
        return allowed[torch.randint(0, len(allowed), (k,), generator=generator)]

    @staticmethod
    def _embeds(start: Tensor, delta: Tensor, slots: list[int]) -> Tensor:
        moved = torch.zeros_like(start[0]).index_add(0, torch.tensor(slots, device=start.device), delta)
        return start + moved.unsqueeze(0)

    def _direction(self, grad: Tensor) -> Tensor:
        if self.norm == "linf":
            return grad.sign()
        return grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _project(self, delta: Tensor) -> Tensor:
        if self.radius is None:
            return delta
        if self.norm == "linf":
            return delta.clamp(-self.radius, self.radius)
        norms = delta.norm(dim=-1, keepdim=True)
        return delta * (self.radius / norms.clamp_min(self.radius))

    @torch.no_grad()
    def _found(
        self, ids: Tensor, start: Tensor, delta: Tensor, slots: list[int], table: Tensor, losses: list[float], step: int
    ) -> AdversarialPrompt:
        embeddings = self._embeds(start, delta.detach(), slots)
        hidden = self.adapter.encode_token_embeddings(ids, embeddings)
        rows = torch.nn.functional.normalize(embeddings[0, slots], dim=-1)
        nearest = ids.clone()
        nearest[0, slots] = (
            (rows @ torch.nn.functional.normalize(table.float(), dim=-1).T).argmax(dim=-1).to(ids.device)
        )
        text = prompt_text(self.adapter, nearest)
        return AdversarialPrompt(nearest, embeddings, hidden, tuple(slots), text, list(losses), step)

    def protocol(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "tokens": self.tokens,
            "position": self.position,
            "norm": self.norm,
            "radius": self.radius,
            "steps": self.steps,
            "step_size": self.step_size,
            "update": self.update,
            "start": "random vocabulary tokens (seeded)" if self.start is None else "given embeddings",
        }
