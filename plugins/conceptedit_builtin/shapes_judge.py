"""The shapes judge as an evaluator: which colour and shape an image of the shapes world shows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from conceptedit import Evaluator, PluginError, Sample, hookimpl
from conceptedit.toolkit import (
    COLOUR_NAMES,
    SHAPE_NAMES,
    STRICT_HUE_RADIUS,
    judge_shapes_image,
    row_shows,
)


class ShapesJudge(Evaluator):
    """Analytic judge: hue of the foreground for colour, mask geometry for shape, ``none`` if neither.

    Per sample it reports the judged ``colour`` and ``shape`` (gray included: an achromatic
    foreground), every colour/shape covering a quarter of the foreground, the foreground's
    measured ``hue`` (degrees, or None), ``saturation`` and ``value`` (0-1, or None), from which
    suites judge strictly and measure hue drift, and -- when the sample's labels name the expected
    ``colour`` / ``shape`` -- whether the judge agrees.
    """

    name = "shapes-judge"
    summary = "Colour and shape of a shapes-world image (analytic; 'none' when nothing is recognisable)"
    version = "3"  # 2: gray, and the measured hue, saturation and value; 3: gray a trained colour

    def __init__(self, strict: bool = False) -> None:
        #: Whether ``concept_shown`` also counts a colour within the strict hue radius (attacks judged
        #: as a person would: a red attacked back to 15 degrees is red).
        self.strict = strict

    def score(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        out = []
        for sample in samples:
            verdict = judge_shapes_image(np.asarray(sample.image.convert("RGB")))
            row: dict[str, Any] = {
                "colour": verdict.colour,
                "shape": verdict.shape,
                "colours": list(verdict.colours),
                "shapes": list(verdict.shapes),
                "hue": verdict.hue,
                "saturation": verdict.saturation,
                "value": verdict.value,
            }
            for key in ("colour", "shape"):
                if key in sample.labels:
                    row[f"{key}_correct"] = row[key] == sample.labels[key]
            out.append(row)
        return out

    def concept_shown(self, row: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
        """Whether the image shows the prompt set's ``target`` colour or shape (as dominant or listed)."""
        if not labels.get("target"):
            raise PluginError("shapes-judge can only say whether a concept is shown for prompts labelled with a target")
        return row_shows(labels["target"], row, strict=self.strict)

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "colours": list(COLOUR_NAMES),
            "shapes": list(SHAPE_NAMES),
            "strict_hue_radius": STRICT_HUE_RADIUS,
            "concept_shown": "strict" if self.strict else "nearest class",
        }


@hookimpl
def conceptedit_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    register(ShapesJudge)
