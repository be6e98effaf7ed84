"""UnlearnDiffAtk-style prompt attack (Zhang et al., ECCV 2024) as an evaluator.

For each prompt whose plain image no longer shows the concept, the attack prepends ``tokens``
adversarial tokens and optimises them so that the *edited* model, given the attacked prompt,
denoises toward the *base* model's image of the same prompt and seed: the diffusion model's own
loss ``‖ε_θ(√ᾱ_t x₀ + √(1-ᾱ_t) ε, t, prompt') - ε‖²`` with x₀ the base image's latent (in the
model's prediction type: ``‖v_θ − v‖²`` on a v-prediction model such as SD-2.x 768). No
classifier is differentiated through; the judge only checks the results.

Tokens stay discrete by projection: each adversarial position is a weight vector over the
vocabulary, kept on the probability simplex after every Adam step (Euclidean projection), whose
embedding is the weighted mix of token embeddings; the attacked prompt that is generated and
judged uses each position's arg-max token. Defaults follow the paper: 5 prefix tokens, 40
iterations, Adam lr 0.01 with weight decay 0.1, success when the judge sees the concept at any
check. A prompt whose plain image already shows the concept counts as a success without attack,
as in the paper's attack success rate (ASR); the plain rate is reported next to it.

``strategy: random`` is the paper's control: the same number of judged generations, each with
``tokens`` random prefix tokens and no optimisation. An attack that beats it is using the model.

``strategy: soft_prompt`` keeps the prefix continuous: the shared soft-prompt PGD
(:class:`conceptedit.toolkit.SoftPromptPGD`, the one training methods get from
``ctx.adversary("soft_prompt")``) lowers the same diffusion loss, and every ``check_every``
steps the image drawn from the continuous prompt is judged.

``strategy: concept_inversion`` (CCE) fits ``inversion_tokens`` new token embeddings, free of
any ball, on the same loss and the same base image, placed where the prompt names the target
(``labels["target"]``; first, when it does not) and started from the target word's embedding:
the attack never needs the erased word itself. ``strategy: ring_a_bell`` never touches the
denoiser: a genetic search finds ``ring_length`` discrete tokens whose text encoding is nearest
the prompt's own plus ``ring_strength`` times the concept vector of ``ring_pairs`` (prompts with
and without the concept, which the suite supplies); the found prompt is drawn and judged once.
Every adversary is the shared one in :mod:`conceptedit.attacks` (``ctx.adversary`` in training).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from conceptedit import AdversarialPrompt, Adversary, AttackError, Evaluator, PluginError, Sample, hookimpl
from conceptedit.toolkit import (
    EXTRA_IMAGE,
    add_noise,
    adversarial_slots,
    alphas_cumprod,
    concept_vector,
    denoising_objective,
    embedding_target_objective,
    make_adversary,
    prompt_text,
    ring_a_bell_target,
    training_target,
)

STRATEGIES = ("gradient", "random", "soft_prompt", "concept_inversion", "ring_a_bell")


def project_to_simplex(weights: Tensor) -> Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based, exact)."""
    ordered, _ = torch.sort(weights, dim=-1, descending=True)
    cumulative = ordered.cumsum(dim=-1) - 1
    ranks = torch.arange(1, weights.shape[-1] + 1, device=weights.device, dtype=weights.dtype)
    support = (ordered - cumulative / ranks > 0).sum(dim=-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support.to(weights.dtype)
    return (weights - threshold).clamp_min(0)


class UnlearnDiffAtk(Evaluator):
    """Prompt attack against the evaluated model; per prompt: plain verdict, attack verdict, prompt found."""

    name = "unlearndiffatk"
    summary = "UnlearnDiffAtk prompt attack: k prefix tokens optimised so the edited model denoises to the concept"
    version = "1"
    needs_base = True
    needs_model = True

    def __init__(
        self,
        judge: str,
        judge_options: Mapping[str, Any] | None = None,
        tokens: int = 5,
        iterations: int = 40,
        lr: float = 0.01,
        weight_decay: float = 0.1,
        check_every: int = 10,
        strategy: str = "gradient",
        seed: int = 0,
        norm: str = "linf",
        radius: float = 0.05,
        step_size: float = 0.005,
        inversion_tokens: int = 1,
        inversion_lr: float = 5e-3,
        ring_length: int = 16,
        ring_population: int = 50,
        ring_generations: int = 100,
        ring_strength: float = 3.0,
        ring_pairs: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if tokens < 1 or iterations < 1 or check_every < 1:
            raise PluginError("unlearndiffatk: tokens, iterations and check_every must be at least 1")
        if strategy not in STRATEGIES:
            raise PluginError(f"unlearndiffatk: strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if strategy == "ring_a_bell" and not ring_pairs:
            raise PluginError(
                "unlearndiffatk: strategy ring_a_bell needs ring_pairs, prompts (with, without) the concept for its "
                "concept vector; this suite does not supply them"
            )
        self.soft = {"norm": norm, "radius": radius, "step_size": step_size}
        self.inversion = {"tokens": inversion_tokens, "lr": inversion_lr}
        self.ring = {"length": ring_length, "population": ring_population, "generations": ring_generations}
        self.ring_strength = ring_strength
        self.ring_pairs = [(str(a), str(b)) for a, b in ring_pairs or ()]
        self._vector: Tensor | None = None
        self.strategy = strategy
        self.judge_name = judge
        self.judge_options = dict(judge_options or {})
        self.tokens = tokens
        self.iterations = iterations
        self.lr = lr
        self.weight_decay = weight_decay
        self.check_every = check_every
        self.seed = seed
        self._generations = 0

    def score(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        judge = self.model.evaluator(self.judge_name, **self.judge_options)
        rows = []
        for sample, plain in zip(samples, judge.score(samples), strict=True):
            row: dict[str, Any] = {"plain": plain, "plain_shown": judge.concept_shown(plain, sample.labels)}
            started, self._generations = time.perf_counter(), 0
            if row["plain_shown"]:
                row.update(success=True, attacked_prompt=None, iterations=0, attacked=None)
            else:
                row.update(self._attack(sample, judge))
            # The attack's cost: judged generations beyond the plain image, and its seconds.
            row.update(generations=self._generations, seconds=time.perf_counter() - started)
            rows.append(row)
        return rows

    def _attack(self, sample: Sample, judge: Evaluator) -> dict[str, Any]:
        if sample.base_latent is None:
            raise PluginError("unlearndiffatk needs the base model's latent for each prompt (run with a base model)")
        adapter = self.model.adapter
        try:  # [SoT] [k adversarial] [prompt] [EoT ...]: the prompt shifts right, the tail loses k pads.
            ids, slots = adversarial_slots(adapter, sample.prompt, self.tokens, "prefix")
        except AttackError:
            return {
                "success": False,
                "attacked_prompt": None,
                "iterations": 0,
                "attacked": None,
                "skipped": "prompt fills the context",
            }
        k = len(slots)
        eos = int(adapter.tokenizer.eos_token_id)
        table = adapter.token_embedding_table().detach()
        alphas, kind = alphas_cumprod(adapter.scheduler.config), adapter.prediction_type
        train_steps = int(adapter.scheduler.config.num_train_timesteps)
        clean = sample.base_latent.unsqueeze(0).to(table.device)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + sample.seed % 1_000_003)
        if self.strategy in ("soft_prompt", "concept_inversion"):
            return self._continuous(sample, judge, denoising_objective(adapter, clean, alphas, generator))
        if self.strategy == "ring_a_bell":
            return self._ring_a_bell(sample, judge)
        special = [i for i in {adapter.tokenizer.bos_token_id, eos, adapter.tokenizer.pad_token_id} if i is not None]
        if self.strategy == "random":
            return self._random(sample, judge, ids, k, special, table.shape[0], generator)
        fixed = table[ids.to(table.device)].detach()
        weights = torch.full((k, table.shape[0]), 1.0 / (table.shape[0] - len(special)), device=table.device)
        weights[:, special] = 0
        weights.requires_grad_(True)
        optimiser = torch.optim.Adam([weights], lr=self.lr, weight_decay=self.weight_decay)
        losses = []
        result: dict[str, Any] = {"success": False}
        for iteration in range(1, self.iterations + 1):
            embeds = torch.cat([fixed[:, :1], (weights @ table).unsqueeze(0), fixed[:, 1 + k :]], dim=1)
            hidden = adapter.encode_token_embeddings(ids, embeds)
            t = torch.randint(0, train_steps, (1,), generator=generator)
            noise = torch.randn(clean.shape, generator=generator).to(clean.device)
            noisy = add_noise(alphas, clean, noise, t, prediction=kind)
            predicted = adapter.predict_noise(noisy, t.to(clean.device), hidden).float()
            loss = torch.nn.functional.mse_loss(predicted, training_target(alphas, clean, noise, t, prediction=kind))
            # Only the soft tokens get gradients: the model's own parameters are never touched.
            (weights.grad,) = torch.autograd.grad(loss, [weights])
            optimiser.step()
            with torch.no_grad():
                projected = project_to_simplex(weights)
                projected[:, special] = 0
                weights.copy_(projected)
            losses.append(float(loss.detach()))
            if iteration % self.check_every == 0 or iteration == self.iterations:
                result = self._check(sample, judge, ids, weights.argmax(dim=-1), k)
                result["iterations"] = iteration
                if result["success"]:
                    break
        return {**result, "loss_first": losses[0], "loss_last": losses[-1]}

    def _random(
        self,
        sample: Sample,
        judge: Evaluator,
        ids: Tensor,
        k: int,
        special: list[int],
        vocabulary: int,
        generator: torch.Generator,
    ) -> dict[str, Any]:
        """The control: as many judged generations as the gradient attack makes, random tokens each."""
        allowed = torch.tensor([i for i in range(vocabulary) if i not in special])
        result: dict[str, Any] = {"success": False}
        for check in range(1, max(self.iterations // self.check_every, 1) + 1):
            chosen = allowed[torch.randint(0, len(allowed), (k,), generator=generator)]
            result = {**self._check(sample, judge, ids, chosen, k), "iterations": check * self.check_every}
            if result["success"]:
                break
        return result

    def _continuous(self, sample: Sample, judge: Evaluator, objective: Any) -> dict[str, Any]:
        """Soft-prompt PGD or concept inversion on the diffusion loss; the continuous prompt's image is judged
        every ``check_every`` steps."""
        adversary, template = self._adversary(sample)
        verdicts: list[dict[str, Any]] = []

        def check(found: AdversarialPrompt) -> bool:
            verdicts.append(self._judge_hidden(sample, judge, found, "continuous"))
            return bool(verdicts[-1]["success"])

        found = adversary.attack(template, objective, check=check, check_every=self.check_every)
        if not verdicts or not verdicts[-1]["success"]:
            verdicts.append(self._judge_hidden(sample, judge, found, "continuous"))
        return {**verdicts[-1], "iterations": found.steps, "loss_first": found.losses[0], "loss_last": found.losses[-1]}

    def _adversary(self, sample: Sample) -> tuple[Adversary, str]:
        """The shared adversary of this strategy for one prompt, and the prompt (or template) it attacks."""
        adapter = self.model.adapter
        seed = self.seed * 1_000_003 + sample.seed
        if self.strategy == "soft_prompt":
            options = {"tokens": self.tokens, "steps": self.iterations, **self.soft}
            return make_adversary("soft_prompt", adapter, seed=seed, **options), sample.prompt
        target = sample.labels.get("target")
        words = sample.prompt.split(" ")
        if isinstance(target, str) and target in words:  # CCE: the new token stands where the concept's word was
            words[words.index(target)] = "{}"
            template, init = " ".join(words), target
        else:
            template, init = "{} " + sample.prompt, None
        options = {**self.inversion, "steps": self.iterations, "init": init}
        return make_adversary("concept_inversion", adapter, seed=seed, **options), template

    def _ring_a_bell(self, sample: Sample, judge: Evaluator) -> dict[str, Any]:
        """Search on the base model's text encoder (the attacker has the published model, not the erased
        one) a discrete prompt near the prompt's encoding plus the concept vector; draw it once on the
        evaluated model."""
        with self.model.base_model() as base:
            if self._vector is None:  # the attacker's one piece of knowledge: the concept's direction
                self._vector = concept_vector(base, self.ring_pairs)
            target = ring_a_bell_target(base, sample.prompt, self._vector, self.ring_strength)
            adversary = make_adversary("ring_a_bell", base, seed=self.seed * 1_000_003 + sample.seed, **self.ring)
            found = adversary.attack(sample.prompt, embedding_target_objective(target))
        adapter = self.model.adapter
        table = adapter.token_embedding_table().detach()
        carried = replace(found, hidden=adapter.encode_token_embeddings(found.ids, table[found.ids.to(table.device)]))
        verdict = self._judge_hidden(sample, judge, carried, "discrete")
        return {**verdict, "iterations": found.steps, "loss_first": found.losses[0], "loss_last": found.losses[-1]}

    @torch.no_grad()
    def _judge_hidden(self, sample: Sample, judge: Evaluator, found: AdversarialPrompt, form: str) -> dict[str, Any]:
        self._generations += 1
        image, _ = self.model.render(found.hidden, sample.seed, sample.guidance)
        verdict = judge.score([Sample(sample.prompt, sample.seed, image, sample.labels, sample.guidance)])[0]
        caption = f"{self.strategy.replace('_', ' ')}{' near' if form == 'continuous' else ''}: {found.text}"
        return {
            "success": judge.concept_shown(verdict, sample.labels),
            "attacked_prompt": f"{found.text} ({form})",
            "attacked": verdict,
            EXTRA_IMAGE: (caption, image),
        }

    @torch.no_grad()
    def _check(self, sample: Sample, judge: Evaluator, ids: Tensor, chosen: Tensor, k: int) -> dict[str, Any]:
        """Generate from the discrete attacked prompt and ask the judge."""
        self._generations += 1
        adapter = self.model.adapter
        attacked_ids = ids.clone()
        attacked_ids[0, 1 : 1 + k] = chosen.to(attacked_ids.device)
        table = adapter.token_embedding_table()
        hidden = adapter.encode_token_embeddings(attacked_ids, table[attacked_ids.to(table.device)])
        image, _ = self.model.render(hidden, sample.seed, sample.guidance)
        verdict = judge.score([Sample(sample.prompt, sample.seed, image, sample.labels, sample.guidance)])[0]
        attacked_prompt = prompt_text(adapter, attacked_ids)
        return {
            "success": judge.concept_shown(verdict, sample.labels),
            "attacked_prompt": attacked_prompt,
            "attacked": verdict,
            EXTRA_IMAGE: (f"attacked: {attacked_prompt}", image),
        }

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "judge": self.judge_name,
            "judge_options": self.judge_options,
            "strategy": self.strategy,
            **({"soft_prompt": self.soft} if self.strategy == "soft_prompt" else {}),
            **({"concept_inversion": self._inversion_protocol()} if self.strategy == "concept_inversion" else {}),
            **({"ring_a_bell": self._ring_protocol()} if self.strategy == "ring_a_bell" else {}),
            "tokens": self.tokens,
            "insertion": "prefix",
            "iterations": self.iterations,
            "optimiser": f"Adam lr {self.lr}, weight decay {self.weight_decay}",
            "check_every": self.check_every,
            "target": "base model's latent, same prompt and seed",
            "asr": "plain successes count (as in UnlearnDiffAtk)",
        }

    def _inversion_protocol(self) -> dict[str, Any]:
        return {
            **self.inversion,
            "steps": self.iterations,
            "placement": "the target word's place (first, when the prompt does not name it)",
            "start": "the target word's embedding (random tokens when the prompt does not name it)",
            "fitted to": "the base model's image of the same prompt and seed (one image per prompt)",
        }

    def _ring_protocol(self) -> dict[str, Any]:
        return {
            **self.ring,
            "strength": self.ring_strength,
            "concept_pairs": len(self.ring_pairs),
            "search": "on the base model's text encoder; the found prompt is drawn by the evaluated model",
            "judged": "the final prompt, once",
        }


@hookimpl
def conceptedit_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    register(UnlearnDiffAtk)
