"""The engine pieces TRCE stage 2, ESD and CA share: plans, timestep samplers, latent sources, parameter sets.

TRCE's results must not change when its schedule moves onto these pieces, so the plan and the
latent source are checked against what TRCE's own code did before (written out here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conceptedit.engine import schedules, trajectories
from conceptedit.engine.context import EditContext
from conceptedit.engine.selectors import select_parameter_set
from conceptedit.errors import TrainingError
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.models.prediction import add_noise
from conceptedit.recipe.loader import load_recipe
from conceptedit.testing import edit_context, isolated_host, tiny_recipe


def _ctx(tmp_path: Path) -> EditContext:
    """An edit context on a fresh tiny-sd, outside any run (for calling engine pieces directly)."""
    with isolated_host(entry_points=True):
        loaded = load_recipe(
            tiny_recipe({"method": "trce_eot", "params": {"concepts": "c"}}, concepts={"c": {"concepts": ["x"]}})
        )
    return edit_context(loaded, build_tiny_sd(), tmp_path)


def test_draw_pairs_reproduce_trce_stage2s_original_schedule() -> None:
    """TRCE drew its malicious plan as two randint calls, then its regulariser plan as two more."""
    draws, runs, early, uncond, steps, batch = 24, 6, 5, 9, 10, 3
    g = torch.Generator().manual_seed(1234)
    mal_before = list(
        zip(
            torch.randint(0, runs, (draws,), generator=g).tolist(),
            torch.randint(0, early, (draws,), generator=g).tolist(),
            strict=True,
        )
    )
    reg_before = torch.stack(
        [torch.randint(0, uncond, (draws, batch), generator=g), torch.randint(0, steps, (draws, batch), generator=g)],
        dim=-1,
    ).tolist()
    g = torch.Generator().manual_seed(1234)
    mal = schedules.draw_pairs(g, draws, runs, early)
    reg = schedules.draw_pairs(g, draws, uncond, steps, per_draw=batch)
    assert [tuple(x) for x in mal.tolist()] == mal_before
    assert reg.tolist() == reg_before
    needed = schedules.needed_steps(reg)
    assert needed == {u: sorted({k for row in reg_before for uu, k in row if uu == u}) for u in needed}


def test_draw_counter_walks_micro_batches_in_order() -> None:
    count = schedules.DrawCounter(grad_accum=3)
    assert [count(step) for step in (1, 1, 1, 2, 2, 2, 3)] == [0, 1, 2, 3, 4, 5, 6]


def test_compvis_timesteps_fall_in_the_drawn_steps_bucket() -> None:
    k = torch.tensor([0, 1, 24, 49])
    t = schedules.legacy_compvis_timesteps(k, 50, torch.Generator().manual_seed(0))
    for kk, tt in zip(k.tolist(), t.tolist(), strict=True):
        assert 20 * kk <= tt < 20 * (kk + 1)  # the CompVis script: U[round(1000k/50), round(1000(k+1)/50))


def _compvis_sampler(t_enc: int, steps: int = 50, train_steps: int = 1000) -> tuple[int, int]:
    """(DDIM steps taken, timestep whose ᾱ the latent has) for ESD's CompVis sampler, ``till_T = t_enc``.

    Written out from ``ldm/models/diffusion/ddim.py`` of rohitgandikota/erasing@a2189e9: the
    schedule is ``range(0, T, T // S) + 1``; ``timesteps[:t_start]`` with ``t_start = -1`` drops
    its last entry; the loop walks the rest from the top with ``index = total - i - 1``, the
    step with ``index`` lands on ``alphas_prev[index]`` (the schedule entry ``index - 1``, or
    t = 0 for index 0), and it breaks once ``index + 1 == till_T``.
    """
    ddim = [i + 1 for i in range(0, train_steps, train_steps // steps)]
    walked = ddim[:-1]
    taken, index = 0, len(walked)
    for i in range(len(walked)):
        index = len(walked) - i - 1
        taken += 1
        if index + 1 == t_enc:
            break
    return taken, (ddim[index - 1] if index > 0 else 0)


def test_compvis_pairing_puts_the_latent_at_the_noise_level_of_its_timestep() -> None:
    """The CompVis ESD script feeds t ~ U[20k, 20k+20) a latent 2-3 DDIM steps less noisy, not
    the latent k steps from noise (which would mirror the noise level)."""
    from conceptedit.toolkit import compvis_latent_steps

    config = build_tiny_sd().scheduler.config  # SD's DDPM schedule and DDIM settings
    scheduler = DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    steps = 50
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.double()
    level = [int(t) for t in scheduler.timesteps] + [0]  # after n steps; the finished latent has ᾱ_0
    k = torch.arange(steps).repeat(20)
    t = schedules.legacy_compvis_timesteps(k, steps, torch.Generator().manual_seed(0))
    n = compvis_latent_steps(k, steps)
    for kk, nn, tt in zip(k.tolist(), n.tolist(), t.tolist(), strict=True):
        taken, reference_level = _compvis_sampler(kk, steps)
        # same noise level as the reference's latent; one step more, the 981 step the reference skips
        assert level[nn] == reference_level and nn == taken + 1, (kk, nn, taken)
        assert 0 <= tt - level[nn] < 3 * 1000 // steps, (kk, tt)  # fed t is 0-3 DDIM steps above it

    def mean_gap(latent_steps: torch.Tensor) -> float:
        fed, latent = alphas[t], alphas[torch.tensor(level)[latent_steps]]
        return float((fed - latent).abs().mean())

    # measured: 0.048 for this pairing (the reference's own), 0.58 for the latent k steps from noise
    assert mean_gap(n) < 0.06 and mean_gap(k) > 0.5
    assert n.max() == steps and n.min() == 2  # the finished latent for k <= 1, two steps for k = 49


def test_add_noise_is_ddpm_forward_diffusion() -> None:
    config = build_tiny_sd().scheduler.config
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    expected = DDPMScheduler.from_config(config).add_noise(x0, eps, t)
    torch.testing.assert_close(add_noise(schedules.alphas_cumprod(config), x0, eps, t), expected)


def test_planned_latents_are_a_hand_run_ddim_with_a_finished_latent(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    pipe = ctx.pipeline
    plan = torch.tensor([[0, 2], [0, 4], [1, 4]])  # 4 == steps: the finished latent
    source = trajectories.sample_planned(
        ctx, plan, ["a cat", "a dog"], [11, 12], guidance=3.0, steps=4, weights="base", label="test"
    )
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(4)
    cond = ctx.encode_prompts(["a cat"]).hidden
    empty = ctx.encode_prompts([""]).hidden
    x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(11))[None]
    walk = [x]
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, empty])).sample
            x = scheduler.step(both[1:] + 3.0 * (both[:1] - both[1:]), t, x, eta=0.0).prev_sample
            walk.append(x)
    for draw, k in ((0, 2), (1, 4)):
        latents, t, runs = source.take(draw, ctx.device)
        assert runs == [0] and latents.dtype == torch.float32
        torch.testing.assert_close(latents, walk[k].half().float(), atol=2e-3, rtol=2e-3)
        assert int(t) == (int(scheduler.timesteps[k]) if k < 4 else 0)
    # the uncached sampler is the same walk, in full precision
    noise = trajectories.seeded_noise((4, 8, 8), [11])
    torch.testing.assert_close(trajectories.partial_ddim(ctx, noise, cond, empty, 3.0, 4, 2), walk[2])
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        trajectories.sample_planned(
            ctx, torch.tensor([[0, 5]]), ["a cat"], [1], guidance=3.0, steps=4, weights="base", label="bad"
        )


def test_named_parameter_sets_on_tiny_sd() -> None:
    adapter = StableDiffusionAdapter(build_tiny_sd())
    unet = [n for n, _ in adapter.named_parameters() if n.startswith("unet.")]
    x = select_parameter_set(adapter, "cross_attention")
    assert x == [n for n in unet if ".attn2." in n]
    assert select_parameter_set(adapter, "cross_attention_kv") == [
        n for n in x if ".attn2.to_k." in n or ".attn2.to_v." in n
    ]
    u = set(select_parameter_set(adapter, "non_cross_attention"))
    head = {n for n in unet if n.startswith(("unet.time_embedding.", "unet.conv_norm_out.", "unet.conv_out."))}
    assert head and u == set(unet) - set(x) - head
    attention = select_parameter_set(adapter, "attention")
    assert any(".attn1.to_q." in n for n in attention) and not any(".norm" in n or ".ff." in n for n in attention)
    with pytest.raises(TrainingError, match="unknown parameter set 'esd-u'"):
        select_parameter_set(adapter, "esd-u")
