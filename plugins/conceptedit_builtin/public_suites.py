"""The published prompt sets of the erasure literature as suites: I2P, UnlearnDiffAtk, P4D, Ring-A-Bell,
COCO captions and ESD's artist prompts.

Each suite reads one pinned CSV (the toolkit's ``prompt_sources``): a local copy (option ``path``,
or ``root``, a folder laid out as ``<owner>__<repo>/<path>``, default ``$CONCEPTEDIT_PROMPT_MIRROR``)
or a download kept in the cache. Either way its sha256 is checked; ``verify: false`` accepts a
changed local copy with a warning. Every row is drawn with its published seed and, where the set
has one, its guidance scale, so the images match the papers' protocol; the row's facts (I2P
categories and nudity percentage, case number, artist) travel with it as labels.

The scorer follows the concept: NudeNet for the nudity sets, a CLIP zero-shot concept detector
for I2P and the violence sets, the CLIP score for COCO and the artist sets (preservation) or,
with ``scorer: change-from-base``, the distance from the base model's image at the same seed
(no weights needed). ``unlearndiffatk-nudity-attack`` runs the UnlearnDiffAtk attack on the
nudity prompts, judged by NudeNet's nine-class protocol as in that paper.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from conceptedit import AttackSettings, PathText, PromptSuite, SuiteOptions, SuitePrompt, hookimpl
from conceptedit.toolkit import (
    ATTACK_DIRECTIONS,
    NUDENET_EXPOSED,
    PromptFileError,
    PromptSource,
    attack_metrics,
    change_metrics,
    default_cache_dir,
    fid_from_features,
    local_copy,
    prompt_sources,
    read_rows,
)

#: Environment variable naming a default mirror folder for every public suite.
MIRROR_ENV = "CONCEPTEDIT_PROMPT_MIRROR"
SEED = "evaluation_seed"
GUIDANCE = "evaluation_guidance"
#: torch's CPU generator seeds its Mersenne Twister with the low 32 bits only, so a larger seed
#: would silently draw the image of ``seed % 2**32``; the published sets stay below (I2P's largest
#: is 4,290,749,014, past int32 but not uint32).
SEED_LIMIT = 2**32
#: CSV columns kept as labels when a file has them, and how to read each.
LABELS: dict[str, Callable[[str], Any]] = {
    "categories": lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
    "nudity_percentage": float,
    "inappropriate_percentage": float,
    "hard": lambda text: text.strip() == "1",
    "case_number": int,
    "image_id": int,
    "artist": str,
}
#: First rows of COCO-30k in ``coco-3k``: the same captions trce_eot's preservation prior uses by default.
COCO_3K_ROWS = 3000


class PublicOptions(SuiteOptions):
    path: PathText | None = Field(
        None, description="Local copy of the suite's file (default: downloaded to the cache)."
    )
    root: PathText | None = Field(
        None, description=f"Folder laid out as <owner>__<repo>/<path> holding the file (default ${MIRROR_ENV})."
    )
    verify: bool = Field(
        True, description="Refuse a local copy whose sha256 is not the published file's (false: warn and use it)."
    )


class PublicSuite(PromptSuite):
    """A suite over one published CSV: a prompt per row, with the row's seed, guidance and labels."""

    Options = PublicOptions

    @abstractmethod
    def source(self) -> PromptSource:
        """The file this suite reads (it may depend on the options)."""

    def select(self, rows: list[dict[str, str]]) -> list[dict[str, str]]:
        """The rows of the file the suite keeps: all of them unless a subset is the point."""
        return rows

    def prompts(self) -> list[SuitePrompt]:
        source = self.source()
        path = self._local_file(source)
        rows = read_rows(path, [source.column, SEED])
        return [self._prompt(row, source.column, f"{path}, row {i}") for i, row in enumerate(self.select(rows))]

    def _local_file(self, source: PromptSource) -> Path:
        options: PublicOptions = self.options  # type: ignore[assignment]
        root = options.root or os.environ.get(MIRROR_ENV) or None
        path = Path(options.path) if options.path else None
        try:
            return local_copy(
                source, default_cache_dir(), path=path, root=Path(root) if root else None, verify=options.verify
            )
        except PromptFileError as exc:
            raise PromptFileError(
                f"suite {self.name!r}: {exc}. Suite options: `path: FILE` for a local copy, `root: DIR` for a "
                "folder laid out as <owner>__<repo>/<path>, `verify: false` to use a changed copy anyway"
            ) from exc

    @staticmethod
    def _prompt(row: Mapping[str, str], column: str, where: str) -> SuitePrompt:
        try:
            seed = int(row[SEED])
            guidance = float(row[GUIDANCE]) if GUIDANCE in row else None
            labels = {key: read(row[key]) for key, read in LABELS.items() if key in row}
        except ValueError as exc:
            raise PromptFileError(f"{where}: {exc}") from exc
        if not 0 <= seed < SEED_LIMIT:
            raise PromptFileError(
                f"{where}: seed {seed} is outside [0, 2**32); torch's CPU generator keeps only the low 32 bits"
            )
        return SuitePrompt(row[column], seed, labels, guidance)


class NudenetSuite(PublicSuite):
    """Nudity prompts scored by NudeNet under both protocols, with a per-class count (MACE's table)."""

    scorer = "nudenet"
    higher_is_better: ClassVar[Mapping[str, bool]] = {
        "unsafe_rate_i2p": False,
        "unsafe_rate_exposed9": False,
        **{f"count_{name}": False for name in NUDENET_EXPOSED},
    }

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        n = max(len(scores), 1)
        out = {
            "unsafe_rate_i2p": sum(bool(s["i2p_unsafe"]) for s in scores) / n,
            "unsafe_rate_exposed9": sum(bool(s["exposed9_unsafe"]) for s in scores) / n,
        }
        # Images in which the class passes the nine-class threshold; every class always listed, so
        # two models' tables line up.
        return out | {
            f"count_{name}": float(sum(name in s["exposed9_classes"] for s in scores)) for name in NUDENET_EXPOSED
        }


class ConceptSuite(PublicSuite):
    """Prompts scored by the CLIP zero-shot detector for ``concept``."""

    scorer = "clip-concept"
    concept: ClassVar[str]
    higher_is_better: ClassVar[Mapping[str, bool]] = {"concept_rate": False, "concept_prob": False}

    def scorer_options(self) -> dict[str, Any]:
        return {"concept": self.concept}

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        n = max(len(scores), 1)
        return {
            "concept_rate": sum(bool(s["detected"]) for s in scores) / n,
            "concept_prob": sum(float(s["probability"]) for s in scores) / n,
        }


class PreservationOptions(PublicOptions):
    scorer: Literal["clip-score", "change-from-base", "fid-features"] = Field(
        "clip-score",
        description="CLIP score of image and prompt, distance from the base model's image at the same seed, "
        "or FID to the base model's images.",
    )


class ClipScoreSuite(PublicSuite):
    """Preservation prompts scored by image-text CLIP score (an erasure should leave it where it was),
    by the change from the base model's image at the same seed, or by FID to the base model's
    images (Inception features, compared as a set)."""

    scorer = "clip-score"
    Options = PreservationOptions
    higher_is_better: ClassVar[Mapping[str, bool]] = {
        "clip_score": True,
        "pixel_mae": False,
        "latent_rmse": False,
        "latent_relative": False,
        "fid_to_base": False,
    }

    def __init__(self, options: SuiteOptions) -> None:
        super().__init__(options)
        self.scorer = options.scorer  # type: ignore[attr-defined]  # the options class is this suite's own

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if self.scorer == "change-from-base":
            return change_metrics(scores)
        if self.scorer == "fid-features":
            return {}  # FID is a property of two sets: see compare
        return {"clip_score": sum(float(s["clip_score"]) for s in scores) / max(len(scores), 1)}

    def compare(self, scores: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if self.scorer != "fid-features":
            return {}
        return {"fid_to_base": fid_from_features([s["inception"] for s in scores], [s["inception"] for s in reference])}


class I2P(ConceptSuite):
    name = "i2p"
    summary = "I2P: all 4,703 prompts (7 categories), own seeds and guidance; CLIP concept 'inappropriate'"
    concept = "inappropriate"

    def source(self) -> PromptSource:
        return prompt_sources.I2P


class I2PSexual(NudenetSuite):
    name = "i2p-sexual"
    summary = "I2P prompts of category 'sexual' (931), own seeds and guidance; NudeNet"

    def source(self) -> PromptSource:
        return prompt_sources.I2P

    def select(self, rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [row for row in rows if "sexual" in LABELS["categories"](row["categories"])]


class UnlearnDiffAtkNudity(NudenetSuite):
    name = "unlearndiffatk-nudity"
    summary = "UnlearnDiffAtk's 142 nudity prompts (from I2P), own seeds and guidance; NudeNet"

    def source(self) -> PromptSource:
        return prompt_sources.UNLEARNDIFFATK_NUDITY


class AttackedNudityOptions(PublicOptions, AttackSettings):
    pass


class UnlearnDiffAtkNudityAttack(UnlearnDiffAtkNudity):
    name = "unlearndiffatk-nudity-attack"
    summary = "UnlearnDiffAtk's 142 nudity prompts under its prompt attack (needs a base model); NudeNet 9 classes"
    scorer = "unlearndiffatk"
    Options = AttackedNudityOptions
    higher_is_better = ATTACK_DIRECTIONS

    def scorer_options(self) -> dict[str, Any]:
        options: AttackedNudityOptions = self.options  # type: ignore[assignment]
        return options.attack_options("nudenet")

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return attack_metrics(scores)


class UnlearnDiffAtkViolence(ConceptSuite):
    name = "unlearndiffatk-violence"
    summary = "UnlearnDiffAtk's 756 violence prompts (I2P's violence category), own seeds and guidance; CLIP concept"
    concept = "violence"

    def source(self) -> PromptSource:
        return prompt_sources.UNLEARNDIFFATK_VIOLENCE


class P4DOptions(PublicOptions):
    target: Literal["esd", "sldMAX", "sldSTRONG", "std_neg"] = Field(
        "esd", description="Model P4D attacked: its ideal prompts are the I2P rows that model drew nude."
    )


class P4DNudity(NudenetSuite):
    name = "p4d-nudity"
    summary = "P4D's ideal nudity prompts per attacked model (esd: 361), own seeds and guidance; NudeNet"
    Options = P4DOptions

    def source(self) -> PromptSource:
        options: P4DOptions = self.options  # type: ignore[assignment]
        return prompt_sources.P4D_NUDITY[options.target]


class RingABellOptions(PublicOptions):
    variant: Literal["eta_5.5_K_77", "eta_5.5_K_38", "eta_5_K_77"] = Field(
        "eta_5.5_K_77", description="Ring-A-Bell's inversion setting: concept strength eta and prompt length K."
    )


class RingABellViolence(ConceptSuite):
    name = "ring-a-bell-violence"
    summary = "Ring-A-Bell's 250 adversarial violence prompts, own seeds; CLIP concept 'violence'"
    Options = RingABellOptions
    concept = "violence"

    def source(self) -> PromptSource:
        options: RingABellOptions = self.options  # type: ignore[assignment]
        return prompt_sources.RING_A_BELL_VIOLENCE[options.variant]


class Coco30k(ClipScoreSuite):
    name = "coco-30k"
    summary = "COCO-30k: one caption per image for 30,000 MS-COCO images (ESD's file), own seeds; CLIP score"

    def source(self) -> PromptSource:
        return prompt_sources.COCO_30K


class Coco10k(ClipScoreSuite):
    name = "coco-10k"
    summary = "UnlearnDiffAtk's 9,969 COCO captions, own seeds; CLIP score"

    def source(self) -> PromptSource:
        return prompt_sources.COCO_10K


class Coco3k(Coco30k):
    name = "coco-3k"
    summary = "the first 3,000 rows of COCO-30k (trce_eot's default prior captions), own seeds; CLIP score"

    def select(self, rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return rows[:COCO_3K_ROWS]


class EsdArtistOptions(PreservationOptions):
    set: Literal[
        "big_artist",
        "niche_art",
        "short_niche_art",
        "vangogh",
        "kelly",
        "art",
        "artwork",
        "famous_art",
        "generic_artists",
    ] = Field("big_artist", description="ESD prompt file data/<set>_prompts.csv.")


class EsdArtists(ClipScoreSuite):
    name = "esd-artists"
    summary = "ESD's artist-style prompts (set: big_artist, 100, ...), own seeds, artist as label; CLIP score"
    Options = EsdArtistOptions

    def source(self) -> PromptSource:
        options: EsdArtistOptions = self.options  # type: ignore[assignment]
        return prompt_sources.ESD_ARTISTS[options.set]


@hookimpl
def conceptedit_register_suites(register: Callable[[type[PromptSuite]], None]) -> None:
    for suite in (
        I2P,
        I2PSexual,
        UnlearnDiffAtkNudity,
        UnlearnDiffAtkNudityAttack,
        UnlearnDiffAtkViolence,
        P4DNudity,
        RingABellViolence,
        Coco3k,
        Coco10k,
        Coco30k,
        EsdArtists,
    ):
        register(suite)
