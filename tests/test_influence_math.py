"""Influence math without a model: preconditioners, damping, targets, target.safetensors.

Also holds the brute-force references the model tests share (``brute_force_grads``,
``spearman``): per-sample gradients by one ``torch.autograd.grad`` per sample, nothing else.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from batctl.influence.capture import eval_mode
from batctl.influence.grads import PerSampleGrads
from batctl.influence.precondition import (
    AUTO_WOODBURY_MAX_N,
    damping,
    datainf,
    precondition,
    resolve,
    woodbury,
)
from batctl.influence.target import build_target, load_target, save_target

# ----------------------------------------------------------------------------- shared helpers


def brute_force_grads(task, samples, batch_size, role="adaptation"):
    """{param name: [n, D]} float64: autograd.grad of each sample's own loss, one at a time.

    Batched as the code under test batches (same padding), so the two see identical losses.
    """
    params = task.trainable_parameters()
    rows = {name: [] for name in params}
    with eval_mode(task.model), torch.enable_grad():
        for start in range(0, len(samples), batch_size):
            batch = task.collate(samples[start : start + batch_size], role)
            losses = task.per_sample_loss(batch)
            for i in range(losses.shape[0]):
                grads = torch.autograd.grad(
                    losses[i], list(params.values()), retain_graph=True, allow_unused=True
                )
                for (name, p), g in zip(params.items(), grads, strict=True):
                    g = torch.zeros_like(p) if g is None else g
                    rows[name].append(g.reshape(-1).double())
    return {name: torch.stack(r) for name, r in rows.items()}


def brute_force_scores(grads, target):
    """Σ_l r_l · g_l(x) for each row, and the per-layer terms [n, L]."""
    per_layer = torch.stack(
        [grads[name] @ target.r[name].reshape(-1).double() for name in target.layers], dim=1
    )
    return per_layer.sum(1), per_layer


def max_rel(a, b):
    """max |a − b| / max |b| (b: the reference)."""
    return float((a - b).abs().max() / b.abs().max())


def spearman(a, b):
    """Spearman rank correlation of two 1-D tensors without ties."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# ----------------------------------------------------------------------------- preconditioners


def _problem(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, d)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    return G, v


@pytest.mark.parametrize(("n", "d"), [(6, 40), (40, 6), (12, 12)])
def test_woodbury_equals_a_dense_solve_of_the_damped_gauss_newton(n, d):
    G, v = _problem(n, d)
    lam = damping(G, 0.1)
    H = G.T @ G / n + lam * torch.eye(d, dtype=torch.float64)
    expected = torch.linalg.solve(H, v)
    r = woodbury(G, v, lam)
    assert max_rel(r, expected) < 1e-8
    assert max_rel(H @ r, v) < 1e-8


def test_damping_is_c_times_mean_squared_gradient_norm_per_parameter():
    G, _ = _problem(5, 7)
    expected = 0.3 * sum(float(G[i] @ G[i]) for i in range(5)) / 5 / 7
    assert math.isclose(damping(G, 0.3), expected, rel_tol=1e-12)


def test_datainf_equals_its_formula_term_by_term():
    G, v = _problem(9, 30, seed=1)
    lam = damping(G, 0.1)
    total = torch.zeros(30, dtype=torch.float64)
    for i in range(9):
        g = G[i]
        total += float(g @ v) / (lam + float(g @ g)) * g
    expected = (v - total / 9) / lam
    assert max_rel(datainf(G, v, lam), expected) < 1e-12


def test_identity_auto_and_degenerate_layers():
    G, v = _problem(4, 10)
    r, lam = precondition(G, v, "identity", 0.1)
    assert torch.equal(r, v) and lam == damping(G, 0.1)
    assert resolve("auto", AUTO_WOODBURY_MAX_N) == "woodbury"
    assert resolve("auto", AUTO_WOODBURY_MAX_N + 1) == "datainf"
    with pytest.raises(ValueError, match="unknown preconditioner"):
        resolve("newton", 3)
    zero = torch.zeros(4, 10, dtype=torch.float64)
    for method in ("woodbury", "datainf"):
        r, lam = precondition(zero, v, method)
        assert lam == 0 and not r.any()


# ----------------------------------------------------------------------------- targets


def _grads(rows_by_layer, keys=None, losses=None):
    n = next(iter(rows_by_layer.values())).shape[0]
    finite = torch.ones(n, dtype=torch.bool)
    for g in rows_by_layer.values():
        finite &= torch.isfinite(g).all(1)
    return PerSampleGrads(
        keys or [f"s{i}" for i in range(n)],
        losses if losses is not None else torch.ones(n, dtype=torch.float64),
        finite,
        rows_by_layer,
        {name: (g.shape[1],) for name, g in rows_by_layer.items()},
    )


def test_target_uses_finite_samples_and_is_exact_per_layer():
    a, va = _problem(6, 8, seed=2)
    b, _ = _problem(6, 5, seed=3)
    a[2] = math.nan  # a sample whose gradient is not finite: out of v and of the curvature
    grads = _grads({"A": a, "B": b})
    target = build_target(grads, preconditioner="woodbury", c=0.2)
    keep = [0, 1, 3, 4, 5]
    for name, G in (("A", a[keep]), ("B", b[keep])):
        v = G.mean(0)
        lam = 0.2 * float(G.pow(2).sum(1).mean()) / G.shape[1]
        H = G.T @ G / 5 + lam * torch.eye(G.shape[1], dtype=torch.float64)
        assert max_rel(target.v[name], v) < 1e-12
        assert math.isclose(target.damping[name], lam, rel_tol=1e-12)
        assert max_rel(target.r[name], torch.linalg.solve(H, v)) < 1e-8
    assert target.n_adaptation == target.n_target == 5
    assert target.preconditioner == "woodbury"
    assert math.isnan(float(target.grad_norms["A"][2])) and float(target.grad_norms["B"][2]) > 0


def test_a_separate_target_set_gives_v_and_the_adaptation_set_the_curvature():
    a, _ = _problem(5, 6, seed=4)
    t, _ = _problem(3, 6, seed=5)
    target = build_target(_grads({"W": a}), _grads({"W": t}), preconditioner="datainf")
    lam = damping(a, 0.1)
    assert max_rel(target.r["W"], datainf(a, t.mean(0), lam)) < 1e-12
    assert target.n_target == 3 and target.n_adaptation == 5


def test_layers_with_rounding_level_gradients_get_no_direction():
    """A bias before a one-channel GroupNorm has gradients ~1e-19: 1/λ must not amplify them."""
    a, _ = _problem(5, 8, seed=9)
    noise, _ = _problem(5, 3, seed=10)
    zero = torch.zeros(5, 4, dtype=torch.float64)
    target = build_target(_grads({"W": a, "b": noise * 1e-18, "A": zero}))
    assert not target.r["b"].any() and not target.r["A"].any()
    assert target.r["W"].any() and target.damping["b"] > 0


def test_degenerate_target_is_warned_with_the_ratio(caplog):
    u, _ = _problem(1, 12, seed=6)
    rows = torch.cat([u, -u, 2 * u, -2 * u]) + 1e-7  # per-sample gradients cancel: v ≈ 0
    with caplog.at_level(logging.WARNING, logger="batctl.influence"):
        target = build_target(_grads({"W": rows}))
    assert target.ratio < 1e-5
    assert "degenerate target" in caplog.text and f"{target.ratio:.2e}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batctl.influence"):
        build_target(_grads({"W": rows + u}))
    assert "degenerate" not in caplog.text


def test_target_safetensors_round_trip(tmp_path):
    a, _ = _problem(4, 6, seed=7)
    b, _ = _problem(4, 3, seed=8)
    grads = _grads({"x.lora_A": a, "x.lora_B": b}, keys=["k0", "k1", "k2", "k3"])
    grads.shapes = {"x.lora_A": (2, 3), "x.lora_B": (3, 1)}
    target = build_target(grads, preconditioner="datainf", c=0.05)
    meta = {"engine": "hooks", "preconditioner": "auto", "loss": "mean token NLL"}
    path = tmp_path / "target.safetensors"
    save_target(path, target, meta)
    back, back_meta = load_target(path)
    assert back_meta == meta
    assert back.layers == target.layers and back.keys == ["k0", "k1", "k2", "k3"]
    assert back.preconditioner == "datainf" and back.c == 0.05
    assert (back.n_adaptation, back.n_target) == (4, 4)
    for name in target.layers:
        assert back.r[name].shape == target.r[name].shape == grads.shapes[name]
        assert torch.equal(back.r[name], target.r[name])
        assert torch.equal(back.v[name], target.v[name])
        assert torch.equal(back.grad_norms[name], target.grad_norms[name])
        assert back.damping[name] == target.damping[name]
    with pytest.raises(ValueError, match="reserved"):
        save_target(tmp_path / "t2.safetensors", target, {"influence.layers": "x"})
