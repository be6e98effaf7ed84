"""The same recipe trains data-parallel across two processes (torchrun, CPU, gloo) with no code change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import conceptedit
from conceptedit.models.builtin import build_tiny_sd

SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
import conceptedit
recipe = {
    "schema_version": 1, "model": "builtin:tiny-sd", "seed": 0, "device": "cpu",
    "concepts": {"c": {"pairs": [["a cat", "a dog"]], "templates": ["{}", "a photo of {}"]}},
    "edits": [
        {"method": "trce_eot", "params": {"concepts": "c", "prior": None, "ridge": 0.1}},
        {"method": "trce_steer", "params": {"concepts": "c", "trajectories_per_concept": 2, "sampling_steps": 6,
                                            "unconditional_trajectories": 4, "regularization_batch": 2},
         "training": {"steps": 3, "lr": 1e-4}},
    ],
}
result = conceptedit.apply(recipe, out=sys.argv[1], quiet=True)
print("done", result.run_dir)
"""


def test_two_process_training_writes_one_run_folder(tmp_path: Path) -> None:
    script = tmp_path / "run_recipe.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, CONCEPTEDIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done") == 2  # both ranks finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run", "run_recipe.py"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["edits"][1]["details"]["steps"] == 3
    # the edit reloads into a fresh base model and changed the trained subset
    saved = load_file(str(tmp_path / "run" / "edit.safetensors"))
    assert any(".attn1." in name for name in saved)
    pipe = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    name = next(n for n in saved if ".attn1." in n)
    assert torch.equal(pipe.unet.get_parameter(name.removeprefix("unet.")), saved[name])


def _eval(tmp_path: Path, out: str, processes: int) -> dict[str, object]:
    args = [
        "-m",
        "conceptedit",
        "eval",
        "builtin:shapes",
        "--suite",
        "shapes-explicit",
        "--suite",
        "shapes-preserve",
        "--option",
        "target=red",
        "--option",
        "seeds=1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / out),
        "-q",
    ]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29519"]
        if processes > 1
        else [sys.executable]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / out / "metrics.json").read_text())


def test_two_process_eval_equals_one_process_eval(tmp_path: Path) -> None:
    """Prompts shard across processes and gather back in order: identical metrics, no gaps or repeats."""
    one, two = _eval(tmp_path, "one", 1), _eval(tmp_path, "two", 2)
    assert one == two
    assert [s["n"] for s in one["suites"]] == [4, 24]  # type: ignore[index]
