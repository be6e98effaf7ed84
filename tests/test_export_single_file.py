"""The ``single-file`` and ``te-delta`` export formats on real small runs (builtin:tiny-sd, builtin:shapes).

single-file: one checkpoint in the original Stable Diffusion layout; its names are checked against
the layout (spot keys, counts, SD-1.4's full name set, diffusers' own type detection) and its
values by loading it back with ``from_single_file``: a pure rename plus the VAE attention's
reshape, so every float32 tensor comes back bit for bit.
te-delta: a text-encoder-only edit under CLIPTextModel's names, loaded with ``load_state_dict``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import conceptedit
from conceptedit.errors import ExportError
from conceptedit.export_run import ExportResult, export
from conceptedit.io.edit_file import EDIT_FILE, read_edit
from conceptedit.io.single_file import (
    CLIP_PREFIX,
    SINGLE_FILE,
    UNET_PREFIX,
    VAE_PREFIX,
    backbone_problem,
    original_names,
)
from conceptedit.io.te_delta import DELTA_FILE, TE_DELTA, matching_names
from conceptedit.models.builtin import assemble_pipeline, build_components, build_sd14_random, tiny_sd_configs
from conceptedit.models.loading import load_model
from conceptedit.testing import isolated_host, tiny_recipe

COMPONENTS = ("unet", "vae", "text_encoder")
SHAPES = {"shapes": {"concepts": ["a red circle"], "target": "a shape", "templates": ["{}", "a picture of {}"]}}
UCE = {"method": "uce", "params": {"concepts": "shapes", "preserve": ["a blue square", "a green triangle"]}}
ADVUNLEARN = {
    "method": "advunlearn",
    "params": {"concept": "a red circle", "sampling_steps": 4, "retain_batch": 2, "warmup_steps": 1},
    "training": {"steps": 2, "lr": 1e-3},
}
RUNS = {
    "tiny-uce": tiny_recipe(UCE, concepts=SHAPES),
    "shapes-uce": tiny_recipe(UCE, concepts=SHAPES, model="builtin:shapes"),
    "tiny-advunlearn": tiny_recipe(ADVUNLEARN),
}


@pytest.fixture(scope="module", autouse=True)
def host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as h:
        yield h


class _Runs(dict[str, Path]):
    """Each recipe of RUNS applied once, on first use."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        conceptedit.apply(RUNS[name], out=self.root / name, quiet=True)
        self[name] = self.root / name
        return self[name]


class _SingleFiles(dict[str, ExportResult]):
    """Each run exported as single-file once (to ``<run>/exports/single-file``), on first use."""

    def __init__(self, runs: _Runs) -> None:
        super().__init__()
        self.runs = runs

    def __missing__(self, name: str) -> ExportResult:
        self[name] = export(self.runs[name], "single-file")
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def single_files(runs: _Runs) -> _SingleFiles:
    return _SingleFiles(runs)


def _edited(run: Path) -> Any:
    """A fresh base with the run's edit loaded: what every export must reproduce."""
    manifest = conceptedit.read_manifest(run)
    return conceptedit.load(load_model(manifest["base_model"]["id"]).pipeline, run)


def _assert_same_weights(got: Any, want: Any) -> None:
    for component in COMPONENTS:
        a, b = getattr(got, component).state_dict(), getattr(want, component).state_dict()
        assert set(a) == set(b), component
        different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not different, f"{component}: {different[:5]}"


# --------------------------------------------------------------------------- single-file: names


def test_the_checkpoint_is_in_the_original_sd_layout(single_files: dict[str, ExportResult]) -> None:
    result = single_files["tiny-uce"]
    (file,) = result.report.files
    with safe_open(str(result.folder / file), "pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in keys}
    edited = _edited(result.folder.parents[1])
    counts = {p: sum(k.startswith(p) for k in keys) for p in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)}
    assert counts == {
        UNET_PREFIX: len(edited.unet.state_dict()),
        VAE_PREFIX: len(edited.vae.state_dict()),
        CLIP_PREFIX: len(edited.text_encoder.state_dict()),
    }
    assert sum(counts.values()) == len(keys) == result.report.details["tensors"]
    diffusers_words = ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_shortcut")
    assert not any(w in k for k in keys for w in diffusers_words)
    assert not any(w in k for k in keys if k.startswith(VAE_PREFIX) for w in ("to_q", "to_out", "group_norm"))
    # tiny-sd: 2 UNet levels, 1 resnet each; a CrossAttn down block, a plain up block first; 4 VAE levels
    unet, vae = edited.unet, edited.vae
    spots = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": unet.down_blocks[0]
        .attentions[0]
        .transformer_blocks[0]
        .attn2.to_k.weight,
        "model.diffusion_model.input_blocks.2.0.op.weight": unet.down_blocks[0].downsamplers[0].conv.weight,
        "model.diffusion_model.input_blocks.3.0.in_layers.2.weight": unet.down_blocks[1].resnets[0].conv1.weight,
        "model.diffusion_model.middle_block.1.proj_in.weight": unet.mid_block.attentions[0].proj_in.weight,
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": unet.mid_block.resnets[1].time_emb_proj.weight,
        "model.diffusion_model.output_blocks.0.0.skip_connection.weight": unet.up_blocks[0]
        .resnets[0]
        .conv_shortcut.weight,
        "model.diffusion_model.output_blocks.1.1.conv.weight": unet.up_blocks[0].upsamplers[0].conv.weight,
        "model.diffusion_model.output_blocks.3.1.proj_out.bias": unet.up_blocks[1].attentions[1].proj_out.bias,
        "model.diffusion_model.time_embed.2.weight": unet.time_embedding.linear_2.weight,
        "model.diffusion_model.out.2.bias": unet.conv_out.bias,
        "first_stage_model.decoder.up.3.upsample.conv.weight": vae.decoder.up_blocks[0].upsamplers[0].conv.weight,
        "first_stage_model.decoder.up.0.block.1.conv2.bias": vae.decoder.up_blocks[3].resnets[1].conv2.bias,
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight": vae.encoder.down_blocks[2]
        .resnets[0]
        .conv_shortcut.weight,
        "first_stage_model.encoder.mid.block_2.norm1.weight": vae.encoder.mid_block.resnets[1].norm1.weight,
        "first_stage_model.encoder.norm_out.bias": vae.encoder.conv_norm_out.bias,
        "first_stage_model.quant_conv.weight": vae.quant_conv.weight,
        CLIP_PREFIX + "encoder.layers.1.self_attn.q_proj.weight": edited.text_encoder.get_parameter(
            "encoder.layers.1.self_attn.q_proj.weight"
        ),
        CLIP_PREFIX + "final_layer_norm.bias": edited.text_encoder.get_parameter("final_layer_norm.bias"),
    }
    for key, want in spots.items():
        assert torch.equal(tensors[key], want.detach()), key
    # the VAE attention's Linear layers are 1x1 convolutions in the original
    q = vae.decoder.mid_block.attentions[0].to_q.weight.detach()
    assert tensors["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (*q.shape, 1, 1)
    assert torch.equal(tensors["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0], q)
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert json.loads(meta["base_model"])["id"] == "builtin:tiny-sd"


def test_sd14_names_are_the_published_checkpoints() -> None:
    """SD-1.4's exact architecture (on the meta device: no memory): 686 UNet, 248 VAE and 196 text-encoder
    names, the keys diffusers recognises an SD-1 checkpoint by, and its type detection says v1."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    pipe = build_sd14_random(device="meta")
    names, unplaced = original_names(pipe)
    assert not unplaced
    counts = {p: sum(k.startswith(p) for k in names) for p in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)}
    assert counts == {UNET_PREFIX: 686, VAE_PREFIX: 248, CLIP_PREFIX: 196}
    for key in (
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
    ):
        assert key in names, key
    states = {c: getattr(pipe, c).state_dict() for c in COMPONENTS}
    assert infer_diffusers_model_type({name: states[c][key] for name, (c, key) in names.items()}) == "v1"


# --------------------------------------------------------------------------- single-file: round trips


@pytest.mark.parametrize("run", ["tiny-uce", "shapes-uce", "tiny-advunlearn"])
def test_the_checkpoint_loads_back_bit_identically(run: str, single_files: dict[str, ExportResult]) -> None:
    """A float32 checkpoint is a rename and a reshape: the orchestrator's check (changed weights and images,
    loaded with from_single_file) finds no difference, and neither does a comparison of every tensor."""
    result = single_files[run]
    assert result.check["checked"] is True
    assert result.check["weights_max_relative_error"] == 0.0
    assert result.check["pixel_max_abs_diff"] == 0.0 and result.check["images"] >= 2
    run_dir = result.folder.parents[1]
    base_id = conceptedit.read_manifest(run_dir)["base_model"]["id"]
    changed, _ = read_edit(run_dir / EDIT_FILE)
    base = load_model(base_id).pipeline
    assert any(
        not torch.equal(getattr(base, n.split(".")[0]).get_parameter(n.split(".", 1)[1]), v) for n, v in changed.items()
    )
    assert SINGLE_FILE.reload is not None
    _assert_same_weights(SINGLE_FILE.reload(base, result.folder), _edited(run_dir))
    record = json.loads((result.folder / "export.json").read_text())
    assert "from_single_file" in record["details"]["usage"]


def test_float16_checkpoints_are_half_the_size_and_close(runs: dict[str, Path], tmp_path: Path) -> None:
    """float16 rounds every weight (relative error about 2**-11), so the check is close, not exact."""
    result = export(runs["tiny-uce"], "single-file", options={"dtype": "float16"}, out=tmp_path / "half")
    (file,) = result.report.files
    assert {t.dtype for t in load_file(str(result.folder / file)).values()} == {torch.float16}
    assert 0.0 < result.check["weights_max_relative_error"] < 1e-3
    with pytest.raises(ExportError, match=r"dtype"):
        export(runs["tiny-uce"], "single-file", options={"dtype": "int8"}, out=tmp_path / "bad")


def test_sd2_style_pipelines_are_refused_with_what_to_use() -> None:
    configs = tiny_sd_configs()
    configs["text_encoder"] = {**configs["text_encoder"], "hidden_act": "gelu"}  # OpenCLIP, as SD-2.x
    problem = backbone_problem(assemble_pipeline(build_components(configs)))
    assert problem is not None
    assert (
        "OpenCLIP" in problem and "SD-2" in problem and "cond_stage_model.model" in problem and "`diffusers`" in problem
    )


# --------------------------------------------------------------------------- te-delta


def test_a_text_encoder_edit_exports_as_a_delta_that_load_state_dict_reads(runs: dict[str, Path]) -> None:
    run = runs["tiny-advunlearn"]
    result = export(run, "te-delta")
    assert result.check["weights_max_relative_error"] == 0.0 and result.check["pixel_max_abs_diff"] == 0.0
    assert result.report.files == [DELTA_FILE]
    edited = _edited(run)
    delta = load_file(str(result.folder / DELTA_FILE))
    changed, _ = read_edit(run / EDIT_FILE)
    assert set(delta) == {name.removeprefix("text_encoder.") for name in changed}
    with safe_open(str(result.folder / DELTA_FILE), "pt") as fh:
        meta = fh.metadata()
    assert meta["base_model_id"] == "builtin:tiny-sd" and json.loads(meta["base_model"])["id"] == "builtin:tiny-sd"

    fresh = load_model("builtin:tiny-sd").pipeline  # the way its users load it
    assert all(not torch.equal(fresh.text_encoder.get_parameter(n), v) for n, v in delta.items())  # a real edit
    loaded = fresh.text_encoder.load_state_dict(delta, strict=False)
    assert not loaded.unexpected_keys
    _assert_same_weights(fresh, edited)
    usage = result.report.details["usage"]
    assert "load_state_dict(delta, strict=False)" in usage and "builtin:tiny-sd" in usage
    assert TE_DELTA.reload is not None
    _assert_same_weights(TE_DELTA.reload(load_model("builtin:tiny-sd").pipeline, result.folder), edited)


def test_a_run_that_changes_the_unet_is_refused_as_a_delta(runs: dict[str, Path]) -> None:
    with pytest.raises(ExportError, match=r"te-delta: the edit changes \d+ unet tensor.*`lora`.*`single-file`"):
        export(runs["tiny-uce"], "te-delta")
    assert not (runs["tiny-uce"] / "exports" / "te-delta").exists()
    assert not (runs["tiny-uce"] / "exports" / "te-delta.partial").exists()


def test_delta_names_follow_the_installed_text_encoder() -> None:
    """transformers before the flattened CLIPTextModel prefix every name with ``text_model.``; either spelling loads."""
    flat = {"encoder.layers.0.mlp.fc1.weight"}
    wrapped = {"text_model.encoder.layers.0.mlp.fc1.weight"}
    assert set(matching_names({"text_model.encoder.layers.0.mlp.fc1.weight": 1}, flat)) == flat
    assert set(matching_names({"encoder.layers.0.mlp.fc1.weight": 1}, wrapped)) == wrapped
    assert set(matching_names({"unknown.weight": 1}, flat)) == {"unknown.weight"}
