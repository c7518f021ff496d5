"""Proposition 2 (DESIGN §5): does the augmented set promise faster convergence than D_A alone?

For a training set S of N samples with per-sample gradients g_i (at the surrogate adapter) in
layer l (D_l parameters):

    H_S = (1/N) Σ_i g_i g_iᵀ + λ_S I,   λ_S = c · mean_i ||g_i||² / D_l   (DataInf's damping)
    m_S = (1/N) Σ_i g_i                 (the mean training gradient)
    side(S) = ||H_S⁻¹ m_S||             (the length of the damped Gauss-Newton step)

BAT should converge faster when side(D_A ∪ selection) ≤ side(D_A); both sides per layer, and
combined over layers as the root sum of squares. "holds" compares the combined sides.

Exact via Woodbury, and from the Gram matrix K = G Gᵀ (N × N) alone: with u = (K + NλI)⁻¹ 1,

    H⁻¹ m = Gᵀ u   (since H Gᵀu = Gᵀ(K/N + λI) u = Gᵀ1/N = m),   so ||H⁻¹ m||² = uᵀ K u,

and λ = c · tr(K) / (N D_l). Every selection is a prefix of one ordered stream of pool rows, so
the Gram matrix of D_A followed by the longest selection serves every γ (and the `--gamma auto`
grid) as a leading sub-matrix: one gradient pass, then an N_γ × N_γ solve per layer and γ.

Layers whose adaptation gradients are zero or rounding noise (RMS at most
`batctl.influence.target.DEAD_LAYER_RMS` of the largest layer's) are reported but left out of the
combined sides, as `score` gives them r = 0: their side would be amplified noise.

Memory: the per-sample gradients of the n + k_max samples, (n + k_max) × Σ_l D_l × 8 bytes, while
the Gram matrices are formed; then (n + k_max)² × 8 bytes per layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batctl.data import Sample
from batctl.influence.grads import per_sample_grads
from batctl.influence.layers import discover_layers
from batctl.influence.target import DEAD_LAYER_RMS
from batctl.tasks.base import Task

# selection_reports speaks for the select stage: its lines keep the stage's logger name
log = logging.getLogger("batctl.select")


@dataclass
class Grams:
    """Gram matrices of D_A's finite samples followed by the pool stream's finite samples."""

    grams: dict[str, torch.Tensor]
    """layer -> K (float64, [n + p, n + p]): rows 0..n-1 adaptation, then pool rows in stream order."""

    dims: dict[str, int]
    """layer -> D_l."""

    n: int
    """Finite adaptation samples."""

    pool_finite: torch.Tensor
    """[P] bool, one per pool stream row given: its loss and gradients are finite."""

    excluded: list[str]
    """Layers with zero or rounding-level adaptation gradients, left out of the combined sides."""

    c: float
    """The damping factor c."""


def newton_side(K: torch.Tensor, dim: int, c: float) -> tuple[float, float]:
    """(||H⁻¹ m||, λ) of the set whose per-sample gradients in one layer of `dim` parameters
    have Gram matrix K (N × N). A layer with all-zero gradients has m = 0: (0, 0)."""
    N = K.shape[0]
    if N == 0:
        return 0.0, 0.0
    K = K.double()
    lam = c * float(K.diagonal().sum()) / (N * dim)
    if lam <= 0:
        return 0.0, 0.0
    A = K.clone()
    A.diagonal().add_(N * lam)
    ones = torch.ones(N, 1, dtype=torch.float64, device=K.device)
    L, info = torch.linalg.cholesky_ex(A)
    u = torch.cholesky_solve(ones, L) if int(info) == 0 else torch.linalg.solve(A, ones)
    return math.sqrt(max(float(u.T @ K @ u), 0.0)), lam


def gradient_grams(
    task: Task,
    adaptation: Sequence[Sample],
    pool: Sequence[Sample],
    c: float,
    batch_size: int = 8,
) -> Grams:
    """Per-sample gradients (float64) of D_A (role adaptation) and the pool stream (role pool),
    reduced to one Gram matrix per layer. Non-finite samples are left out (see `Grams`)."""
    from batctl.influence.layers import InfluenceError

    layerset = discover_layers(task)
    a = per_sample_grads(
        task, adaptation, batch_size, "adaptation", torch.float64, layerset=layerset
    )
    p = (
        per_sample_grads(
            task, pool, batch_size, "pool", torch.float64, layerset=layerset, verify=False
        )
        if pool
        else None
    )
    a_ok = a.finite
    n = int(a_ok.sum())
    if n == 0:
        raise InfluenceError("--data: no adaptation sample has a finite loss and gradient")
    p_ok = p.finite if p is not None else torch.zeros(0, dtype=torch.bool)
    grams: dict[str, torch.Tensor] = {}
    dims: dict[str, int] = {}
    rms: dict[str, float] = {}
    for name in list(a.grads):
        G = a.grads.pop(name)[a_ok]
        if p is not None:
            G = torch.cat([G, p.grads.pop(name)[p_ok]])
        G = G.double()
        dims[name] = G.shape[1]
        grams[name] = G @ G.T
        rms[name] = math.sqrt(float(grams[name][:n, :n].diagonal().mean()) / dims[name])
        del G
    top = max(rms.values()) if rms else 0.0
    excluded = [name for name, x in rms.items() if x <= DEAD_LAYER_RMS * top]
    return Grams(grams, dims, n, p_ok.clone(), excluded, c)


def report(
    grams: Grams, k: int, adaptation_sides: dict[str, tuple[float, float]] | None = None
) -> dict[str, Any]:
    """Both sides of Proposition 2 for D_A plus the first `k` pool stream rows.

    Returns {"holds", "bat", "adaptation", "ratio", "n_adaptation", "n_pool", "nonfinite_pool",
    "damping", "layers": {layer: {"bat", "adaptation", "lambda_bat", "lambda_adaptation"}},
    "excluded_layers"}. `adaptation_sides` caches side(D_A) per layer across calls.
    """
    if k > len(grams.pool_finite):
        raise ValueError(f"only {len(grams.pool_finite)} pool rows have gradients, asked for {k}")
    finite = int(grams.pool_finite[:k].sum())
    size = grams.n + finite
    if adaptation_sides is None:
        adaptation_sides = {}
    layers: dict[str, dict[str, float | bool]] = {}
    sq_bat = sq_a = 0.0
    for name, K in grams.grams.items():
        if name not in adaptation_sides:
            adaptation_sides[name] = newton_side(K[: grams.n, : grams.n], grams.dims[name], grams.c)
        side_a, lam_a = adaptation_sides[name]
        side_b, lam_b = newton_side(K[:size, :size], grams.dims[name], grams.c)
        layers[name] = {
            "bat": side_b,
            "adaptation": side_a,
            "lambda_bat": lam_b,
            "lambda_adaptation": lam_a,
        }
        if name not in grams.excluded:
            sq_bat += side_b**2
            sq_a += side_a**2
    bat, adapt = math.sqrt(sq_bat), math.sqrt(sq_a)
    return {
        "holds": bool(bat <= adapt),
        "bat": bat,
        "adaptation": adapt,
        "ratio": bat / adapt if adapt > 0 else (math.inf if bat > 0 else 1.0),
        "n_adaptation": grams.n,
        "n_pool": finite,
        "nonfinite_pool": k - finite,
        "damping": grams.c,
        "layers": layers,
        "excluded_layers": list(grams.excluded),
    }


def choose_auto(
    grams: Grams,
    grid: Sequence[tuple[float, int]],
    adaptation_sides: dict[str, tuple[float, float]] | None = None,
) -> tuple[tuple[float, int] | None, list[dict[str, Any]]]:
    """The smallest γ of `grid` ((γ, k) pairs) at which Proposition 2 holds, or None, and the
    grid's reports (γ, k, both combined sides, holds), in ascending γ."""
    rows = []
    chosen = None
    for gamma, k in sorted(grid):
        r = report(grams, k, adaptation_sides)
        rows.append(
            {
                "gamma": gamma,
                "count": k,
                "bat": r["bat"],
                "adaptation": r["adaptation"],
                "holds": r["holds"],
            }
        )
        if chosen is None and r["holds"]:
            chosen = (gamma, k)
    return chosen, rows


def selection_reports(
    config: Any,
    source: Any,
    plan: Any,
    fetch: Any,
    surrogate: Path | None,
    auto: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both sides of Proposition 2 for every value of a selection `plan` (and the --gamma auto
    grid, whose chosen γ is appended to plan.values as gamma-auto), for `select`: `config` is its
    SelectConfig, `source` the score store, `fetch` the pool fetcher (None: no pool rows),
    `surrogate` the adapter directory. Returns (report per value name, the --gamma auto report
    or None). Loads the model."""
    from batctl.samples import load_samples
    from batctl.selection import GAMMA_GRID, Value
    from batctl.tasks import load_task
    from batctl.tasks.base import TaskSettings

    params = source.params
    c = config.damping if config.damping is not None else float(params.get("damping", 0.1))
    settings = TaskSettings(
        model=str(config.model),
        dtype=params.get("dtype", "fp32"),
        trust_remote_code=config.trust_remote_code,
        max_length=int(params.get("max_length", 512)),
        instance_prompt=params.get("instance_prompt"),
        resolution=params.get(
            "resolution"
        ),  # None: the model's native size, as the score run had it
        flip=bool(params.get("flip", False)),
        loss_draws=int(params.get("loss_draws", 4)),
    )
    adaptation = load_samples(
        config.data,
        flag="--data",
        strict=bool(params.get("strict", False)),
        paragraphs=bool(params.get("paragraphs", False)),
    )
    longest = max([v.count for v in plan.values] + [k for _, k in plan.auto_grid], default=0)
    rows = plan.stream[:longest]
    pool_samples = [fetch.decoded(int(r)) for r in rows] if fetch is not None else []
    log.info(
        "Proposition 2: gradients of %d adaptation and %d pool samples",
        len(adaptation),
        len(pool_samples),
    )
    task = load_task(settings, params.get("task", "auto"))
    task.load_adapter(surrogate, trainable=True)
    task.model.eval()
    grams = gradient_grams(task, adaptation, pool_samples, c, config.batch_size)
    if grams.n != plan.n:
        log.warning(
            "--data has %d finite adaptation samples, the score store %d: γ is computed with the "
            "store's n",
            grams.n,
            plan.n,
        )
    cache: dict[str, tuple[float, float]] = {}
    reports = {v.name: report(grams, v.count, cache) for v in plan.values}
    auto_report = None
    if auto:
        chosen, grid = choose_auto(grams, plan.auto_grid, cache)

        if chosen is None:
            log.warning(
                "--gamma auto: Proposition 2 holds at no γ of the grid %s..%s that the pool can "
                "serve; gamma-auto is the empty selection (plain adaptation)",
                GAMMA_GRID[0],
                GAMMA_GRID[-1],
            )
            value = Value("auto", None, 0, plan.n)
        else:
            log.info("--gamma auto: Proposition 2 holds from γ = %s (m = %d)", *chosen)
            value = Value("auto", chosen[0], chosen[1], plan.n)
        plan.values.append(value)
        reports[value.name] = report(grams, value.count, cache)
        auto_report = {
            "gamma": None if chosen is None else chosen[0],
            "count": value.count,
            "grid": grid,
            "grid_gammas": list(GAMMA_GRID),
            "holds_nowhere": chosen is None,
        }
    return reports, auto_report
