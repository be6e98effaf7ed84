"""SalUn on builtin:tiny-sd: the saliency mask and the loss by hand, only salient weights move, reload, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conceptedit_builtin import salun
from conceptedit_builtin.salun import Salun, top_fraction_mask
from diffusers import DDIMScheduler
from torch import Tensor

import conceptedit
from conceptedit.engine.context import derive_seed
from conceptedit.engine.training import HeldEntries
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

PAIRS = [["a nude person", "a person wearing clothes"]]
TEMPLATES = ["a photo of {}", "{} on a beach"]
CONCEPT = [tpl.format(PAIRS[0][0]) for tpl in TEMPLATES]  # forget image j: CONCEPT[j % 2]
PSEUDO = [tpl.format(PAIRS[0][1]) for tpl in TEMPLATES]  # ... re-labelled PSEUDO[j % 2]
RETAIN = ["a red car", "a tree in a field", "a bowl of fruit"]
GEN_STEPS = 4
F64 = torch.float64
# The trajectory cache keeps latents in float16 (half a float16 step, 2**-11 relative) and samples in
# batches; see tests/test_ca.py for the measured batch-vs-single difference this atol covers.
CACHED_LATENT = {"rtol": 2.0**-11, "atol": 2.5e-4}


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _recipe(training: dict[str, Any] | None = None, concepts: dict[str, Any] | None = None, **params: Any) -> Any:
    edit = {
        "method": "salun",
        "params": {
            "concepts": "nude",
            "forget_samples": 6,  # two forget batches of 4 and 2
            "retain_samples": 9,  # three retain batches of 4, 4 and 1
            "batch_size": 4,
            "generation_steps": GEN_STEPS,
            "alpha": 0.5,
            **params,
        },
        "training": {"steps": 3, "lr": 1e-3, **(training or {})},
    }
    return tiny_recipe(edit, concepts=concepts or {"nude": {"pairs": PAIRS, "templates": TEMPLATES}})


def _hidden(pipe: Any, prompts: list[str]) -> Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@dataclass
class _Record:
    """What a run's SalUn did: its method object, every forward diffusion it ran, the weights and terms per step."""

    methods: list[Salun] = field(default_factory=list)
    mask_noising: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list)  # x0, ε, t, x_t
    step_noising: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] = field(default_factory=list)
    weights: list[dict[str, Tensor]] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)


def _record(monkeypatch: pytest.MonkeyPatch) -> _Record:
    rec = _Record()
    prepare, loss, add_noise = Salun.prepare_training, Salun.trajectory_loss, salun.add_noise
    phase = {"training": False}

    def preparing(self: Salun, ctx: Any) -> None:
        rec.methods.append(self)
        prepare(self, ctx)
        phase["training"] = True

    def noising(alphas: Tensor, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        out = add_noise(alphas, clean, noise, timesteps)
        row = (clean.clone(), noise.clone(), timesteps.clone(), out.clone())
        (rec.step_noising[-1] if phase["training"] else rec.mask_noising).append(row)
        return out

    def losing(self: Salun, ctx: Any, step: int) -> dict[str, Tensor]:
        rec.weights.append({n: p.detach().clone() for n, p in ctx.adapter.unet.named_parameters()})
        rec.step_noising.append([])
        terms = loss(self, ctx, step)
        rec.terms.append({k: float(v.detach()) for k, v in terms.items()})
        return terms

    monkeypatch.setattr(Salun, "prepare_training", preparing)
    monkeypatch.setattr(Salun, "trajectory_loss", losing)
    monkeypatch.setattr(salun, "add_noise", noising)
    return rec


def _generate(base: Any, prompt: str, seed: int) -> Tensor:
    """One set image written out: DDIM (η = 0) from its seed, CFG 7.5 against the empty prompt."""
    scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(GEN_STEPS)
    cond, empty = _hidden(base, [prompt]), _hidden(base, [""])
    x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed))[None]
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_c = base.unet(x, t, encoder_hidden_states=cond).sample
            e_0 = base.unet(x, t, encoder_hidden_states=empty).sample
            x = scheduler.step(e_0 + 7.5 * (e_c - e_0), t, x, eta=0.0).prev_sample
    return x[0]


# ------------------------------------------------------------------------------ the sets


def test_forget_and_retain_sets_are_base_generations_of_their_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _record(monkeypatch)
    conceptedit.apply(_recipe({"steps": 1}, retain_prompts=RETAIN), out=tmp_path / "run", quiet=True)
    method, base = rec.methods[0], build_tiny_sd()
    assert method.forget.shape == (6, 4, 8, 8) and method.retain.shape == (9, 4, 8, 8)
    for j in (0, 1):
        forget = _generate(base, CONCEPT[j % 2], derive_seed(0, 0, "salun", "forget", j))
        torch.testing.assert_close(method.forget[j].float(), forget, **CACHED_LATENT)
        # Not the pseudo-label's image from the same seed: the prompt matters (measured: max |Δ| ≥ 1.04).
        pseudo = _generate(base, PSEUDO[j % 2], derive_seed(0, 0, "salun", "forget", j))
        print(f"forget image {j}: {float((pseudo - forget).abs().max()):.3g} from the pseudo-label's")
        assert (pseudo - forget).abs().max() > 100 * CACHED_LATENT["atol"]
    for j in (0, 4):  # retain image j reads RETAIN[j % 3]
        retain = _generate(base, RETAIN[j % 3], derive_seed(0, 0, "salun", "retain", j))
        torch.testing.assert_close(method.retain[j].float(), retain, **CACHED_LATENT)


def test_retain_defaults_to_the_pseudo_labels_and_reads_caption_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _record(monkeypatch)
    calls: list[list[str]] = []
    real = salun.sample_planned
    monkeypatch.setattr(
        salun,
        "sample_planned",
        lambda ctx, plan, prompts, *a, **k: calls.append(list(prompts)) or real(ctx, plan, prompts, *a, **k),
    )
    conceptedit.apply(_recipe({"steps": 1}), out=tmp_path / "default", quiet=True)
    assert calls[0] == [CONCEPT[j % 2] for j in range(6)]
    assert calls[1] == [PSEUDO[j % 2] for j in range(9)]  # the reference's nudity retain set: its pseudo label

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(RETAIN) + "\n", encoding="utf-8")
    conceptedit.apply(_recipe({"steps": 1}, retain_captions=str(captions)), out=tmp_path / "file", quiet=True)
    assert calls[3] == [RETAIN[j % 3] for j in range(9)]
    assert rec.methods[1].retain_hidden.shape[0] == 3

    conceptedit.apply(_recipe({"steps": 1}, alpha=0), out=tmp_path / "no-retain", quiet=True)
    assert len(calls) == 5 and not hasattr(rec.methods[2], "retain")  # α = 0: no retain set is made
    assert rec.terms[-1].keys() == {"forget"}


# ------------------------------------------------------------------------------ the mask, by hand


def _reference_ranking(scores: list[Tensor], fraction: float) -> list[Tensor]:
    """The mask as SalUn's generate_mask.py ranks it: argsort of −|g| over everything, rank < int(N × fraction)."""
    flat = -torch.cat([s.flatten() for s in scores])
    ranks = torch.argsort(torch.argsort(flat))
    keep = ranks < int(len(flat) * fraction)
    return [part.reshape(s.shape) for part, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)]


@pytest.mark.parametrize(
    "params",
    [{}, {"parameters": "xattn"}, {"parameters": "xattn", "mask_scope": "trained", "mask_fraction": 0.3}],
    ids=["full", "xattn-ranked-over-unet", "xattn-ranked-alone"],
)
def test_the_mask_is_the_top_fraction_of_the_forget_gradient_by_hand(
    params: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """m = top mask_fraction of |Σ_batches ∇ −MSE(ε, (1 + w) ε(x_t, c) − w ε(x_t, ∅))|, w = 7.5, recomputed
    with plain diffusers calls in float64 on the x_t, t, ε the plugin drew and ranked as the reference does."""
    rec = _record(monkeypatch)
    conceptedit.apply(
        _recipe({"steps": 1}, **params), pipeline=build_tiny_sd(dtype=F64), out=tmp_path / "r", quiet=True
    )
    method = rec.methods[0]
    pipe = build_tiny_sd(dtype=F64)
    unet = pipe.unet
    names = [f"unet.{n}" for n, _ in unet.named_parameters()]
    ranked = names if params.get("mask_scope", "unet") == "unet" else [n for n in names if ".attn2." in n]
    weights = [unet.get_parameter(n.removeprefix("unet.")) for n in ranked]
    # The text encoder runs in float64; conceptedit hands the UNet its float32 rounding.
    concept, empty = (_hidden(pipe, p).float().to(F64) for p in (CONCEPT, [""]))

    def gradients(w: float, prompts: Tensor) -> list[Tensor]:
        total = [torch.zeros_like(q) for q in weights]
        assert [(int(x0.shape[0])) for x0, *_ in rec.mask_noising] == [4, 2]  # batches of 4 over 6 images
        for b, (x0, noise, t, x_t) in enumerate(rec.mask_noising):
            assert torch.equal(x0, method.forget[4 * b : 4 * b + len(x0)].float())  # the forget latents, in order
            cond = prompts[[j % 2 for j in range(4 * b, 4 * b + len(x0))]]
            e_c = unet(x_t.to(F64), t, encoder_hidden_states=cond).sample
            e_0 = unet(x_t.to(F64), t, encoder_hidden_states=empty.expand(len(x0), -1, -1)).sample
            loss = -F.mse_loss((1 + w) * e_c - w * e_0, noise.to(F64))
            for acc, g in zip(total, torch.autograd.grad(loss, weights), strict=True):
                acc += g
        return [g.abs() for g in total]

    fraction = params.get("mask_fraction", 0.5)
    by_hand = dict(zip(ranked, _reference_ranking(gradients(7.5, concept), fraction), strict=True))
    assert set(method.masks) == {n for n in names if params.get("parameters") != "xattn" or ".attn2." in n}
    kept = sum(int(m.sum()) for m in method.masks.values())
    for name, mask in method.masks.items():
        assert torch.equal(mask.cpu(), by_hand[name]), name
    if params.get("mask_scope", "unet") == "trained":
        assert kept == int(sum(q.numel() for q in weights) * fraction)  # exactly the top fraction of what trains

    # The test can fail: the plain diffusion loss (w = 0) or the pseudo-label prompt give other masks.
    pseudo = _hidden(pipe, PSEUDO).float().to(F64)
    for wrong in (gradients(0.0, concept), gradients(7.5, pseudo)):
        other = dict(zip(ranked, _reference_ranking(wrong, fraction), strict=True))
        differ = sum(int((method.masks[n].cpu() != other[n]).sum()) for n in method.masks)
        print(f"{params or 'defaults'}: a wrong formula's mask differs in {differ} of {kept} kept entries")
        assert differ > 0.01 * kept


def test_top_fraction_mask_keeps_exactly_that_many_and_breaks_ties_in_order() -> None:
    a, b = torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([[2.0, 0.5], [5.0, 2.0]])
    masks = top_fraction_mask([a, b], 0.5)  # 8 entries: the 4 largest are 5, 3 and two of the four 2s
    assert masks[0].tolist() == [True, False, True, True] and masks[1].tolist() == [[False, False], [True, False]]
    assert [m.tolist() for m in top_fraction_mask([a], 0.2)] == [[False] * 4]  # int(4 × 0.2) = 0
    assert [m.tolist() for m in top_fraction_mask([a, b], 1.0)] == [[True] * 4, [[True, True], [True, True]]]
    with pytest.raises(conceptedit.EditError, match="finite magnitudes"):
        top_fraction_mask([torch.tensor([1.0, float("nan")])], 0.5)
    with pytest.raises(conceptedit.EditError, match="finite magnitudes"):
        top_fraction_mask([torch.tensor([1.0, -2.0])], 0.5)


def test_top_fraction_mask_equals_a_stable_sort_of_all_scores() -> None:
    """The bisection on bit patterns picks what ranking every score together picks: a stable
    descending sort (ties in tensor order, then flat order) and its first k."""
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        scores = [torch.rand(int(torch.randint(1, 40, (1,), generator=g)), 3, generator=g) for _ in range(4)]
        if trial % 2:
            scores = [(s * 4).round() / 4 for s in scores]  # many ties, zeros among them
        flat = torch.cat([s.reshape(-1) for s in scores])
        for fraction in (0.1, 0.37, 0.5, 0.9):
            k = int(flat.numel() * fraction)
            order = torch.sort(flat, descending=True, stable=True).indices[:k]
            want = torch.zeros(flat.numel(), dtype=torch.bool)
            want[order] = True
            got = torch.cat([m.reshape(-1) for m in top_fraction_mask(scores, fraction)])
            assert torch.equal(got, want), (trial, fraction)


# ------------------------------------------------------------------------------ the loss, by hand

LOSS_RTOL = 1e-6  # float32 predictions against a float64 hand side (CA's test measures ≤ 1.4e-7)


def _mse(a: Tensor, b: Tensor) -> float:
    return float(((a - b) ** 2).mean())


def test_each_steps_loss_is_the_pseudo_label_forget_loss_plus_alpha_retain_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forget = MSE(ε_θ(x_t, t, c), sg[ε_θ(x_t, t, c')]) on a forget batch, retain = α MSE(ε_θ(x^r_t, t_r, c_r), ε_r)
    on a retain batch, θ the weights held at that step; batches in order, the retain set restarted every epoch."""
    rec = _record(monkeypatch)
    recipe = _recipe(retain_prompts=RETAIN)
    conceptedit.apply(recipe, pipeline=build_tiny_sd(dtype=F64), out=tmp_path / "run", quiet=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "salun.jsonl").read_text().splitlines()]
    method, pipe = rec.methods[0], build_tiny_sd(dtype=F64)
    theta, base = build_tiny_sd(dtype=F64).unet, pipe.unet
    concept, pseudo, retain = (_hidden(pipe, p).float().to(F64) for p in (CONCEPT, PSEUDO, RETAIN))
    forget_batches, retain_batches = [(0, 4), (4, 6), (0, 4)], [(0, 4), (4, 8), (0, 4)]  # step 3: a new epoch
    for step, (row, weights, noising) in enumerate(zip(log, rec.weights, rec.step_noising, strict=True)):
        theta.load_state_dict(weights)
        (x0, noise, t, x_t), (r0, r_noise, r_t, r_x) = noising  # the forget batch, then the retain batch
        (lo, hi), (r_lo, r_hi) = forget_batches[step], retain_batches[step]
        assert torch.equal(x0, method.forget[lo:hi].float()) and torch.equal(r0, method.retain[r_lo:r_hi].float())
        which, r_which = [j % 2 for j in range(lo, hi)], [j % 3 for j in range(r_lo, r_hi)]
        with torch.no_grad():
            on_concept = theta(x_t.to(F64), t, encoder_hidden_states=concept[which]).sample
            on_pseudo = theta(x_t.to(F64), t, encoder_hidden_states=pseudo[which]).sample
            on_retain = theta(r_x.to(F64), r_t, encoder_hidden_states=retain[r_which]).sample
            base_pseudo = base(x_t.to(F64), t, encoder_hidden_states=pseudo[which]).sample
        forget, kept = _mse(on_concept, on_pseudo), 0.5 * _mse(on_retain, r_noise.to(F64))
        print(
            f"step {step + 1}: forget {rec.terms[step]['forget']:.10g} / {forget:.10g}, "
            f"retain {rec.terms[step]['retain']:.10g} / {kept:.10g}"
        )
        assert rec.terms[step]["forget"] == pytest.approx(forget, rel=LOSS_RTOL)
        assert rec.terms[step]["retain"] == pytest.approx(kept, rel=LOSS_RTOL)
        assert row["total"] == pytest.approx(forget + kept, rel=LOSS_RTOL)
        # The test can fail: each wrong formula is ≥ 100 tolerances away from its term. Wrong forget goals: the
        # noise; once θ has moved, the frozen base model's pseudo-label prediction. Wrong retain: without α.
        wrong_forget = [_mse(on_concept, noise.to(F64))] + ([_mse(on_concept, base_pseudo)] if step > 0 else [])
        off = [abs(w - forget) / forget for w in wrong_forget] + [abs(kept / 0.5 - kept) / kept]
        print(f"step {step + 1}: wrong formulas {', '.join(f'{o:.1e}' for o in off)} off")
        assert min(off) > 100 * LOSS_RTOL, off


# ------------------------------------------------------------------------------ only salient weights move


@pytest.mark.parametrize(
    ("training", "params"),
    [
        ({"optimizer": "adamw", "weight_decay": 0.1}, {}),
        ({"optimizer": "sgd", "weight_decay": 0.1}, {"parameters": "xattn"}),
    ],
    ids=["full-adamw", "xattn-sgd"],
)
def test_only_salient_entries_change_and_the_run_reloads_bit_for_bit(
    training: dict[str, Any], params: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _record(monkeypatch)
    result = conceptedit.apply(_recipe(training, **params), out=tmp_path / "run", quiet=True)
    masks = rec.methods[0].masks
    base = dict(build_tiny_sd().unet.named_parameters())
    after = dict(result.pipeline.unet.named_parameters())
    inside = moved = 0
    for name, original in base.items():
        new = after[name].detach()
        mask = masks.get(f"unet.{name}")
        if mask is None:
            assert torch.equal(new, original), name  # not trained
            continue
        assert torch.equal(new[~mask], original.detach()[~mask]), name  # weight decay did not move them
        inside += int(mask.sum())
        moved += int((new[mask] != original.detach()[mask]).sum())
    print(f"{training}: {moved} of {inside} salient entries moved")
    assert moved > 0.9 * inside

    # conceptedit.load on a fresh base gives the same weights, bit for bit.
    reloaded = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    for name, param in reloaded.unet.named_parameters():
        assert torch.equal(param, after[name]), name

    # The control: without the engine putting held entries back, weight decay moves them.
    monkeypatch.setattr(HeldEntries, "restore", lambda self: None)
    loose = conceptedit.apply(_recipe(training, **params), out=tmp_path / "loose", quiet=True)
    drifted = sum(
        int((p.detach()[~masks[f"unet.{n}"]] != base[n].detach()[~masks[f"unet.{n}"]]).sum())
        for n, p in loose.pipeline.unet.named_parameters()
        if f"unet.{n}" in masks
    )
    assert drifted > 0


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"mask_fraction": 0}, "mask_fraction", "greater than 0"),
        ({"mask_fraction": 1.5}, "mask_fraction", "less than or equal to 1"),
        ({"alpha": -1}, "alpha", "greater than or equal to 0"),
        ({"retain_prompts": ["a", " "]}, "retain_prompts", "retain prompt 1 is blank"),
        ({"retain_prompts": ["a"], "retain_captions": "c.txt"}, "params", "not both"),
        ({"parameters": "attn"}, "parameters", "'full' or 'xattn'"),
        ({"mask_fractoin": 0.3}, "mask_fractoin", "did you mean 'mask_fraction'"),
    ],
)
def test_bad_parameters_are_recipe_errors(params: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(conceptedit.RecipeError, match=message) as caught:
        conceptedit.load_recipe(_recipe(**params))
    assert any(issue.path.endswith(field) for issue in caught.value.issues), caught.value.issues


def test_a_concept_without_a_pseudo_label_is_refused(tmp_path: Path) -> None:
    no_label = {"nude": {"concepts": ["a nude person"], "templates": TEMPLATES}}
    with pytest.raises(conceptedit.EditError, match=r"without a pseudo-label.*\[\[a nude person"):
        conceptedit.apply(_recipe(concepts=no_label), out=tmp_path / "run", quiet=True)


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        (lambda m: {"unet.not.a.parameter": next(iter(m.values()))}, "which it does not train"),
        (lambda m: {n: v.float() for n, v in m.items()}, "must be a bool tensor of shape"),
        (lambda m: {n: v.reshape(-1) for n, v in m.items() if v.ndim > 1}, "must be a bool tensor of shape"),
    ],
    ids=["untrained-name", "not-bool", "wrong-shape"],
)
def test_the_engine_refuses_a_gradient_mask_that_does_not_fit(masks: Any, message: str, tmp_path: Path) -> None:
    original = Salun.gradient_masks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Salun, "gradient_masks", lambda self, ctx: masks(original(self, ctx)))
        with pytest.raises(conceptedit.TrainingError, match=message):
            conceptedit.apply(_recipe({"steps": 1}), out=tmp_path / "run", quiet=True)
