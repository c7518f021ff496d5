"""The example Makefiles run the real stage commands end to end (slow: `make test-all`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_tiny_lm_makefile_runs_the_pipeline_and_is_up_to_date_the_second_time(tmp_path):
    runs = tmp_path / "runs"
    first = subprocess.run(
        ["make", "-C", EXAMPLES / "tiny-lm", f"RUNS={runs}"], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-2000:]
    for name in (
        "model",
        "surrogate",
        "scores",
        "select-random",
        "select-albat",
        "train-none",
        "train-random",
        "train-albat",
        "eval",
    ):
        assert (runs / name / "manifest.json").is_file(), name
    for gamma in ("0.5", "0.75", "0.9"):
        assert (runs / "select-albat" / f"gamma-{gamma}" / "samples.tar").is_file()
    rows = json.loads((runs / "eval" / "metrics.json").read_text())["rows"]
    assert set(rows) == {"backbone", "train-none", "train-random", "train-albat"}
    assert all(
        rows[r]["nll"] < rows["backbone"]["nll"]
        for r in ("train-none", "train-random", "train-albat")
    )
    second = subprocess.run(
        ["make", "-C", EXAMPLES / "tiny-lm", f"RUNS={runs}"], capture_output=True, text=True
    )
    assert second.returncode == 0
    assert second.stderr.count("up to date") == 9
