"""benchmarks/bat_quality.py's report arithmetic: the pooled comparison of the default with each
rival, against a hand computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bat_quality.py"


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bat_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def world(losses: dict[str, list[float]], gammas=(0.5,), seeds=(0, 1, 2)) -> dict:
    """A result dict as run_world returns it: losses[method] per seed (the same at every γ)."""
    loss = {}
    for method, values in losses.items():
        for g in gammas:
            for s, v in zip(seeds, values, strict=True):
                loss[f"none-s{s}" if method == "none" else f"{method}-g{g}-s{s}"] = v
    return {"gammas": list(gammas), "seeds": list(seeds), "loss": loss}


def test_pooled_counts_every_seed_pair_and_resamples_whole_cases(bq):
    results = {
        "a": world({"mmr": [1.0, 2.0, 3.0], "bm25": [1.5, 1.5, 3.5], "none": [2.0, 2.0, 2.0]}),
        "b": world({"mmr": [4.0, 4.0, 4.0], "bm25": [4.1, 3.9, 4.2]}, gammas=(0.5, 0.75)),
    }
    out = bq.pooled(results, "mmr", ["bm25", "none", "tfidf"], draws=4000)
    bm25 = out["bm25"]
    diffs = [-0.5, 0.5, -0.5] + [-0.1, 0.1, -0.2] * 2
    assert (bm25["cases"], bm25["pairs"], bm25["lower"]) == (3, 9, 6)
    assert bm25["mean"] == pytest.approx(np.mean(diffs))
    # resampling whole cases: the interval lies within the case means' range
    case_means = [np.mean(diffs[:3]), np.mean(diffs[3:6])]
    assert min(case_means) - 1e-12 <= bm25["low"] < bm25["mean"] < bm25["high"]
    assert bm25["high"] <= max(case_means) + 1e-12
    # a rival with no runs is left out; a rival present in one case has no interval
    assert "tfidf" not in out
    assert out["none"]["cases"] == 1 and out["none"]["low"] is None
    assert out["none"]["mean"] == pytest.approx(0.0) and out["none"]["lower"] == 1
    # the same draws every time, whichever other rivals are listed: a report regenerated from
    # the same runs is the same report
    assert bq.pooled(results, "mmr", ["bm25"], draws=4000)["bm25"] == bm25


@settings(max_examples=40, deadline=None)
@given(st.floats(-1, 1, allow_nan=False), st.integers(2, 6))
def test_pooled_interval_collapses_when_every_case_agrees(bq, difference, count):
    # every case has the same seed differences, so every resample's mean is that difference
    results = {
        f"w{i}": world({"mmr": [difference] * 3, "bm25": [0.0, 0.0, 0.0]}) for i in range(count)
    }
    got = bq.pooled(results, "mmr", ["bm25"], draws=200)["bm25"]
    assert got["low"] == pytest.approx(difference) == pytest.approx(got["high"])
    assert got["lower"] == (3 * count if difference < 0 else 0)
