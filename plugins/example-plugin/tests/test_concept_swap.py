"""concept_swap on the built-in tiny model: a few seconds on a laptop CPU, nothing downloaded."""

from pathlib import Path

import conceptedit_example
import pytest

import conceptedit
from conceptedit.testing import isolated_host, tiny_recipe
from conceptedit.toolkit import StableDiffusionAdapter

SWAP = {"method": "concept_swap", "params": {"concept": "a cat", "target": "a dog", "preserve": ["a house"]}}


def test_cat_now_projects_like_dog_and_house_is_kept(tmp_path: Path) -> None:
    with isolated_host(conceptedit_example):  # core plugins + yours: other installed plugins can't interfere
        result = conceptedit.apply(tiny_recipe(SWAP), out=tmp_path / "run", quiet=True)

    assert result.changed  # only cross-attention keys and values, nothing else
    assert all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in result.changed)

    base = conceptedit.load_model("builtin:tiny-sd").pipeline  # the same seeded weights the run started from
    cat, dog, house = StableDiffusionAdapter(base).encode_prompts(["a cat", "a dog", "a house"]).row("eot")
    for name in result.changed:
        key = name.removeprefix("unet.")
        old, new = base.unet.get_parameter(key).detach(), result.pipeline.unet.get_parameter(key).detach()
        assert (new @ cat - old @ dog).norm() < 0.2 * (old @ cat - old @ dog).norm(), name
        assert (new @ house - old @ house).norm() < 0.01 * (old @ house).norm(), name


def test_a_misspelt_parameter_is_a_recipe_error() -> None:
    typo = {"method": "concept_swap", "params": {"concept": "a cat", "target": "a dog", "preserv": ["a house"]}}
    with isolated_host(conceptedit_example), pytest.raises(conceptedit.RecipeError, match="did you mean 'preserve'"):
        conceptedit.load_recipe(tiny_recipe(typo))
