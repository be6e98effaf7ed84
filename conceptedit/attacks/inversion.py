"""Concept inversion: learn new token embeddings that make the attacked model draw the concept.

Textual inversion turned into an attack (Pham et al., "Circumventing Concept Erasure Methods for
Text-to-Image Generative Models", ICLR 2024, "CCE"): on the *erased* model, ``tokens`` fresh
embeddings are fitted with Adam, free of any ball, so that a prompt holding them denoises images
of the concept (made by the base model) well. The caller's objective says which images (see
:func:`~conceptedit.attacks.objectives.denoising_objective`); the template says where the new
tokens sit: ``"a {} circle"`` puts them in the concept word's place, a template without ``{}``
gets them first. Erasures that only cut the link between a *word* and the concept fall to it,
because the attack never uses the word; the ones that remove the concept from the denoiser do not.

The learned rows are what a CCE user would save as an embedding file: :func:`encode_with_rows`
puts them into any other prompt (STEREO mines its next erasure target this way).

Written from the paper's description and the textual-inversion recipe (the CCE repository has no
licence): one optimiser over the new rows only, the rest of the text encoder and the denoiser
frozen; the start is a word's embedding (``init``) or seeded random vocabulary tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conceptedit.api.adversary import AdversarialPrompt, Check, Objective
from conceptedit.api.backbone import BackboneAdapter
from conceptedit.attacks.soft_prompt import prompt_text
from conceptedit.errors import AttackError

PLACEHOLDER = "{}"


def placeholder_slots(adapter: BackboneAdapter, template: str, k: int) -> tuple[Tensor, list[int]]:
    """Token ids ``[1, L]`` of ``template`` with ``k`` positions where its ``{}`` stands (first, if it
    has none), and those positions; the rest is tokenised as usual and padded as the encoder pads."""
    if template.count(PLACEHOLDER) > 1:
        raise AttackError(f"template {template!r} has more than one {PLACEHOLDER}: mark one place for the new tokens")
    before, _, after = template.partition(PLACEHOLDER) if PLACEHOLDER in template else ("", "", template)
    plain = adapter.tokenize([""])  # [SoT] [EoT] padding...: the encoder's own layout, whatever it pads with
    head = adapter.token_ids(before.strip()) if before.strip() else []
    tail = adapter.token_ids(after.strip()) if after.strip() else []
    length = plain.shape[1]
    words = len(head) + k + len(tail)
    if k < 1 or words > length - 2:
        raise AttackError(
            f"cannot place {k} new token(s) in {template!r}: the {length}-token context has room for "
            f"{length - 2 - len(head) - len(tail)}; shorten the template or ask for fewer tokens"
        )
    ids = plain.clone()
    body = torch.tensor([*head, *([0] * k), *tail], dtype=ids.dtype)
    ids[0, 1 : 1 + words] = body
    ids[0, 1 + words :] = plain[0, 1 : length - words]  # [EoT] then the encoder's padding
    return ids, list(range(1 + len(head), 1 + len(head) + k))


def encode_with_rows(adapter: BackboneAdapter, template: str, rows: Tensor) -> Tensor:
    """The text encoder's output for ``template`` with learned token embeddings ``rows`` ``[k, D]`` in
    its ``{}`` (or first): how an inverted concept is used in prompts it was not fitted on."""
    ids, slots = placeholder_slots(adapter, template, rows.shape[0])
    table = adapter.token_embedding_table().detach()
    embeds = table[ids.to(table.device)].float().clone()
    embeds[0, slots] = rows.to(embeds.device).float()
    return adapter.encode_token_embeddings(ids, embeds)


class ConceptInversion:
    """Textual inversion of ``tokens`` new embeddings on the attacked model (CCE)."""

    kind = "concept_inversion"

    def __init__(
        self,
        adapter: BackboneAdapter,
        *,
        tokens: int = 1,
        steps: int = 500,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        init: str | None = None,
        seed: int = 0,
    ) -> None:
        if tokens < 1 or steps < 1 or lr <= 0 or weight_decay < 0:
            raise AttackError("concept_inversion: tokens and steps must be at least 1, lr positive, weight_decay >= 0")
        if init is not None and not adapter.token_ids(init):
            raise AttackError(f"concept_inversion: init {init!r} has no tokens; give a word, or none for random tokens")
        self.adapter = adapter
        self.tokens, self.steps, self.lr, self.weight_decay, self.init, self.seed = (
            tokens,
            steps,
            lr,
            weight_decay,
            init,
            seed,
        )

    def attack(
        self, prompt: str, objective: Objective, *, check: Check | None = None, check_every: int | None = None
    ) -> AdversarialPrompt:
        """Fit the new rows of template ``prompt`` to lower ``objective``; stop early when ``check`` says so."""
        ids, slots = placeholder_slots(self.adapter, prompt, self.tokens)
        table = self.adapter.token_embedding_table().detach()
        fixed = table[ids.to(table.device)].detach().float()
        rows = self._start(table).clone().requires_grad_(True)
        optimiser = torch.optim.AdamW([rows], lr=self.lr, weight_decay=self.weight_decay)
        losses: list[float] = []
        step = 0
        for step in range(1, self.steps + 1):
            loss = objective(self.adapter.encode_token_embeddings(ids, self._embeds(fixed, rows, slots)))
            if not torch.isfinite(loss):
                raise AttackError(f"concept_inversion: the objective is {float(loss)} at step {step}")
            (rows.grad,) = torch.autograd.grad(loss, [rows])  # only the new rows learn
            optimiser.step()
            losses.append(float(loss.detach()))
            due = step % (check_every or self.steps) == 0 and step < self.steps
            if check is not None and due and check(self._found(ids, fixed, rows, slots, table, losses, step)):
                break
        return self._found(ids, fixed, rows, slots, table, losses, step)

    def _start(self, table: Tensor) -> Tensor:
        if self.init is not None:  # the word's (mean) embedding in every new row, as textual inversion starts
            word = table[torch.tensor(self.adapter.token_ids(self.init), device=table.device)].float().mean(0)
            return word.expand(self.tokens, -1)
        tokenizer = self.adapter.tokenizer
        special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        allowed = torch.tensor([i for i in range(table.shape[0]) if i not in special])
        generator = torch.Generator().manual_seed(self.seed)
        return table[allowed[torch.randint(0, len(allowed), (self.tokens,), generator=generator)]].float()

    @staticmethod
    def _embeds(fixed: Tensor, rows: Tensor, slots: list[int]) -> Tensor:
        at = torch.tensor(slots, device=fixed.device)
        return fixed.index_copy(1, at, rows.unsqueeze(0).to(fixed.dtype))

    @torch.no_grad()
    def _found(
        self, ids: Tensor, fixed: Tensor, rows: Tensor, slots: list[int], table: Tensor, losses: list[float], step: int
    ) -> AdversarialPrompt:
        embeddings = self._embeds(fixed, rows.detach(), slots)
        hidden = self.adapter.encode_token_embeddings(ids, embeddings)
        unit = torch.nn.functional.normalize(rows.detach(), dim=-1)
        nearest = ids.clone()
        nearest[0, slots] = (unit @ torch.nn.functional.normalize(table.float(), dim=-1).T).argmax(-1).to(ids.device)
        return AdversarialPrompt(
            nearest, embeddings, hidden, tuple(slots), prompt_text(self.adapter, nearest), list(losses), step
        )

    def protocol(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "tokens": self.tokens,
            "steps": self.steps,
            "optimiser": f"AdamW lr {self.lr}, weight decay {self.weight_decay}",
            "start": f"the embedding of {self.init!r}" if self.init else "random vocabulary tokens (seeded)",
            "ball": "none (textual inversion)",
        }
