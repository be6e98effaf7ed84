"""The public prompt suites: pinned sources, rows with their seeds, guidance and labels, local copies,
downloads, summaries, and one evaluation on the tiny model. The data are read from the shared copies
beside the checkout and never copied into the repository."""

from __future__ import annotations

import csv
import io
import json
import typing
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from conceptedit_builtin.public_suites import MIRROR_ENV
from conceptedit_builtin.trce_eot import PriorSpec
from conftest import SHARED_PROMPTS
from PIL import Image
from pydantic import ValidationError

import conceptedit
from conceptedit import RecipeError, load_recipe
from conceptedit.api.evaluator import Sample
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.api.suite import PromptSuite
from conceptedit.data import prompt_files, sources
from conceptedit.data.prompt_files import PromptFileError, read_prompts
from conceptedit.evaluation.evaluate import evaluate
from conceptedit.io.hashing import file_sha256
from conceptedit.plugins import get_host
from conceptedit.testing import tiny_recipe
from conceptedit.toolkit import NUDENET_EXPOSED as EXPOSED

NUDITY = sources.UNLEARNDIFFATK_NUDITY.name


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror set in the developer's environment must not decide where a test reads from."""
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def _manifest() -> dict[str, dict[str, str]]:
    with (SHARED_PROMPTS / "MANIFEST.csv").open(newline="", encoding="utf-8") as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


def _rows(name: str) -> list[dict[str, str]]:
    with (SHARED_PROMPTS / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _suite(name: str, **options: Any) -> PromptSuite:
    cls = get_host().suite(name)
    return cls(cls.Options.model_validate({"root": str(SHARED_PROMPTS), **options}))


@pytest.mark.parametrize("source", sources.ALL_SOURCES, ids=lambda source: source.name)
def test_each_source_pins_the_published_file(source: sources.PromptSource) -> None:
    entry = _manifest()[source.name]
    assert len(entry["commit"]) == 40
    assert source.url == f"https://raw.githubusercontent.com/{entry['repo']}/{entry['commit']}/{entry['path']}"
    assert file_sha256(SHARED_PROMPTS / source.name) == source.sha256 == entry["sha256"]


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("i2p", 4703),
        ("i2p-sexual", 931),
        ("unlearndiffatk-nudity", 142),
        ("unlearndiffatk-violence", 756),
        ("p4d-nudity", 361),
        ("ring-a-bell-violence", 250),
        ("coco-3k", 3000),
        ("coco-10k", 9969),
        ("coco-30k", 30000),
        ("esd-artists", 100),
    ],
)
def test_suite_sizes(name: str, rows: int) -> None:
    assert len(_suite(name).prompts()) == rows


@pytest.mark.parametrize(
    ("name", "option", "table"),
    [
        ("p4d-nudity", "target", sources.P4D_NUDITY),
        ("ring-a-bell-violence", "variant", sources.RING_A_BELL_VIOLENCE),
        ("esd-artists", "set", sources.ESD_ARTISTS),
    ],
)
def test_every_choice_reads_its_own_file(name: str, option: str, table: dict[str, sources.PromptSource]) -> None:
    choices = typing.get_args(get_host().suite(name).Options.model_fields[option].annotation)
    assert set(choices) == set(table)
    manifest = _manifest()
    for choice in choices:
        prompts = _suite(name, **{option: choice}).prompts()
        assert [p.text for p in prompts] == [row["prompt"] for row in _rows(table[choice].name)]
        assert len(prompts) == int(manifest[table[choice].name]["rows"])


def test_prompts_carry_their_rows_seed_guidance_and_labels() -> None:
    rows = _rows(NUDITY)
    prompts = _suite("unlearndiffatk-nudity").prompts()
    assert [p.text for p in prompts] == [row["prompt"] for row in rows]
    assert [p.seed for p in prompts] == [int(row["evaluation_seed"]) for row in rows]
    assert [p.guidance for p in prompts] == [float(row["evaluation_guidance"]) for row in rows]
    assert len({p.guidance for p in prompts}) > 1  # each prompt its own scale
    row, labels = rows[7], prompts[7].labels
    assert labels["case_number"] == int(row["case_number"])
    assert labels["nudity_percentage"] == float(row["nudity_percentage"])
    assert list(labels["categories"]) == [c.strip() for c in row["categories"].split(",")]

    coco_rows, coco = _rows(sources.COCO_30K.name), _suite("coco-30k").prompts()
    assert all(p.guidance is None for p in coco)  # no guidance column: the evaluation's default applies
    assert coco[123].seed == int(coco_rows[123]["evaluation_seed"])
    assert coco[123].labels == {"image_id": int(coco_rows[123]["image_id"])}

    artists, artist_rows = _suite("esd-artists", set="vangogh").prompts(), _rows(sources.ESD_ARTISTS["vangogh"].name)
    assert [p.labels["artist"] for p in artists] == [row["artist"] for row in artist_rows]


def test_i2p_sexual_is_the_sexual_category_of_i2p() -> None:
    rows = _rows(sources.I2P.name)
    wanted = [int(r["case_number"]) for r in rows if "sexual" in [c.strip() for c in r["categories"].split(",")]]
    prompts = _suite("i2p-sexual").prompts()
    assert [p.labels["case_number"] for p in prompts] == wanted
    assert all("sexual" in p.labels["categories"] for p in prompts)


def test_coco_3k_holds_the_captions_of_trces_prior() -> None:
    prior = PriorSpec()
    assert prompt_files.SOURCES[prior.captions] is sources.COCO_30K  # TRCE's default caption file
    coco_3k = _suite("coco-3k").prompts()
    assert [p.text for p in coco_3k] == read_prompts(SHARED_PROMPTS / sources.COCO_30K.name, limit=prior.limit)
    assert coco_3k == _suite("coco-30k").prompts()[: len(coco_3k)]


def test_seeds_past_int32_survive() -> None:
    rows = _rows(sources.I2P.name)
    top = max(rows, key=lambda row: int(row["evaluation_seed"]))
    seed = int(top["evaluation_seed"])
    assert seed > 2**31 - 1  # the case the test is about
    (prompt,) = [p for p in _suite("i2p").prompts() if p.labels["case_number"] == int(top["case_number"])]
    assert type(prompt.seed) is int and prompt.seed == seed
    assert json.loads(json.dumps({"seeds": [prompt.seed]})) == {"seeds": [seed]}
    assert torch.Generator().manual_seed(prompt.seed).initial_seed() == seed
    # Why seeds from 2**32 on are refused: the CPU generator keys on the low 32 bits only.
    same = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (seed, seed + 2**32)]
    assert torch.equal(*same)


def test_a_seed_past_32_bits_is_refused(tmp_path: Path) -> None:
    rows = _rows(NUDITY)
    rows[3]["evaluation_seed"] = str(2**32 + 5)
    changed = tmp_path / "nudity.csv"
    with changed.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    suite = _suite("unlearndiffatk-nudity", path=str(changed), verify=False)
    outside = r"row 3: seed 4294967301 is outside \[0, 2\*\*32\)"
    with pytest.raises(PromptFileError, match=outside), pytest.warns(UserWarning, match="sha256"):
        suite.prompts()


def test_a_changed_local_copy_is_refused_unless_asked(tmp_path: Path) -> None:
    original = SHARED_PROMPTS / NUDITY
    text = original.read_text(encoding="utf-8")
    first = _rows(NUDITY)[0]["prompt"]
    changed = tmp_path / "nudity.csv"
    changed.write_text(text.replace(first, "a bowl of fruit", 1), encoding="utf-8")
    assert changed.read_text(encoding="utf-8") != text
    with pytest.raises(PromptFileError) as caught:
        _suite("unlearndiffatk-nudity", path=str(changed)).prompts()
    said = str(caught.value)
    assert str(changed) in said and sources.UNLEARNDIFFATK_NUDITY.sha256 in said and "verify: false" in said
    with pytest.warns(UserWarning, match="not those of the published set"):
        prompts = _suite("unlearndiffatk-nudity", path=str(changed), verify=False).prompts()
    assert prompts[0].text == "a bowl of fruit" and len(prompts) == 142
    assert len(_suite("unlearndiffatk-nudity", path=str(original)).prompts()) == 142  # the real file passes


def test_a_mirror_is_found_by_option_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = get_host().suite("coco-10k")
    with pytest.raises(PromptFileError, match=r"does not exist") as caught:
        cls(cls.Options(root=tmp_path)).prompts()
    assert str(tmp_path / sources.COCO_10K.name) in str(caught.value)
    monkeypatch.setenv(MIRROR_ENV, str(SHARED_PROMPTS))
    assert len(cls(cls.Options()).prompts()) == 9969
    with pytest.raises(PromptFileError):  # the option wins over the environment
        cls(cls.Options(root=tmp_path)).prompts()


def test_a_failed_download_names_the_url_and_the_local_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path))

    def offline(url: str, timeout: float) -> Any:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cls = get_host().suite("ring-a-bell-violence")
    with pytest.raises(PromptFileError) as caught:
        cls(cls.Options()).prompts()
    said = str(caught.value)
    assert sources.RING_A_BELL_VIOLENCE["eta_5.5_K_77"].url in said and "no route to host" in said
    assert "local path" in said and "`path: FILE`" in said


def test_a_download_is_cached_under_its_repository_path_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCEPTEDIT_CACHE", str(tmp_path))
    source = sources.RING_A_BELL_VIOLENCE["eta_5.5_K_38"]
    data = (SHARED_PROMPTS / source.name).read_bytes()
    asked: list[str] = []

    def serve(url: str, timeout: float) -> io.BytesIO:
        asked.append(url)
        return io.BytesIO(data)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    cls = get_host().suite("ring-a-bell-violence")
    first = cls(cls.Options(variant="eta_5.5_K_38")).prompts()
    assert cls(cls.Options(variant="eta_5.5_K_38")).prompts() == first and len(first) == 250
    assert asked == [source.url]  # downloaded once
    cached = tmp_path / "prompts" / "chiayi-hsu__Ring-A-Bell" / "data" / "InvPrompt" / "Violence"
    assert (cached / "Violence_eta_5.5_K_38.csv").read_bytes() == data
    assert cls(cls.Options(variant="eta_5.5_K_38", root=tmp_path / "prompts")).prompts() == first  # a mirror too


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("p4d-nudity", {"target": "sld"}, "target"),
        ("ring-a-bell-violence", {"variant": "eta_6_K_77"}, "variant"),
        ("esd-artists", {"set": "monet"}, "set"),
        ("i2p", {"seeds": 3}, "seeds"),
        ("coco-3k", {"pth": "/tmp/coco.csv"}, "pth"),
    ],
)
def test_unknown_options_are_refused(name: str, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        get_host().suite(name).Options.model_validate(options)


def test_recipes_check_public_suite_options() -> None:
    recipe = tiny_recipe(
        {"method": "trce_eot", "params": {"concepts": "c", "prior": None}}, concepts={"c": {"pairs": [["a", "b"]]}}
    )
    recipe["evaluate"] = [{"suite": "esd-artists", "options": {"set": "monet"}}]
    with pytest.raises(RecipeError, match=r"evaluate\.0\.options\.set"):
        load_recipe(recipe)


def test_scorers_and_summaries() -> None:
    concepts = {"i2p": "inappropriate", "unlearndiffatk-violence": "violence", "ring-a-bell-violence": "violence"}
    scorers = {"i2p-sexual": "nudenet", "unlearndiffatk-nudity": "nudenet", "p4d-nudity": "nudenet"}
    scorers |= {name: "clip-concept" for name in concepts}
    scorers |= {name: "clip-score" for name in ("coco-3k", "coco-10k", "coco-30k", "esd-artists")}
    for name, scorer in scorers.items():
        suite = _suite(name)
        assert suite.scorer == scorer
        assert suite.scorer_options() == ({"concept": concepts[name]} if name in concepts else {})

    # NudeNet's own rows, from chosen detections
    nudenet = get_host().registry.evaluators["nudenet"]()
    detections = [
        [("BUTTOCKS_EXPOSED", 0.7), ("FEET_EXPOSED", 0.5)],
        [("FEET_EXPOSED", 0.9), ("FEMALE_BREAST_EXPOSED", 0.3)],
        [],
        [("FACE_FEMALE", 0.99)],
    ]
    rows = []
    for found in detections:
        nudenet.detector.detect = lambda image, found=found: [
            {"class": c, "score": s, "box": [0, 0, 1, 1]} for c, s in found
        ]
        rows += nudenet.score([Sample("x", 0, Image.new("RGB", (64, 64)))])
    suite = _suite("p4d-nudity")
    metrics = suite.summarise(suite.prompts()[:4], rows)
    assert metrics["unsafe_rate_i2p"] == 0.25 and metrics["unsafe_rate_exposed9"] == 0.5
    assert metrics["count_FEET_EXPOSED"] == 2 and metrics["count_BUTTOCKS_EXPOSED"] == 1
    assert metrics["count_FEMALE_BREAST_EXPOSED"] == 0  # below the threshold
    assert set(metrics) == set(suite.higher_is_better) and {f"count_{c}" for c in EXPOSED} <= set(metrics)

    concept = _suite("unlearndiffatk-violence")
    metrics = concept.summarise([], [{"detected": True, "probability": 0.9}, {"detected": False, "probability": 0.2}])
    assert metrics == pytest.approx({"concept_rate": 0.5, "concept_prob": 0.55})
    assert set(metrics) == set(concept.higher_is_better) and not any(concept.higher_is_better.values())

    clip = _suite("esd-artists")
    metrics = clip.summarise([], [{"clip_score": 31.0}, {"clip_score": 20.0}])
    assert metrics == {"clip_score": 25.5} and clip.higher_is_better["clip_score"] is True


def test_unlearndiffatk_nudity_end_to_end_on_tiny_sd(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> Any:
        raise AssertionError(f"the evaluation tried to download {url}")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    rows = _rows(NUDITY)[:2]
    pipeline = conceptedit.load_model("builtin:tiny-sd").pipeline
    spec = EvaluateSpec(
        suite="unlearndiffatk-nudity",
        options={"path": str(SHARED_PROMPTS / NUDITY)},
        limit=2,
        steps=2,
        compare_base=False,
    )
    (result,) = evaluate(pipeline, [spec], host=get_host())
    assert result.n == 2 and result.protocol["scorer"] == "nudenet" and result.base_metrics is None
    assert result.protocol["seeds"] == [int(row["evaluation_seed"]) for row in rows]
    assert [example.prompt for example in result.examples] == [row["prompt"] for row in rows]
    assert set(result.metrics) == set(get_host().suite("unlearndiffatk-nudity").higher_is_better)
    assert all(0.0 <= result.metrics[key] <= 1.0 for key in ("unsafe_rate_i2p", "unsafe_rate_exposed9"))
