"""Testbed v2 pieces that need no trained weights: caption noise, target-free priors, the attack
suite's prompt choice, and TRCE stage 2 over a concept set's own prompts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conceptedit_builtin.trce_steer import TrceSteer

from conceptedit.api.edits import PromptPair
from conceptedit.evaluation.metrics import attack_metrics
from conceptedit.models.builtin import CLIP_BOS_ID, CLIP_EOS_ID
from conceptedit.models.tokenizer import load_clip_tokenizer, tokenize
from conceptedit.plugins import get_host
from conceptedit.shapes.contexts import mentions
from conceptedit.shapes.noise import CaptionNoise, insert_tokens
from conceptedit.shapes.splits import HELD_OUT_CONTEXT_WORDS, benchmark_splits
from conceptedit.shapes.world import CONCEPTS, caption_phrases, captions, describe, sample_scene


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_clip_tokenizer()


def test_noise_tokens_are_never_a_world_word_or_a_special_token(tokenizer) -> None:  # type: ignore[no-untyped-def]
    noise = CaptionNoise(tokenizer, share=1.0, max_tokens=6)
    allowed = set(noise.allowed.tolist())
    world = {i for ids in tokenizer(list(caption_phrases())).input_ids for i in ids}
    assert not allowed & world and CLIP_BOS_ID not in allowed and CLIP_EOS_ID not in allowed
    assert tokenizer("red").input_ids[1] in world and tokenizer("a picture of").input_ids[1] in world
    assert len(allowed) > 0.99 * len(tokenizer) - len(world)  # everything else may be drawn
    # every phrase a caption can hold is in caption_phrases: 400 random captions add no token
    rng = np.random.default_rng(0)
    texts = [describe(sample_scene(rng), rng).text for _ in range(400)]
    assert {i for ids in tokenizer(texts).input_ids for i in ids} <= world | {CLIP_BOS_ID, CLIP_EOS_ID}


def test_noise_keeps_the_caption_in_order_and_the_length(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenize(tokenizer, ["a small red circle on the left"])[0]
    words = ids[1 : int((ids == CLIP_EOS_ID).nonzero()[0, 0])].tolist()
    tokens = torch.tensor([40000, 40001, 40002])
    assert not set(tokens.tolist()) & set(words)
    prefixed = insert_tokens(ids, tokens, prefix=True)
    assert prefixed.shape == ids.shape and prefixed[0] == CLIP_BOS_ID
    assert prefixed[1:4].tolist() == [40000, 40001, 40002] and prefixed[4 : 4 + len(words)].tolist() == words
    assert prefixed[4 + len(words)] == CLIP_EOS_ID
    scattered = insert_tokens(ids, tokens, prefix=False, rng=np.random.default_rng(3))
    kept = [t for t in scattered[1:].tolist() if t not in (40000, 40001, 40002, CLIP_EOS_ID)]
    assert kept == words and sorted(t for t in scattered.tolist() if t in tokens.tolist()) == [40000, 40001, 40002]
    assert scattered[1:4].tolist() != [40000, 40001, 40002]  # this seed scatters them
    long = tokenize(tokenizer, [" ".join(["red"] * 74)])[0]
    assert torch.equal(insert_tokens(long, tokens, prefix=True), long)  # it would not fit: unchanged


def test_noise_is_seeded_and_applied_to_its_share(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenize(tokenizer, ["a red circle"] * 400)
    noise = CaptionNoise(tokenizer, share=0.25, max_tokens=6)
    first = noise(ids, np.random.default_rng(7))
    assert torch.equal(first, noise(ids, np.random.default_rng(7)))
    changed = (first != ids).any(dim=1).float().mean().item()
    assert 0.18 < changed < 0.32, changed
    lengths = (first == CLIP_EOS_ID).float().argmax(dim=1) - (ids == CLIP_EOS_ID).float().argmax(dim=1)
    assert lengths.min() == 0 and lengths.max() <= 6 and set(lengths.unique().tolist()) <= set(range(7))


def test_a_prior_without_the_target_never_states_it() -> None:
    for target in ("red", "gray", "circle"):
        prior = captions(300, seed=1, without=target)
        assert len(prior) == 300
        named = [p for p in prior if any(mentions(p, phrase) for phrase in (target, *CONCEPTS[target].implicit))]
        assert not named, named[:3]
    assert captions(50, seed=1) == captions(50, seed=1) and any("red" in c for c in captions(300, seed=1))


def test_the_attack_suite_attacks_held_out_contexts_or_neighbours_with_a_stride() -> None:
    suite_cls = get_host().suite("shapes-attack")
    splits = benchmark_splits("red", per_phrasing=1, seed=0)
    contexts = suite_cls(suite_cls.Options(target="red", seeds=1, prompts="held-out contexts", stride=2))
    assert [p.text for p in contexts.prompts()] == list(splits["held-out contexts"].texts[::2])
    neighbours = suite_cls(suite_cls.Options(target="red", seeds=1, prompts="neighbours", stride=3))
    prompts = neighbours.prompts()
    assert [p.text for p in prompts] == list(splits["neighbours"].texts[::3])
    assert all(p.labels["target"] == "red" and p.labels["colour"] != "red" for p in prompts)  # chance: red by accident
    held_out = next(iter(HELD_OUT_CONTEXT_WORDS["position"]))
    assert contexts.overlap_with([f"a red circle {held_out}"]) and not contexts.overlap_with(["a red circle"])
    explicit = suite_cls(suite_cls.Options(target="red", seeds=1))
    assert explicit.overlap_with([f"a red circle {held_out}"]) == []
    assert contexts.scorer_options()["judge_options"] == {"strict": True}
    loose = suite_cls(suite_cls.Options(target="red", seeds=1, strict=False))
    assert loose.scorer_options()["judge_options"] == {"strict": False}


def test_the_shapes_judge_says_shown_strictly_when_asked() -> None:
    judge_cls = get_host().registry.evaluators["shapes-judge"]
    drifted = {"colour": "orange", "shape": "circle", "colours": ["orange"], "shapes": ["circle"], "hue": 15.0}
    assert not judge_cls().concept_shown(drifted, {"target": "red"})
    assert judge_cls(strict=True).concept_shown(drifted, {"target": "red"})
    assert judge_cls(strict=True).protocol()["concept_shown"] == "strict"


def test_attack_rates_carry_n_and_wilson_intervals() -> None:
    rows = [{"plain_shown": i < 1, "success": i < 3} for i in range(4)]
    metrics = attack_metrics(rows)
    assert metrics["attack_success_rate"] == 0.75 and metrics["attack_success_rate_n"] == 4
    assert metrics["attack_success_rate_low"] == pytest.approx(0.3006, abs=1e-4)
    assert metrics["attack_success_rate_high"] == pytest.approx(0.9544, abs=1e-4)
    assert metrics["plain_shown"] == 0.25 and metrics["attack_gain"] == 0.5


def test_trce_stage_2_can_sample_the_concept_sets_own_prompts() -> None:
    pairs = [
        PromptPair("a small crimson circle on the left", "a small gray circle on the left", "crimson", "gray"),
        PromptPair("a red square", "a gray square", "red", "gray"),
        PromptPair("a red square", "a gray square", "red", "gray"),
    ]
    ctx = SimpleNamespace(concept_pairs=lambda name: pairs)
    params = TrceSteer.Params.model_validate({"concepts": "red", "prompts": "pairs"})
    own = TrceSteer(params)._prompt_pairs(ctx)  # type: ignore[arg-type]
    assert own == [(pairs[0].source, pairs[0].target), (pairs[1].source, pairs[1].target)]
    template = TrceSteer.Params.model_validate({"concepts": "red", "prompt_template": "a photo of {}"})
    assert TrceSteer(template)._prompt_pairs(ctx) == [  # type: ignore[arg-type]
        ("a photo of crimson", "a photo of gray"),
        ("a photo of red", "a photo of gray"),
    ]


def test_following_rows_pair_each_token_after_the_concept_with_its_safe_counterpart(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from conceptedit_builtin.trce_eot import _following_rows

    from conceptedit.api.edits import PromptEncoding

    pairs = [
        PromptPair("a small crimson circle on the left", "a small gray circle on the left", "crimson", "gray"),
        PromptPair(
            "a circle the colour of blood, at the top",
            "a circle the colour of ash, at the top",
            "the colour of blood",
            "the colour of ash",
        ),
        PromptPair("a circle the colour of blood", "a gray circle", "the colour of blood", "gray"),  # tails differ
        PromptPair("a red cube", "a gray ball", "red", "gray"),  # the prompts do not continue alike: no rows
    ]

    def encode(texts: list[str]) -> PromptEncoding:
        ids = tokenize(tokenizer, texts)
        hidden = torch.arange(ids.numel() * 2, dtype=torch.float64).view(*ids.shape, 2)  # row = its position
        eot = (ids == CLIP_EOS_ID).int().argmax(1)
        return PromptEncoding(texts, ids, hidden, eot, CLIP_EOS_ID)

    malicious, safe = encode([p.source for p in pairs]), encode([p.target for p in pairs])
    ctx = SimpleNamespace(adapter=SimpleNamespace(token_ids=lambda t: tokenizer(t, add_special_tokens=False).input_ids))
    keys, targets = _following_rows(ctx, pairs, malicious, safe)  # type: ignore[arg-type]

    def rows(encoding: PromptEncoding, i: int, start: int, stop: int) -> torch.Tensor:
        return encoding.hidden[i, start:stop]

    # "a small crimson circle on the left": crimson (3), circle, on, the, left; [EoT] at 8
    # "a circle the colour of blood , at the top": blood (6) and ", at the top"; [EoT] at 11 (ash: the same)
    first = (rows(malicious, 0, 3, 8), rows(safe, 0, 3, 8))
    second = (rows(malicious, 1, 6, 11), rows(safe, 1, 6, 11))
    assert torch.equal(keys, torch.cat([first[0], second[0]])) and torch.equal(
        targets, torch.cat([first[1], second[1]])
    )
