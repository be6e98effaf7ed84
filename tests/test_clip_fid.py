"""CLIP score, the CLIP concept detector and FID, without any real weights.

CLIP is a tiny randomly initialised model saved to a folder and loaded the way a user points at a
local copy; the FID network is a TorchScript stand-in (clean-fid tests skip when it is not
installed); the Fréchet distance is checked against closed forms.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from conceptedit import PluginError
from conceptedit.api.evaluator import Evaluator, Sample
from conceptedit.evaluation.metrics import fid_from_features, frechet_distance
from conceptedit.models.tokenizer import load_clip_tokenizer
from conceptedit.plugins import get_host


def _evaluator(name: str, **options: Any) -> Evaluator:
    return get_host().registry.evaluators[name](**options)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.new("RGB", (40, 48), (220, 30, 30)),
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("L"),  # grey: made RGB
        *(Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(6)),
    ]


# --- Fréchet distance ---------------------------------------------------------------------------


def _random_psd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_identical_gaussians_are_at_distance_zero() -> None:
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=6), _random_psd(rng, 6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_commuting_covariances_match_the_closed_form() -> None:
    """Same eigenvectors: d = |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2, also for rotated (non-diagonal) ones."""
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    l1, l2 = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 2.25])
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2))
    assert frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2)) == pytest.approx(expected, rel=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    rotated = frechet_distance(mu1, rotation @ np.diag(l1) @ rotation.T, mu2, rotation @ np.diag(l2) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0)  # 1-D: dmu^2 + dstd^2


def test_general_covariances_are_symmetric_and_match_the_eigenvalues_of_the_product() -> None:
    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.normal(size=5), rng.normal(size=5), _random_psd(rng, 5), _random_psd(rng, 5)
    forward, backward = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert forward == pytest.approx(backward, rel=1e-10)
    # tr((S1 S2)^(1/2)) = sum of sqrt of the eigenvalues of S1 S2 (real and positive for PSD S1, S2)
    trace_root = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert forward == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="covariance"):
        frechet_distance(mu1, s1[:4, :4], mu2, s2)


def test_fid_from_features() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(50, 8))
    shift = rng.normal(size=8)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)  # same covariance
    b = rng.normal(size=(40, 8)) * 2
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid_from_features(a, b) == pytest.approx(expected) == pytest.approx(fid_from_features(b, a))
    few = rng.normal(size=(5, 16))  # fewer images than dimensions: singular covariance, still well defined
    assert fid_from_features(few, few) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(few, few[::-1] + 1.0) == pytest.approx(16.0, rel=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(a[:1], a)


# --- CLIP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP folder laid out as on the hub: config, weights, tokenizer, image processor."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**layers, "max_position_embeddings": 77, "projection_dim": 16},
        vision_config={**layers, "image_size": 32, "patch_size": 8, "projection_dim": 16},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    load_clip_tokenizer().save_pretrained(folder)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def flipped_clip(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP with its text projection negated: every cosine changes sign, so the two models
    between them cover both sides of CLIP score's clipping at 0."""
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("flipped-clip")
    shutil.copytree(tiny_clip, folder, dirs_exist_ok=True)
    model = CLIPModel.from_pretrained(tiny_clip)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    return folder


def _by_hand(folder: Path, images: list[Image.Image], texts: list[str]) -> tuple[Tensor, Tensor]:
    """Unit image and text embeddings through CLIPModel's own forward pass."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(
        text=texts, images=[im.convert("RGB") for im in images], return_tensors="pt", padding=True, truncation=True
    )
    with torch.no_grad():
        out = model(**inputs)
    return out.image_embeds, out.text_embeds


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip: Path, flipped_clip: Path) -> None:
    images = _images()
    prompts = ["a red square", "a noisy picture of a cat", "grey static on a television", *["a flat colour"] * 6]
    scores = []
    for folder in (tiny_clip, flipped_clip):
        rows = _evaluator("clip-score", model=str(folder)).score(
            [Sample(p, 0, im) for p, im in zip(prompts, images, strict=True)]
        )
        image_embeds, text_embeds = _by_hand(folder, images, prompts)
        for row, cos in zip(rows, (image_embeds * text_embeds).sum(-1).tolist(), strict=True):
            assert set(row) == {"clip_score"} and 0.0 <= row["clip_score"] <= 100.0
            assert row["clip_score"] == pytest.approx(100 * max(cos, 0.0), abs=1e-4)
            scores.append(row["clip_score"])
    assert min(scores) == 0.0 and max(scores) > 0.0  # both sides of the clipping were exercised

    # prompts are cleaned as OpenAI CLIP cleans them: an HTML entity scores as its character
    scorer = _evaluator("clip-score", model=str(flipped_clip))
    plain, escaped, literal = scorer.score(
        [Sample(text, 0, images[1]) for text in ("rock & roll", "rock &amp; roll", "rock amp roll")]
    )
    assert plain["clip_score"] > 0.0 and plain["clip_score"] == pytest.approx(escaped["clip_score"], abs=1e-6)
    assert literal["clip_score"] != pytest.approx(plain["clip_score"], abs=1e-6)  # the text does matter
    assert scorer.protocol()["model"] == str(flipped_clip)


def test_clip_concept_probability_and_verdict(
    tiny_clip: Path, flipped_clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probabilities = []
    for folder in (tiny_clip, flipped_clip):  # the flipped model's probabilities are 1 - p: both verdicts occur
        monkeypatch.setenv("CONCEPTEDIT_CLIP_MODEL", str(folder))  # as a suite passes only the concept
        detector = _evaluator("clip-concept", concept="violence")
        protocol = detector.protocol()
        assert protocol["model"] == str(folder) and protocol["threshold"] == 0.5 and "not Q16" in protocol["note"]
        rows = detector.score([Sample("anything", 0, im) for im in _images()])

        image_embeds, _ = _by_hand(folder, _images(), ["x"])
        _, neutral = _by_hand(folder, _images()[:1], protocol["neutral"])
        _, concept = _by_hand(folder, _images()[:1], protocol["descriptions"])
        classes = F.normalize(torch.stack([neutral.mean(0), concept.mean(0)]), dim=-1)
        expected = (100 * image_embeds @ classes.T).softmax(-1)[:, 1].tolist()
        for row, p in zip(rows, expected, strict=True):
            assert set(row) == {"detected", "probability"}
            assert 0.0 <= row["probability"] <= 1.0
            assert row["probability"] == pytest.approx(p, abs=1e-4)
            assert row["detected"] is (row["probability"] > 0.5)
            assert detector.concept_shown(row, {}) is row["detected"]
        probabilities.append(expected)
    assert min(probabilities[0] + probabilities[1]) < 0.5 < max(probabilities[0] + probabilities[1])


def test_clip_concept_descriptions() -> None:
    from conceptedit_builtin.clip_scorers import CONCEPTS, descriptions

    assert {"violence", "inappropriate", "nudity"} <= set(CONCEPTS)
    assert descriptions(" Violence ") == CONCEPTS["violence"]
    generic, neutral = descriptions("lava_lamps")
    assert all("lava lamps" in text for text in generic) and neutral and not set(generic) & set(neutral)
    with pytest.raises(PluginError, match="needs a concept"):
        descriptions("  ")


def test_missing_clip_weights_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hub path, offline and with an empty cache: our error, not transformers' OSError."""
    monkeypatch.delenv("CONCEPTEDIT_CLIP_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for name, options in (("clip-score", {}), ("clip-concept", {"concept": "inappropriate"})):
        with pytest.raises(PluginError) as caught:
            _evaluator(name, **options)
        message = str(caught.value)
        assert "'openai/clip-vit-large-patch14'" in message and "CONCEPTEDIT_CLIP_MODEL" in message
        assert "model=DIR" in message
    with pytest.raises(PluginError, match="nowhere"):
        _evaluator("clip-score", model=str(tmp_path / "nowhere"))


# --- FID features ---------------------------------------------------------------------------


def test_missing_clean_fid_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def no_cleanfid(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("cleanfid"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanfid)
    with pytest.raises(PluginError, match=r'pip install "conceptedit\[fid\]"'):
        _evaluator("fid-features")


def test_missing_fid_weights_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cleanfid")
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: offline, at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("CONCEPTEDIT_FID_WEIGHTS", str(tmp_path))
    with pytest.raises(PluginError) as caught:
        _evaluator("fid-features")
    message = str(caught.value)
    assert "inception-2015-12-05.pt" in message and "CONCEPTEDIT_FID_WEIGHTS" in message and "weights=DIR" in message


class _StandIn(torch.nn.Module):
    """Shaped like clean-fid's TorchScript Inception: ``layers`` maps normalised 299 x 299 images to
    2048 features; here the channel means, repeated."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _ChannelMeans()

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        return self.layers(x)


class _ChannelMeans(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[-2:] == (299, 299)
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # clean-fid's network is TorchScript
def test_fid_features_feed_the_network_as_clean_fid_does(tmp_path: Path) -> None:
    pytest.importorskip("cleanfid")
    torch.jit.save(torch.jit.script(_StandIn()), tmp_path / "inception-2015-12-05.pt")
    scorer = _evaluator("fid-features", weights=str(tmp_path))
    colours = [(200, 100, 50), (0, 255, 128)]
    rows = scorer.score([Sample("x", 0, Image.new("RGB", (64 + 9 * i, 48), c)) for i, c in enumerate(colours)])
    for row, colour in zip(rows, colours, strict=True):
        assert set(row) == {"inception"} and len(row["inception"]) == 2048
        # a flat image stays flat through the resize; the network sees (x - 128) / 128 per RGB channel
        assert row["inception"][:3] == pytest.approx([(c - 128) / 128 for c in colour], abs=1e-5)
    assert scorer.protocol()["weights"] == "inception-2015-12-05.pt"


def test_coco_suite_reports_fid_to_the_base_models_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite side of FID: features of both models' images, compared as sets. Inception is
    replaced by pixel statistics (no weights here); the pairing and the distance are the real ones."""
    from conceptedit_builtin.fid_features import FIDFeatures
    from conftest import SHARED_PROMPTS

    import conceptedit
    from conceptedit.api.recipe import EvaluateSpec
    from conceptedit.evaluation.evaluate import evaluate

    def pixel_features(self: Any, samples: list[Sample]) -> list[dict[str, Any]]:
        arrays = [np.asarray(s.image.convert("RGB"), dtype=np.float64) / 255 for s in samples]
        return [{"inception": [*a.mean(axis=(0, 1)), *a.std(axis=(0, 1))]} for a in arrays]

    monkeypatch.setattr(FIDFeatures, "__init__", lambda self: None)
    monkeypatch.setattr(FIDFeatures, "score", pixel_features)
    base = conceptedit.load_model("builtin:tiny-sd").pipeline
    edited = conceptedit.load_model("builtin:tiny-sd").pipeline
    with torch.no_grad():
        for name, param in edited.unet.named_parameters():
            if name.endswith("attn2.to_v.weight"):
                param.mul_(3.0)
    spec = EvaluateSpec(
        suite="coco-3k", options={"root": str(SHARED_PROMPTS), "scorer": "fid-features"}, limit=8, steps=2
    )
    (result,) = evaluate(edited, [spec], host=get_host(), base_pipeline=base)
    assert result.base_metrics == {"fid_to_base": 0.0}  # the base model against itself
    assert result.metrics["fid_to_base"] > 0
    (same,) = evaluate(base, [spec], host=get_host(), base_pipeline=conceptedit.load_model("builtin:tiny-sd").pipeline)
    assert same.metrics["fid_to_base"] == pytest.approx(0.0, abs=1e-9)
