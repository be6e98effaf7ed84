"""Ring-A-Bell: a concept vector from the text encoder alone, and a genetic search for a discrete
prompt that carries it (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for
Diffusion Models?", ICLR 2024; reference code MIT).

Black-box with respect to the denoiser: the attacker needs only a text encoder. The concept
vector is the mean difference of the encoder's outputs ``[77, D]`` over prompt pairs that differ
by the concept (:func:`concept_vector`); the target of one prompt is its own encoding plus
``strength`` times that vector (:func:`ring_a_bell_target`), and the search looks for ``length``
vocabulary tokens whose encoding is nearest the target in summed squared error
(:func:`~conceptedit.attacks.objectives.embedding_target_objective`). Found once on a base
model's encoder, the prompts transfer to every erased model that kept it.

The search follows the reference notebook: a population of random token strings
([SoT], ``length`` tokens, [EoT] padding); each generation keeps the fitter half, every kept
string may pair (``crossover_rate``) with a random other at one cut point, giving two children,
and then every string, kept ones included, may have one token replaced by a random one
(``mutation_rate``). The reference runs 200 strings for 3,000 generations; those are the
defaults here, and suites may ask for less (eval-learn uses 50 x 100).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from conceptedit.api.adversary import AdversarialPrompt, Check, Objective
from conceptedit.api.backbone import BackboneAdapter
from conceptedit.attacks.soft_prompt import prompt_text
from conceptedit.errors import AttackError


@torch.no_grad()
def concept_vector(adapter: BackboneAdapter, pairs: Sequence[tuple[str, str]]) -> Tensor:
    """Mean over ``(with the concept, without it)`` pairs of the difference of their encodings ``[77, D]``."""
    if not pairs:
        raise AttackError("ring_a_bell: the concept vector needs at least one (with, without) prompt pair")
    with_concept = adapter.encode_prompts([p[0] for p in pairs]).hidden.float()
    without = adapter.encode_prompts([p[1] for p in pairs]).hidden.float()
    return (with_concept - without).mean(0)


@torch.no_grad()
def ring_a_bell_target(adapter: BackboneAdapter, prompt: str, vector: Tensor, strength: float) -> Tensor:
    """The encoding a search for ``prompt`` aims at: its own plus ``strength`` x the concept vector."""
    return adapter.encode_prompts([prompt]).hidden.float() + strength * vector.unsqueeze(0).to(torch.float32)


class RingABell:
    """Genetic search over ``length`` discrete tokens for the prompt nearest the caller's target."""

    kind = "ring_a_bell"

    def __init__(
        self,
        adapter: BackboneAdapter,
        *,
        length: int = 16,
        population: int = 200,
        generations: int = 3000,
        mutation_rate: float = 0.25,
        crossover_rate: float = 0.5,
        seed: int = 0,
    ) -> None:
        if length < 1 or population < 2 or generations < 1:
            raise AttackError("ring_a_bell: length and generations must be at least 1, population at least 2")
        if not (0 <= mutation_rate <= 1 and 0 <= crossover_rate <= 1):
            raise AttackError("ring_a_bell: mutation_rate and crossover_rate are probabilities (0..1)")
        room = int(adapter.tokenize([""]).shape[1]) - 2
        if length > room:
            raise AttackError(f"ring_a_bell: length {length} does not fit the {room + 2}-token context; at most {room}")
        self.adapter = adapter
        self.length, self.population, self.generations = length, population, generations
        self.mutation_rate, self.crossover_rate, self.seed = mutation_rate, crossover_rate, seed

    @torch.no_grad()
    def attack(
        self, prompt: str, objective: Objective, *, check: Check | None = None, check_every: int | None = None
    ) -> AdversarialPrompt:
        """Search for the prompt whose encoding lowers ``objective`` most (the reference starts from random
        strings: ``prompt`` shapes only the caller's target, and names the attack in reports)."""
        g = torch.Generator().manual_seed(self.seed)
        allowed = self._allowed()
        template = self.adapter.tokenize([""])[0]  # [SoT] [EoT] padding
        strings = template.repeat(self.population, 1)
        strings[:, 1 : 1 + self.length] = allowed[
            torch.randint(0, len(allowed), (self.population, self.length), generator=g)
        ]
        strings[:, 1 + self.length] = int(self.adapter.tokenizer.eos_token_id)
        losses: list[float] = []
        generation = 0
        for generation in range(1, self.generations + 1):
            fitness = self._fitness(strings, objective)
            order = torch.argsort(fitness, stable=True)
            strings = strings[order[: self.population // 2]]
            losses.append(float(fitness[order[0]]))
            if generation == self.generations:
                break
            if (
                check is not None
                and check_every
                and generation % check_every == 0
                and check(self._found(strings[0], losses, generation))
            ):
                break
            strings = self._mutate(self._crossover(strings, g), allowed, g)
        return self._found(strings[0], losses, generation)

    def _allowed(self) -> Tensor:
        tokenizer = self.adapter.tokenizer
        vocabulary = int(self.adapter.token_embedding_table().shape[0])
        special = {
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            0,
        }  # the reference draws from 1
        return torch.tensor([i for i in range(vocabulary) if i not in special])

    def _fitness(self, strings: Tensor, objective: Objective) -> Tensor:
        table = self.adapter.token_embedding_table()
        hidden = self.adapter.encode_token_embeddings(strings, table[strings.to(table.device)])
        return torch.stack([objective(hidden[i : i + 1]).float().cpu() for i in range(hidden.shape[0])])

    def _crossover(self, parents: Tensor, g: torch.Generator) -> Tensor:
        """Each parent stays; with probability ``crossover_rate`` it and a random parent swap tails at a
        random cut among the searched positions, adding both children."""
        out = []
        for i in range(parents.shape[0]):
            out.append(parents[i])
            if float(torch.rand((), generator=g)) < self.crossover_rate:
                other = parents[int(torch.randint(0, parents.shape[0], (1,), generator=g))]
                cut = int(torch.randint(1, self.length + 1, (1,), generator=g))
                out.append(torch.cat([parents[i][:cut], other[cut:]]))
                out.append(torch.cat([other[:cut], parents[i][cut:]]))
        return torch.stack(out)

    def _mutate(self, strings: Tensor, allowed: Tensor, g: torch.Generator) -> Tensor:
        strings = strings.clone()
        for i in range(strings.shape[0]):
            if float(torch.rand((), generator=g)) < self.mutation_rate:
                at = int(torch.randint(1, self.length + 1, (1,), generator=g))
                strings[i, at] = allowed[int(torch.randint(0, len(allowed), (1,), generator=g))]
        return strings

    def _found(self, best: Tensor, losses: list[float], generation: int) -> AdversarialPrompt:
        ids = best.unsqueeze(0)
        table = self.adapter.token_embedding_table().detach()
        embeddings = table[ids.to(table.device)].float()
        hidden = self.adapter.encode_token_embeddings(ids, embeddings)
        slots = tuple(range(1, 1 + self.length))
        return AdversarialPrompt(
            ids, embeddings, hidden, slots, prompt_text(self.adapter, ids), list(losses), generation
        )

    def protocol(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "length": self.length,
            "population": self.population,
            "generations": self.generations,
            "mutation_rate": self.mutation_rate,
            "crossover_rate": self.crossover_rate,
            "fitness": "summed squared error to the target encoding (prompt + strength x concept vector)",
            "start": "random vocabulary tokens (seeded)",
        }
