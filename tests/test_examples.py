"""The example Makefiles run the real stage commands end to end (slow: `make test-all`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STAGES = (
    "model",
    "surrogate",
    "scores",
    "select-random",
    "select-albat",
    "train-none",
    "train-random",
    "train-albat",
    "eval",
)


def make(example: str, runs: Path) -> subprocess.CompletedProcess:
    # One torch thread unless told otherwise: the tiny backbones gain nothing from more, and on
    # a shared or busy machine oversubscribed threads make the run many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        ["make", "-C", EXAMPLES / example, f"RUNS={runs}"], capture_output=True, text=True, env=env
    )


@pytest.mark.slow
def test_tiny_lm_makefile_runs_the_pipeline_and_is_up_to_date_the_second_time(tmp_path):
    runs = tmp_path / "runs"
    first = make("tiny-lm", runs)
    assert first.returncode == 0, first.stderr[-2000:]
    for name in STAGES:
        assert (runs / name / "manifest.json").is_file(), name
    for gamma in ("0.5", "0.75", "0.9"):
        assert (runs / "select-albat" / f"gamma-{gamma}" / "samples.tar").is_file()
    rows = json.loads((runs / "eval" / "metrics.json").read_text())["rows"]
    assert set(rows) == {"backbone", "train-none", "train-random", "train-albat"}
    assert all(
        rows[r]["nll"] < rows["backbone"]["nll"]
        for r in ("train-none", "train-random", "train-albat")
    )
    second = make("tiny-lm", runs)
    assert second.returncode == 0
    assert second.stderr.count("up to date") == 9


@pytest.mark.slow
def test_tiny_dreambooth_makefile_runs_the_pipeline_and_is_up_to_date_the_second_time(tmp_path):
    runs = tmp_path / "runs"
    first = make("tiny-dreambooth", runs)
    assert first.returncode == 0, first.stderr[-2000:]
    for name in STAGES:
        assert (runs / name / "manifest.json").is_file(), name
    assert (runs / "model" / "model_index.json").is_file()
    for name in ("surrogate", "train-none", "train-random", "train-albat"):
        for file in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
            assert (runs / name / file).is_file(), (name, file)
    assert (runs / "scores" / "scores.zarr").is_dir()
    assert (runs / "scores" / "target.safetensors").is_file()
    for strategy in ("random", "albat"):
        for gamma in ("0.5", "0.75", "0.9"):
            chosen = runs / f"select-{strategy}" / f"gamma-{gamma}"
            assert (chosen / "samples.tar").is_file() and (chosen / "contact_sheet.png").is_file()
        # 5 instance images; γ = 0.75 adds round(5/3) = 2 of the pool's 40 samples
        selection = json.loads((runs / f"select-{strategy}/gamma-0.75/selection.json").read_text())
        assert len(selection["chosen"]) == 2
    rows = json.loads((runs / "eval" / "metrics.json").read_text())["rows"]
    assert set(rows) == {"backbone", "train-none", "train-random", "train-albat"}
    assert all(math.isfinite(row["heldout_loss"]) for row in rows.values())
    assert all(
        rows[r]["heldout_loss"] < rows["backbone"]["heldout_loss"]
        for r in ("train-none", "train-random", "train-albat")
    )
    for label in rows:
        assert (runs / "eval" / f"images-{label}.png").is_file(), label
    assert "| train-albat |" in first.stdout  # the Makefile prints report.md
    second = make("tiny-dreambooth", runs)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stderr.count("up to date") == 9


@pytest.mark.slow
def test_multi_gpu_makefile_runs_on_two_cpu_processes(tmp_path):
    runs = tmp_path / "runs"
    first = make("multi-gpu", runs)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    for name in ("model", "surrogate", "scores", "select", "train"):
        assert (runs / name / "manifest.json").is_file(), name
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == [
        "model",
        "scores",
        "select",
        "surrogate",
        "train",
    ]
