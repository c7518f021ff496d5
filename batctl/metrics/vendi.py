"""The Vendi Score (Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for
Machine Learning", TMLR 2023), with the cosine-similarity kernel.

For n samples with embeddings x_1 .. x_n, K_ij = cos(x_i, x_j) (so K_ii = 1) and

    VS = exp(−Σ_i λ_i log λ_i),   λ_1 .. λ_n the eigenvalues of K / n,   0 log 0 = 0,

the exponential of the Shannon entropy of the eigenvalues (which are >= 0 and sum to 1). It is
the "effective number" of distinct samples: 1 when all samples are the same (up to scale),
n when they are pairwise orthogonal.
"""

from __future__ import annotations

import math

import torch


def vendi_score(embeddings: torch.Tensor) -> float:
    """The Vendi Score of the rows of `embeddings` [n, d] with the cosine kernel, in float64.

    Raises ValueError for an empty set or a zero row (its cosine similarity is undefined).
    """
    x = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vendi_score: expected a non-empty [n, d] matrix, got {tuple(x.shape)}")
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("vendi_score: a zero embedding has no cosine similarity")
    x = x / norms
    n = x.shape[0]
    kernel = (x @ x.T) / n
    kernel = (kernel + kernel.T) / 2  # exactly symmetric for eigvalsh
    eigenvalues = torch.linalg.eigvalsh(kernel).clamp(min=0.0)  # rounding can give -1e-17
    positive = eigenvalues[eigenvalues > 0]
    entropy = -float((positive * positive.log()).sum())
    return math.exp(entropy)
