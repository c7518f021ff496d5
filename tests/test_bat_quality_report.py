"""benchmarks/bat_quality.py's report arithmetic: the pooled comparison of the default with each
rival, against a hand computation."""

from __future__ import annotations

import importlib.util
import json
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


@pytest.fixture(scope="module")
def pr():
    spec = importlib.util.spec_from_file_location("pool_reports", SCRIPT.parent / "pool_reports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_report(path: Path, results: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}))
    return str(path)


def test_pool_reports_renames_each_report_and_pools_their_cases(bq, pr, tmp_path):
    # report A was written when the default was a variant (mmr-c1024) and "mmr" meant another
    a = {
        "email": world(
            {
                "mmr-c1024": [1.0, 2.0, 3.0],
                "mmr": [9.0, 9.0, 9.0],
                "bm25": [1.5, 1.5, 3.5],
                "none": [2.0, 2.0, 2.0],
            }
        )
    }
    b = {"email": world({"mmr": [4.0, 4.0, 4.0], "bm25": [4.1, 3.9, 4.2], "none": [5.0] * 3})}
    first = write_report(tmp_path / "bat_quality-lm.json", a)
    second = write_report(tmp_path / "bat_quality-lm-ws1.json", b)
    reports = [pr.parse_report(f"{first}:mmr=mmr-c256,mmr-c1024=mmr"), pr.parse_report(second)]
    results = pr.pool_results(reports)
    assert sorted(results) == ["email@lm", "email@lm-ws1"]
    assert pr.methods_of(results["email@lm"]) == {"mmr", "mmr-c256", "bm25", "none"}
    assert results["email@lm"]["loss"]["mmr-g0.5-s1"] == 2.0
    assert results["email@lm"]["loss"]["mmr-c256-g0.5-s1"] == 9.0
    assert results["email@lm"]["loss"]["none-s1"] == 2.0
    out = bq.pooled(results, "mmr", ["bm25"])["bm25"]
    assert (out["cases"], out["pairs"], out["lower"]) == (2, 6, 4)
    assert out["mean"] == pytest.approx(np.mean([-0.5, 0.5, -0.5, -0.1, 0.1, -0.2]))
    lines, summary = pr.pooled_report(bq, results, "mmr")
    assert summary["pooled"]["bm25"] == out
    assert any(line.startswith("| bm25 | 2 | 4/6 | -0.1167 |") for line in lines)


def test_pool_reports_refuses_renames_that_lose_or_merge_losses(pr, tmp_path):
    a = {"email": world({"mmr-c1024": [1.0] * 3, "mmr": [9.0] * 3, "none": [2.0] * 3})}
    path = write_report(tmp_path / "bat_quality-lm.json", a)
    with pytest.raises(SystemExit, match="merge two methods"):
        pr.pool_results([pr.parse_report(f"{path}:mmr-c1024=mmr")])
    with pytest.raises(SystemExit, match="merge two methods"):
        pr.pool_results([pr.parse_report(f"{path}:mmr-c1024=x,mmr=x")])
    with pytest.raises(SystemExit, match="cannot rename 'mmr-c124'"):
        pr.pool_results([pr.parse_report(f"{path}:mmr-c124=mmr")])
    with pytest.raises(SystemExit, match="cannot rename 'none'"):
        pr.pool_results([pr.parse_report(f"{path}:none=plain")])
    with pytest.raises(SystemExit, match="OLD=NEW"):
        pr.parse_report("x.json:mmr=a,b")
    assert pr.parse_report("runs/a:b/bat_quality.json") == (
        (Path("runs/a:b/bat_quality.json"),),
        {},
    )


def test_pool_reports_prints_diffusion_differences_to_six_places_and_refuses_mixed_families(bq, pr):
    digits = world({"mmr-clip": [0.10001, 0.10002, 0.10003], "embed": [0.10002, 0.10002, 0.10002]})
    digits["family"] = "diffusion"
    other = dict(digits)
    lines, summary = pr.pooled_report(bq, {"two@a": digits, "two@b": other}, "mmr-clip")
    assert any(line.startswith("| embed | 2 | 2/6 | +0.000000 |") for line in lines)
    lm = world({"mmr-clip": [1.0] * 3, "embed": [1.0] * 3})
    with pytest.raises(SystemExit, match="mix families"):
        pr.pooled_report(bq, {"two@a": digits, "email@b": lm}, "mmr-clip")
    with pytest.raises(SystemExit, match="not in every report"):
        pr.pooled_report(bq, {"two@a": digits}, "mmr")
    with pytest.raises(SystemExit, match="no cases"):
        pr.pooled_report(bq, {}, "mmr")


def test_pool_reports_names_plain_reports_by_folder_and_refuses_a_clash(pr, tmp_path):
    results = {"email": world({"mmr": [1.0, 1.0, 1.0]})}
    plain = [
        pr.parse_report(write_report(tmp_path / f / "bat_quality.json", results))
        for f in ("bat-quality", "bat-quality-ws1")
    ]
    assert sorted(pr.pool_results(plain)) == ["email@bat-quality", "email@bat-quality-ws1"]
    with pytest.raises(SystemExit, match="share a name"):
        pr.pool_results([plain[0], plain[0]])


def test_pool_reports_merges_runs_of_other_seeds_and_keeps_complete_methods(bq, pr, tmp_path):
    first = {"email": world({"mmr": [1.0, 2.0, 3.0], "bm25": [1.5, 1.5, 3.5], "dsir": [9.0] * 3})}
    more = {
        "email": world({"mmr": [4.0, 4.0, 4.0], "bm25": [4.1, 3.9, 4.2]}, seeds=(3, 4, 5)),
    }
    a = write_report(tmp_path / "s012" / "bat_quality.json", first)
    b = write_report(tmp_path / "s345" / "bat_quality.json", more)
    results = pr.pool_results([pr.parse_report(f"{a}+{b}")])
    (case,) = results.values()
    assert case["seeds"] == [0, 1, 2, 3, 4, 5]
    # dsir ran with seeds 0-2 only: it is left out rather than judged on half the seeds
    assert pr.complete_methods(case, bq.label) == {"mmr", "bm25"}
    out = bq.pooled(results, "mmr", ["bm25"])["bm25"]
    assert (out["cases"], out["pairs"], out["lower"]) == (1, 6, 4)
    assert out["mean"] == pytest.approx(np.mean([-0.5, 0.5, -0.5, -0.1, 0.1, -0.2]))
    lines, _ = pr.pooled_report(bq, results, "mmr")
    assert not any("dsir" in line for line in lines)
    with pytest.raises(SystemExit, match="seeds \\[0, 1, 2\\] are in"):
        pr.pool_results([pr.parse_report(f"{a}+{a}")])
    other = write_report(tmp_path / "other" / "bat_quality.json", {"xml": more["email"]})
    with pytest.raises(SystemExit, match="other worlds"):
        pr.pool_results([pr.parse_report(f"{a}+{other}")])
