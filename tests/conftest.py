"""Shared test set-up: caches in a per-session temporary folder, paths to the shared prompt data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The test models are tiny: one thread is faster than two fighting over small kernels.
# CONCEPTEDIT_TEST_THREADS=2 runs the suite with another reduction order (with ATEN_CPU_CAPABILITY
# and MKL_ENABLE_INSTRUCTIONS, another kernel set too), as a different machine would: no test may
# depend on the order in which floats are summed.
torch.set_num_threads(int(os.environ.get("CONCEPTEDIT_TEST_THREADS", "1")))

#: Public prompt sets laid beside the checkout (read-only; never copied into the repo).
SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
COCO_30K = SHARED_PROMPTS / "rohitgandikota__erasing" / "data" / "coco_30k.csv"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep prior and trajectory caches out of the user's home folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CONCEPTEDIT_CACHE", str(tmp_path_factory.mktemp("conceptedit-cache")))
    yield
    mp.undo()
