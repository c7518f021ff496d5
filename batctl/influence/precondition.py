"""Preconditioners: r_l = H_l⁻¹ v_l with the damped Gauss-Newton H_l = GᵀG/n + λ_l I (DESIGN §5).

All functions take one layer's per-sample gradient matrix G (n × D_l, rows g_i) and target
gradient v (D_l,), and return float64 tensors on G's device. Units: gradients in loss per
parameter unit; H and λ in (loss per parameter)² (a Fisher, not a Hessian); r = H⁻¹v in
parameter per loss, so scores r · ∇L(x) are dimensionless (identity: r = v, scores in
(loss per parameter)²).

- ``damping``: λ_l = c · mean_i ||g_i||² / D_l (DataInf's choice; c = 0.1 by default).
- ``woodbury`` (exact H⁻¹v): r = (v − Gᵀ(nλI + GGᵀ)⁻¹Gv)/λ; O(n²D_l + n³). When D_l < n it
  solves the equivalent D_l × D_l system (GᵀG/n + λI) r = v instead, O(nD_l² + D_l³): same r.
- ``datainf`` (DataInf's Sherman-Morrison average, an approximation of H⁻¹v):
  r = (1/λ)(v − (1/n) Σ_i (g_i·v)/(λ + ||g_i||²) g_i); O(nD_l).
- ``identity``: r = v (gradient alignment, as LESS and TracIn).
- ``auto``: woodbury when n ≤ ``AUTO_WOODBURY_MAX_N`` (2048), else datainf.

A layer whose adaptation gradients are all zero has λ = 0 and no curvature to invert: its r is
0 for woodbury and datainf (r = v for identity).
"""

from __future__ import annotations

import torch

PRECONDITIONERS = ("auto", "woodbury", "datainf", "identity")
DEFAULT_DAMPING = 0.1
AUTO_WOODBURY_MAX_N = 2048
"""``auto`` uses the exact woodbury solve up to this many adaptation samples (its n × n system
costs n²D_l per layer), DataInf's O(nD_l) approximation above."""


def resolve(preconditioner: str, n: int) -> str:
    """The preconditioner ``auto`` stands for with n adaptation samples (others unchanged)."""
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(
            f"unknown preconditioner {preconditioner!r}; one of {', '.join(PRECONDITIONERS)}"
        )
    if preconditioner == "auto":
        return "woodbury" if n <= AUTO_WOODBURY_MAX_N else "datainf"
    return preconditioner


def damping(G: torch.Tensor, c: float = DEFAULT_DAMPING) -> float:
    """λ = c · mean_i ||g_i||² / D for G of shape (n, D)."""
    G = G.double()
    return float(c * G.pow(2).sum(1).mean() / G.shape[1])


def woodbury(G: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact r = (GᵀG/n + λI)⁻¹ v for G (n, D), v (D,), λ > 0; float64 (D,)."""
    G, v = G.double(), v.double().reshape(-1)
    n, d = G.shape
    if lam <= 0:
        return torch.zeros_like(v)
    if d < n:  # the primal system is the smaller one
        H = G.T @ G / n
        H.diagonal().add_(lam)
        return _spd_solve(H, v[:, None])[:, 0]
    K = G @ G.T
    K.diagonal().add_(n * lam)
    z = _spd_solve(K, (G @ v)[:, None])[:, 0]
    return (v - G.T @ z) / lam


def datainf(G: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """DataInf's r = (1/λ)(v − (1/n) Σ_i (g_i·v)/(λ + ||g_i||²) g_i); float64 (D,)."""
    G, v = G.double(), v.double().reshape(-1)
    if lam <= 0:
        return torch.zeros_like(v)
    coef = (G @ v) / (lam + G.pow(2).sum(1))
    return (v - G.T @ coef / G.shape[0]) / lam


def precondition(
    G: torch.Tensor, v: torch.Tensor, preconditioner: str, c: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, float]:
    """(r, λ) for one layer: G (n, D) adaptation gradients, v (D,) target gradient.

    ``preconditioner`` is one of ``PRECONDITIONERS`` (``auto`` resolved with n = G.shape[0]).
    λ is reported for every preconditioner (identity does not use it).
    """
    method = resolve(preconditioner, G.shape[0])
    lam = damping(G, c)
    if method == "woodbury":
        return woodbury(G, v, lam), lam
    if method == "datainf":
        return datainf(G, v, lam), lam
    return v.double().reshape(-1).clone(), lam


def _spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve A x = b for symmetric positive definite A (Cholesky; LU if rounding breaks it)."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(b, L)
    return torch.linalg.solve(A, b)
