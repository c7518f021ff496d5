"""Proposition 2 (batctl.prop2): the Gram/Woodbury sides against dense float64 brute force, on
random matrices and end to end on a tiny LM (surrogate, score, select --model ... --gamma auto)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from batctl.data import open_pool
from batctl.influence.target import DEAD_LAYER_RMS
from batctl.prop2 import Grams, choose_auto, newton_side
from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, mixed_pool_lines, write_jsonl


def dense_side(G: torch.Tensor, c: float) -> float:
    """||H⁻¹ m|| with H = GᵀG/N + λI built explicitly (D × D) and solved by torch.linalg.solve."""
    G = G.double()
    N, D = G.shape
    lam = c * float(G.pow(2).sum(1).mean()) / D
    H = G.T @ G / N + lam * torch.eye(D, dtype=torch.float64)
    return float(torch.linalg.solve(H, G.mean(0)).norm())


@pytest.mark.parametrize(("N", "D"), [(1, 5), (6, 40), (30, 7), (12, 12)])
def test_the_gram_form_equals_the_dense_solve(N, D):
    g = torch.Generator().manual_seed(N * 100 + D)
    G = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.rand(
        D, generator=g, dtype=torch.float64
    )
    side, lam = newton_side(G @ G.T, D, 0.1)
    assert lam == pytest.approx(0.1 * float(G.pow(2).sum(1).mean()) / D, rel=1e-12)
    assert side == pytest.approx(dense_side(G, 0.1), rel=1e-9)
    assert newton_side(torch.zeros(N, N, dtype=torch.float64), D, 0.1) == (0.0, 0.0)


def synthetic_grams(a: torch.Tensor, p: torch.Tensor, c: float = 0.1) -> Grams:
    G = torch.cat([a, p]).double()
    return Grams(
        {"w": G @ G.T}, {"w": G.shape[1]}, len(a), torch.ones(len(p), dtype=torch.bool), [], c
    )


def test_auto_picks_the_smallest_gamma_at_which_the_inequality_holds():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 10, generator=g, dtype=torch.float64)
    a[:, 5:] = 0  # D_A lives in the first five coordinates
    p = torch.zeros(40, 10, dtype=torch.float64)
    p[:, 5:] = 3 * torch.randn(40, 5, generator=g, dtype=torch.float64)  # orthogonal, large
    grams = synthetic_grams(a, p)
    grid = [(0.1, 36), (0.5, 4), (0.8, 1), (0.3, 9)]
    chosen, rows = choose_auto(grams, grid)
    assert [r["gamma"] for r in rows] == [0.1, 0.3, 0.5, 0.8]
    for r in rows:
        G = torch.cat([a, p[: r["count"]]])
        expected = dense_side(G, 0.1)
        assert r["bat"] == pytest.approx(expected, rel=1e-9)
        assert r["holds"] == (expected <= dense_side(a, 0.1))
    holding = [r["gamma"] for r in rows if r["holds"]]
    assert holding and chosen == (min(holding), dict(grid)[min(holding)])


# ------------------------------------------------------------------------------ the tiny LM


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny LM, a surrogate on the color domain, and a finished score store of a mixed pool."""
    from typer.testing import CliRunner

    from batctl.cli import app

    root = tmp_path_factory.mktemp("prop2")
    lm = build_tiny_lm(root / "lm", seed=0)
    domain = write_jsonl(root / "domain.jsonl", color_records(6, seed=1))
    rng = np.random.default_rng(0)
    lines = mixed_pool_lines(24, 10, rng, words_per_line=8)
    (root / "pool.jsonl").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    for args in (
        ["surrogate", "--model", lm, "--data", domain, "--out", root / "sur", "--steps", "8",
         "--lr", "1e-2", "--targets", "all-linear"],
        ["score", "--method", "influence", "--model", lm, "--surrogate", root / "sur", "--data", domain, "--pool",
         root / "pool.jsonl", "--out", root / "scores", "--chunk-size", "8", "--batch-size", "4"],
    ):  # fmt: skip
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr
    return {
        "root": root,
        "lm": lm,
        "domain": domain,
        "sur": root / "sur",
        "scores": root / "scores",
    }


def brute_force_grads(pipeline, samples, role):
    """One backward per sample through the task's own loss: {layer: [N, D]} float64."""
    from batctl.tasks.base import TaskSettings
    from batctl.tasks.lm import LMTask

    task = LMTask(TaskSettings(model=str(pipeline["lm"])))
    task.load_adapter(pipeline["sur"], trainable=True)
    task.model.eval()
    params = task.trainable_parameters()
    rows = {name: [] for name in params}
    for sample in samples:
        loss = task.per_sample_loss(task.collate([sample], role))[0]
        for (name, _), g in zip(
            params.items(), torch.autograd.grad(loss, list(params.values())), strict=True
        ):
            rows[name].append(g.detach().double().reshape(-1))
    return {name: torch.stack(r) for name, r in rows.items()}


def test_the_report_equals_brute_force_float64_and_auto_picks_from_it(cli, pipeline, tmp_path):
    from batctl.samples import load_samples

    out = tmp_path / "sel"
    result = cli(
        "select", "--scores", pipeline["scores"], "--out", out, "--gamma", "0.5,0.75,auto",
        "--model", pipeline["lm"], "--surrogate", pipeline["sur"], "--data", pipeline["domain"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    adaptation = load_samples(str(pipeline["domain"]), flag="--data")
    a_grads = brute_force_grads(pipeline, adaptation, "adaptation")
    rms = {n: math.sqrt(float(g.pow(2).sum(1).mean()) / g.shape[1]) for n, g in a_grads.items()}
    dead = sorted(n for n, x in rms.items() if x <= DEAD_LAYER_RMS * max(rms.values()))
    for name in ("gamma-0.5", "gamma-0.75"):
        chosen = json.loads((out / name / "selection.json").read_text())
        rep = chosen["prop2"]
        pool = open_pool(chosen["pool"])
        picked = [pool.read(c["part"], c["offset"]) for c in chosen["chosen"]]
        p_grads = brute_force_grads(pipeline, picked, "pool")
        assert set(rep["layers"]) == set(a_grads) and sorted(rep["excluded_layers"]) == dead
        sq_bat = sq_a = 0.0
        for layer, g_a in a_grads.items():
            bat = dense_side(torch.cat([g_a, p_grads[layer]]), 0.1)
            ada = dense_side(g_a, 0.1)
            assert rep["layers"][layer]["bat"] == pytest.approx(bat, rel=1e-5, abs=1e-9), layer
            assert rep["layers"][layer]["adaptation"] == pytest.approx(ada, rel=1e-5, abs=1e-9), (
                layer
            )
            if layer not in dead:
                sq_bat, sq_a = sq_bat + bat**2, sq_a + ada**2
        assert rep["bat"] == pytest.approx(math.sqrt(sq_bat), rel=1e-5)
        assert rep["adaptation"] == pytest.approx(math.sqrt(sq_a), rel=1e-5)
        assert rep["holds"] == (math.sqrt(sq_bat) <= math.sqrt(sq_a))
        assert (
            rep["n_adaptation"] == 6 and rep["n_pool"] == chosen["count"] and rep["damping"] == 0.1
        )
    top = json.loads((out / "selection.json").read_text())
    grid = top["auto"]["grid"]
    assert [g["gamma"] for g in grid] == sorted(g["gamma"] for g in grid) and len(grid) >= 10
    assert all(g["count"] <= top["eligible"] for g in grid)
    holding = [g for g in grid if g["holds"]]
    auto = json.loads((out / "gamma-auto" / "selection.json").read_text())
    if holding:
        assert top["auto"]["gamma"] == holding[0]["gamma"] and auto["count"] == holding[0]["count"]
    else:  # Proposition 2 promises nothing: gamma-auto is plain adaptation
        assert top["auto"]["gamma"] is None and top["auto"]["holds_nowhere"]
        assert auto["count"] == 0 and auto["gamma"] == 1.0
    assert auto["prop2"]["holds"] or not holding


def test_a_model_other_than_the_scores_is_refused_before_loading(cli, pipeline, tmp_path):
    other = build_tiny_lm(tmp_path / "other", seed=5)
    result = cli(
        "select", "--scores", pipeline["scores"], "--out", tmp_path / "o", "--gamma", "0.5",
        "--prop2", "--model", other, "--surrogate", pipeline["sur"], "--data", pipeline["domain"],
    )  # fmt: skip
    assert result.exit_code == 1 and "computed on" in result.stderr
    assert not (tmp_path / "o").exists()


def test_auto_without_a_model_is_a_usage_error(cli, pipeline, tmp_path):
    result = cli(
        "select", "--scores", pipeline["scores"], "--out", tmp_path / "o", "--gamma", "auto"
    )
    assert result.exit_code == 2 and "--gamma auto needs --model" in result.stderr


def test_train_takes_a_selection_of_a_real_score_store(cli, pipeline, tmp_path):
    out = tmp_path / "sel"
    assert (
        cli("select", "--scores", pipeline["scores"], "--out", out, "--gamma", "0.5").exit_code == 0
    )
    chosen = json.loads((out / "gamma-0.5" / "selection.json").read_text())
    assert chosen["count"] == 6  # n = 6, γ = 0.5
    result = cli(
        "train", "--model", pipeline["lm"], "--data", pipeline["domain"], "--selection",
        out / "gamma-0.5", "--out", tmp_path / "bat", "--steps", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["backbone_samples"] == 6
    other = build_tiny_lm(tmp_path / "other", seed=4)
    refused = cli(
        "train", "--model", other, "--data", pipeline["domain"], "--selection", out / "gamma-0.5",
        "--out", tmp_path / "bat2", "--steps", "1",
    )  # fmt: skip
    assert refused.exit_code == 1 and "was built on model" in refused.stderr
