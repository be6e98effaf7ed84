"""The lora and kohya export formats: low-rank factors of each changed matrix, their rank rule and
reported errors checked by hand, diffusers' own loaders reading both files, what a LoRA leaves out.

Tolerances. Factors come from a float64 SVD and are stored in float32: each stored number is
rounded by at most 2^-24 ≈ 6e-8 of itself, so an exact-rank product matches ΔW to a few 1e-8 of
‖ΔW‖ (measured 8e-8); the tests allow 1e-6. Fusing into a float32 model rounds once more, at
~6e-8 of the weight (measured 3e-8); 1e-6 again. Images: weights equal to ~1e-7 move an 8-bit
pixel by at most one rounding step over 10 sampling steps (measured max 1 on tiny-sd, 0 on
shapes); the tests allow 2.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

import conceptedit
from conceptedit import EditContext, EditMethod, MethodParams, hookimpl
from conceptedit.api.export import ExportSource
from conceptedit.errors import ExportError
from conceptedit.export_run import ExportResult
from conceptedit.io.lora import (
    KOHYA,
    LORA,
    LORA_FILE,
    LoraOptions,
    choose_rank,
    factorise,
    kohya_key,
    numerical_rank,
    tail_errors,
)
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

EXACT = 1e-6  # float32 factors and float32 fusing: see the module docstring
PIXELS = 2.0  # 8-bit steps
ARTISTS = ["Van Gogh", "Picasso"]
TEMPLATES = ["{}", "a painting by {}"]  # 2 artists × 2 templates: UCE's change has rank 4
UCE = {"method": "uce", "params": {"concepts": "art", "preserve": ["Monet", "a dog", "a house"]}}
CONCEPTS = {"art": {"concepts": ARTISTS, "target": "art", "templates": TEMPLATES}}
BIAS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"  # tiny-sd


class _BiasParams(MethodParams):
    pass


class _BiasOnly(EditMethod[_BiasParams]):
    """Trains one bias and one layer norm: an edit with nothing a LoRA can hold."""

    name = "test_bias_only"
    summary = "moves an attn2.to_out bias and a norm2 weight (test)"
    kind = "training"
    Params = _BiasParams

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        block = ctx.cross_attention_layers()[0].parameter_name("k").split(".attn2.")[0]
        return [f"{block}.attn2.to_out.0.bias", f"{block}.norm2.weight"]

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        x = torch.randn(ctx.adapter.latent_shape(1), generator=torch.Generator().manual_seed(step))
        hidden = ctx.encode_prompts(["a cat"]).hidden
        return {"bias": ctx.predict_noise(x, torch.tensor([500]), hidden).pow(2).mean()}


class _Plugin:
    @hookimpl
    def conceptedit_register_methods(self, register: Callable[[type[EditMethod]], None]) -> None:
        register(_BiasOnly)


@pytest.fixture(scope="module", autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(_Plugin(), entry_points=True) as host:
        yield host


@pytest.fixture(scope="module")
def uce_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UCE on builtin:tiny-sd: every attn2 to_k/to_v changed by a rank-4 ΔW."""
    out = tmp_path_factory.mktemp("uce") / "run"
    conceptedit.apply(tiny_recipe(UCE, concepts=CONCEPTS), out=out, quiet=True)
    return out


@pytest.fixture(scope="module")
def exact(uce_run: Path) -> ExportResult:
    return conceptedit.export(uce_run, "lora", options={"rank": 16}, out=uce_run.parent / "exact")


def _delta(run: Path, name: str) -> tuple[Tensor, Tensor]:
    """(ΔW as a float64 matrix, W_edited as one) of tensor ``name`` of a tiny-sd run."""
    edited = conceptedit.load(build_tiny_sd(), run)
    component, path = name.split(".", 1)
    w_edited = getattr(edited, component).get_parameter(path).detach().double()
    w_base = getattr(build_tiny_sd(), component).get_parameter(path).detach().double()
    return (w_edited - w_base).reshape(w_edited.shape[0], -1), w_edited.reshape(w_edited.shape[0], -1)


def _unet_output(pipe: Any) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(StableDiffusionAdapter(pipe).latent_shape(1), generator=generator)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample


# ----------------------------------------------------------------------------- exact rank


def test_exact_rank_lora_reproduces_the_edit_and_loads_with_plain_load_lora_weights(
    uce_run: Path, exact: ExportResult
) -> None:
    assert exact.report.files == [LORA_FILE] and (exact.folder / LORA_FILE).is_file()
    matrices = exact.report.details["matrices"]
    assert len(matrices) == 8 and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in matrices)
    # rank 16 asked; UCE's change has rank 4 (one per erased prompt row), so 4 is exact
    assert {(m["rank"], m["delta_rank"]) for m in matrices.values()} == {(4, 4)}
    assert exact.report.details["max_relative_error"] <= EXACT  # measured 8e-8

    # The file, read without conceptedit: diffusers' PEFT keys, and B @ A is ΔW
    tensors = load_file(exact.folder / LORA_FILE)
    assert {re.sub(r"\.lora_[AB]\.weight$", ".weight", k) for k in tensors} == set(matrices)
    assert all(re.fullmatch(r"unet\.[\w.]+\.lora_[AB]\.weight", k) for k in tensors)
    for name, figures in matrices.items():
        delta, _ = _delta(uce_run, name)
        module = name.removesuffix(".weight")
        product = tensors[f"{module}.lora_B.weight"].double() @ tensors[f"{module}.lora_A.weight"].double()
        error = float((delta - product).norm() / delta.norm())
        assert error <= EXACT and error == pytest.approx(figures["relative_error"], abs=1e-12)
    with safe_open(exact.folder / LORA_FILE, "pt") as fh:
        config = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == 4  # alpha = rank: scale 1

    # The orchestrator's round trip (load_lora_weights, fuse): weights and images
    assert exact.check["weights_max_relative_error"] <= EXACT  # measured 3e-8
    assert exact.check["images"] == 4 and exact.check["pixel_max_abs_diff"] <= PIXELS  # measured 1

    # A user who loads it and does not fuse gets the edited UNet's outputs too (scale 1 without fusing)
    plain = build_tiny_sd()
    plain.load_lora_weights(str(exact.folder))
    want = _unet_output(conceptedit.load(build_tiny_sd(), uce_run))
    assert float((_unet_output(plain) - want).norm() / want.norm()) <= 1e-5  # measured ~1e-7


# ----------------------------------------------------------------------------- the rank rules


def test_a_low_rank_reports_the_error_a_hand_svd_gives(uce_run: Path) -> None:
    result = conceptedit.export(uce_run, "lora", options={"rank": 2}, out=uce_run.parent / "rank2")
    matrices = result.report.details["matrices"]
    assert {m["rank"] for m in matrices.values()} == {2}
    name = next(n for n in matrices if ".attn2.to_k." in n)
    delta, w_edited = _delta(uce_run, name)
    s = torch.linalg.svdvals(delta)
    lost = float(s[2:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())  # Eckart–Young: the best rank-2 error
    assert 0.05 < lost < 0.9  # a real truncation (measured 0.41), not rounding
    # float32 factors add ~1e-7 of ‖ΔW‖ in quadrature to a 0.4 error: far below 1e-6
    assert matrices[name]["relative_error"] == pytest.approx(lost, abs=1e-6)
    to_weight = lost * float(delta.norm() / w_edited.norm())
    assert matrices[name]["relative_to_weight"] == pytest.approx(to_weight, abs=1e-6)
    # the loaded, fused pipeline is off by exactly the reported error (plus float32 fusing)
    for key, figures in matrices.items():
        assert result.check["weights_relative_error"][key] == pytest.approx(figures["relative_to_weight"], abs=EXACT)


def _hand_errors(delta: Tensor) -> list[float]:
    """errors[k] = √(Σ_{i>k} σᵢ²) / √(Σ σᵢ²): the best rank-k error (Eckart–Young), k = 0 … n."""
    energy = torch.linalg.svdvals(delta).pow(2).tolist()
    return [math.sqrt(sum(energy[k:]) / sum(energy)) for k in range(len(energy) + 1)]


def test_max_error_picks_the_smallest_rank_that_meets_it(uce_run: Path) -> None:
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    errors = _hand_errors(_delta(uce_run, name)[0])
    bound = math.sqrt(errors[1] * errors[2])  # between rank 1's error and rank 2's: rank 2 meets it
    result = conceptedit.export(uce_run, "lora", options={"max_error": bound}, out=uce_run.parent / "bound")
    matrices = result.report.details["matrices"]
    assert matrices[name]["rank"] == 2 and matrices[name]["relative_error"] <= bound
    assert result.report.details["rank_rule"] == {"max_error": bound}
    for key, figures in matrices.items():  # every matrix: the smallest rank whose hand error meets the bound
        hand, k = _hand_errors(_delta(uce_run, key)[0]), figures["rank"]
        assert hand[k] <= bound < hand[k - 1], (key, k, hand[: k + 1])
        assert figures["relative_error"] <= bound + 1e-7  # + the float32 rounding of the factors


def _planted(singular: list[float], shape: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor]:
    """(edited, base), float64, whose difference reshaped to (out, rest) has these singular values."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular), generator=generator, dtype=torch.float64))
    delta = (u * torch.tensor(singular, dtype=torch.float64)) @ v.T
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    return base + delta.reshape(shape), base


@pytest.mark.parametrize("shape", [(6, 5), (6, 2, 2, 2)])
def test_rank_rules_on_planted_singular_values(shape: tuple[int, ...]) -> None:
    """ΔW with singular values 8, 4, 2, 1: rank-k errors √(Σ_{i>k} σ²/85) = 0.497, 0.243, 0.108, 0."""
    edited, base = _planted([8.0, 4.0, 2.0, 1.0], shape)
    hand = [math.sqrt(sum(x * x for x in [8.0, 4.0, 2.0, 1.0][k:]) / 85) for k in range(5)]
    assert tail_errors(torch.tensor([8.0, 4.0, 2.0, 1.0])).tolist() == pytest.approx(hand)
    for bound, rank in [(0.6, 1), (0.25, 2), (0.11, 3), (0.1, 4), (0.0, 4), (1e-3, 4)]:
        low = factorise(edited, base, rank=None, max_error=bound)
        assert low.rank == rank and low.delta_rank == 4, bound
        assert low.relative_error == pytest.approx(hand[rank], abs=1e-6)
    for asked, rank in [(1, 1), (3, 3), (10, 4)]:  # capped at the change's own rank: exact
        low = factorise(edited, base, rank=asked, max_error=None)
        assert low.rank == rank and low.relative_error == pytest.approx(hand[rank], abs=1e-6)
    low = factorise(edited, base, rank=2, max_error=None)
    assert low.up.shape == (6, 2) and low.down.shape == (2, math.prod(shape[1:]))
    # balanced: the factors share the scale (√σ each), neither holds it all
    assert low.up.norm(dim=0).tolist() == pytest.approx([math.sqrt(8), math.sqrt(4)], rel=1e-5)
    assert low.down.norm(dim=1).tolist() == pytest.approx([math.sqrt(8), math.sqrt(4)], rel=1e-5)


def test_numerical_rank_stops_at_the_weights_rounding() -> None:
    s = torch.tensor([1.0, 0.5, 1e-9, 1e-10], dtype=torch.float64)
    assert numerical_rank(s, weight_norm=1.0, eps=1.2e-7) == 2  # the tail (1e-9) is below float32 rounding
    assert numerical_rank(s, weight_norm=1.0, eps=2.2e-16) == 4
    assert numerical_rank(torch.zeros(3, dtype=torch.float64), weight_norm=1.0, eps=1.2e-7) == 0
    assert choose_rank(s, 2, rank=None, max_error=0.0) == 2 and choose_rank(s, 2, rank=5, max_error=None) == 2


# ----------------------------------------------------------------------------- every SD-1.x module, both loaders


def _every_module_source(run_dir: Path) -> tuple[ExportSource, dict[str, int]]:
    """tiny-sd with every linear and conv weight of the UNet and text encoder moved by a planted
    rank-1/2/3 change, and one bias moved too."""
    edited = build_tiny_sd()
    generator = torch.Generator().manual_seed(0)
    changed: dict[str, Tensor] = {}
    originals: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for component in ("unet", "text_encoder"):
            for path, module in getattr(edited, component).named_modules():
                if not isinstance(module, nn.Linear | nn.Conv2d):
                    continue
                name, weight = f"{component}.{path}.weight", module.weight
                rank = 1 + len(ranks) % 3
                rows, cols = weight.shape[0], weight[0].numel()
                delta = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
                originals[name] = weight.detach().clone()
                weight.add_((0.1 * weight.norm() / delta.norm() * delta).reshape(weight.shape))
                changed[name], ranks[name] = weight.detach().clone(), rank
        bias = edited.unet.get_parameter(BIAS)
        originals[f"unet.{BIAS}"] = bias.detach().clone()
        bias.add_(0.1)
        changed[f"unet.{BIAS}"] = bias.detach().clone()
    source = ExportSource(
        run_dir=run_dir,
        manifest={},
        recipe={},
        base_model={"id": "builtin:tiny-sd"},
        edited=changed,
        base=originals,
        pipeline=edited,
        guards=[],
        load_base=build_tiny_sd,
        options=LoraOptions(),
    )
    return source, ranks


@pytest.mark.parametrize("exporter", [LORA, KOHYA], ids=["lora", "kohya"])
def test_every_sd1_module_round_trips_through_diffusers_loader(exporter: Any, tmp_path: Path) -> None:
    """Conv (3×3 and 1×1), attention, feed-forward, time embedding and text-encoder layers, each of
    its own rank: the key layout and the per-module scale survive diffusers' own loader."""
    source, ranks = _every_module_source(tmp_path / "my run")
    folder = tmp_path / exporter.name
    folder.mkdir()
    report = exporter.export(source, folder)
    assert {n: m["rank"] for n, m in report.details["matrices"].items()} == ranks  # planted ranks, found exactly
    assert list(report.details["left_out"]) == [f"unet.{BIAS}"]
    notes = " ".join(report.notes)
    assert "attn2.to_out.0.bias" in notes and "single-file" in notes
    reloaded = exporter.reload(build_tiny_sd(), folder)
    assert not any("lora" in n or "base_layer" in n for n, _ in reloaded.unet.named_modules())  # plain modules again
    for name in ranks:
        component, path = name.split(".", 1)
        got, want = getattr(reloaded, component).get_parameter(path).detach(), source.edited[name]
        assert float((got - want).norm() / want.norm()) <= EXACT, name
    assert torch.equal(reloaded.unet.get_parameter(BIAS), build_tiny_sd().unet.get_parameter(BIAS))  # left out


def test_kohya_keys_are_the_ones_a1111_and_comfyui_read(tmp_path: Path) -> None:
    source, ranks = _every_module_source(tmp_path / "my run")
    report = KOHYA.export(source, tmp_path)
    assert report.files == ["my_run.safetensors"]
    tensors = load_file(tmp_path / "my_run.safetensors")
    modules = {k.split(".", 1)[0] for k in tensors}
    assert modules == {kohya_key(n) for n in ranks}
    for module in modules:  # down, up and a 0-d alpha per module, nothing else
        assert {k for k in tensors if k.split(".", 1)[0] == module} == {
            f"{module}.lora_down.weight",
            f"{module}.lora_up.weight",
            f"{module}.alpha",
        }
        assert tensors[f"{module}.alpha"].shape == () and float(tensors[f"{module}.alpha"]) == report.details["alpha"]
    # diffusers' names with "." → "_", the text encoder under CLIP's text_model path
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in modules
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj" in modules
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules
    assert "lora_unet_mid_block_attentions_0_proj_in" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in modules
    # conv LoRA as kohya stores it: a down kernel with the layer's own size, a 1×1 up
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    conv = source.pipeline.unet.down_blocks[0].resnets[0].conv1
    rank = ranks["unet.down_blocks.0.resnets.0.conv1.weight"]
    assert down.shape == (rank, conv.in_channels, 3, 3) and up.shape == (conv.out_channels, rank, 1, 1)
    with safe_open(tmp_path / "my_run.safetensors", "pt") as fh:
        metadata = fh.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "Dynamic"
    # One alpha for all modules; a loader scales each module's up·down by alpha / (its rank, down's rows),
    # as A1111 and ComfyUI do: that gives ΔW back for every module, those of another rank than alpha too.
    alpha = report.details["alpha"]
    assert len(set(ranks.values())) == 3 and alpha in ranks.values()
    for name in ranks:
        module = kohya_key(name)
        down, up = tensors[f"{module}.lora_down.weight"].double(), tensors[f"{module}.lora_up.weight"].double()
        assert down.shape[0] == ranks[name]
        product = (up.flatten(1) @ down.flatten(1)) * float(tensors[f"{module}.alpha"]) / down.shape[0]
        delta = (source.edited[name] - source.base[name]).double().flatten(1)
        assert float((product - delta).norm() / delta.norm()) <= EXACT, name


def test_a_run_on_shapes_exports_as_kohya_and_loads_through_diffusers(tmp_path: Path) -> None:
    recipe = tiny_recipe(
        {"method": "uce", "params": {"concepts": "red", "preserve": ["a blue square", "a green circle"]}},
        model="builtin:shapes",
        concepts={"red": {"concepts": ["red"], "target": "gray", "templates": ["a {} circle", "a {} square"]}},
    )
    conceptedit.apply(recipe, out=tmp_path / "red", quiet=True)
    result = conceptedit.export(tmp_path / "red", "kohya")
    assert result.folder == tmp_path / "red" / "exports" / "kohya"
    assert result.report.files == ["red.safetensors"] and (result.folder / "red.safetensors").is_file()
    keys = load_file(result.folder / "red.safetensors")
    pattern = r"lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_attentions_\d+_transformer_blocks_\d+_attn2_to_[kv]"
    assert all(re.fullmatch(pattern + r"\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in keys), keys
    assert {m["rank"] for m in result.report.details["matrices"].values()} == {2}  # 1 word × 2 templates
    assert result.report.details["alpha"] == 2 and result.report.details["max_relative_error"] <= EXACT
    assert result.check["weights_max_relative_error"] <= EXACT
    assert result.check["pixel_max_abs_diff"] <= PIXELS  # measured 0
    assert "<lora:red:1>" in result.report.details["usage"]
    assert (result.folder / "README.md").is_file() and (result.folder / "export.json").is_file()


# ----------------------------------------------------------------------------- what a LoRA leaves out


def test_a_text_encoder_edit_exports_its_matrices_and_names_what_it_leaves_out(tmp_path: Path) -> None:
    edit = {
        "method": "advunlearn",
        "params": {"concept": "a red circle", "sampling_steps": 4, "retain_batch": 2, "warmup_steps": 1},
        "training": {"steps": 2, "lr": 1e-3},
    }
    conceptedit.apply(tiny_recipe(edit), out=tmp_path / "adv", quiet=True)
    result = conceptedit.export(tmp_path / "adv", "lora")
    details = result.report.details
    carried, left_out = set(details["matrices"]), set(details["left_out"])
    matrix = r"text_encoder\.encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])\.weight"
    assert carried and all(re.fullmatch(matrix, n) for n in carried), carried
    assert left_out and all(n.endswith(".bias") or "layer_norm" in n for n in left_out)
    assert details["max_relative_error"] <= 1e-3  # the default rule
    keys = load_file(result.folder / LORA_FILE)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)  # the usual CLIP layout
    note = next(n for n in result.report.notes if n.startswith("Left out"))
    assert f"{len(left_out)} changed tensor(s)" in note and "single-file" in note and "delta" in note
    for name in carried:  # the loaded text encoder matches the edit within the reported error
        error = result.check["weights_relative_error"][name]
        assert error <= details["matrices"][name]["relative_to_weight"] + EXACT


def test_a_run_that_changed_only_biases_and_norms_is_refused(tmp_path: Path) -> None:
    recipe = tiny_recipe({"method": "test_bias_only", "training": {"steps": 1, "lr": 1e-2}})
    conceptedit.apply(recipe, out=tmp_path / "bias", quiet=True)
    for fmt in ("lora", "kohya"):
        with pytest.raises(ExportError, match=r"cannot export as \w+: a LoRA holds .*attn2\.to_out\.0\.bias.*delta"):
            conceptedit.export(tmp_path / "bias", fmt)
    listed = conceptedit.export_formats(tmp_path / "bias")
    assert listed["delta"] is None and listed["lora"] and "norm2.weight" in str(listed["kohya"])
    assert not (tmp_path / "bias" / "exports").exists() or not any((tmp_path / "bias" / "exports").iterdir())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 4, "max_error": 0.01}, r"rank or max_error, not both"),
        ({"rank": -1}, r"rank: Input should be greater than or equal to 1"),
        ({"rank": 0}, r"rank: Input should be greater than or equal to 1"),
        ({"max_error": 1.5}, r"max_error: Input should be less than 1"),
        ({"ranks": 4}, r"ranks: Extra inputs are not permitted"),
    ],
)
def test_option_errors_name_the_field(uce_run: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ExportError, match=message) as caught:
        conceptedit.export(uce_run, "kohya", options=options, out=uce_run.parent / "never")
    assert "its options: rank, max_error" in str(caught.value)
    assert not (uce_run.parent / "never").exists()
