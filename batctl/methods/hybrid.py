"""A cheap prefilter whose top candidates influence re-ranks (DESIGN §5b), as one method.

`prepare` fits the prefilter (bm25 or tfidf over the text), scores every pool row with it in
one streaming pass, and keeps the top `--candidates` rows; only those get a gradient, so the
model's cost is that of M samples, not of the pool. Each row's stored score keeps one order:

- candidates: 2 + cos(r, ∇L(x)) ∈ [1, 3], the cosine of the preconditioned target and the
  sample's gradient (influence with `--normalize`, divided by ||r||): candidates come first,
  in influence order;
- every other row: p / (1 + p) ∈ [0, 1), p its prefilter score (≥ 0 for bm25 and tfidf), so
  past the candidates `select` continues in prefilter order.

The candidate rows are saved in the score directory (`candidates.safetensors`): every shard
and every resumed run re-ranks exactly the same candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batctl.data import Sample
from batctl.methods.base import Method, Result, Scorer

log = logging.getLogger("batctl.score")

CANDIDATES = "candidates.safetensors"


def top_rows(values: np.ndarray, count: int) -> np.ndarray:
    """Ascending row indices of the `count` highest values (ties: the earlier row wins)."""
    order = np.argsort(-values, kind="stable")[:count]
    return np.sort(order)


def prefilter_all(pool: Any, scorer: Scorer, batch: int = 4096) -> np.ndarray:
    """f64[N]: the prefilter's score of every pool row (NaN where the row is unreadable)."""
    from batctl.data import BadSample

    values: list[float] = []
    pending: list[Sample] = []
    slots: list[int] = []

    def flush() -> None:
        if not pending:  # a pool with nothing readable: scikit-learn refuses an empty batch
            return
        for slot, result in zip(slots, scorer.score(pending, slots), strict=True):
            values[slot] = np.nan if result is None else result[0]
        pending.clear()
        slots.clear()

    for row in pool.iter_rows():
        values.append(np.nan)
        sample = row if type(row) is BadSample else pool.decoded(row)
        if type(sample) is BadSample:
            continue
        pending.append(sample)
        slots.append(len(values) - 1)
        if len(pending) == batch:
            flush()
    flush()
    return np.asarray(values, dtype=np.float64)


def squash(values: np.ndarray) -> np.ndarray:
    """p / (1 + p) for p ≥ 0: monotone into [0, 1), so prefilter order survives below 1."""
    p = np.maximum(values, 0.0)
    return p / (1.0 + p)


class HybridScorer(Scorer):
    def __init__(
        self, prefilter: Scorer, influence: Scorer, candidates: np.ndarray, r_norm: float
    ) -> None:
        self.prefilter, self.influence = prefilter, influence
        self.candidates = set(int(r) for r in candidates)
        self.r_norm = r_norm
        self.n_adaptation = influence.n_adaptation

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        results: list[Result] = [
            None if r is None else (float(squash(np.array([r[0]]))[0]), None)
            for r in self.prefilter.score(samples, rows)
        ]
        picked = [i for i, row in enumerate(rows) if int(row) in self.candidates]
        if picked:
            reranked = self.influence.score([samples[i] for i in picked], [rows[i] for i in picked])
            for i, result in zip(picked, reranked, strict=True):
                results[i] = None if result is None else (2.0 + result[0] / self.r_norm, None)
        return results

    def attrs(self) -> dict[str, Any]:
        return {"candidates": len(self.candidates)}


class Hybrid(Method):
    name = "hybrid"

    def prepare(self, work: Path, pool: Any, config: Any) -> Scorer:
        import dataclasses

        from batctl.methods import make_method
        from batctl.methods.influence import Influence
        from batctl.methods.lexical import load_state, save_state

        prefilter_dir = work / "prefilter"
        prefilter_dir.mkdir(exist_ok=True)
        prefilter = make_method(config.prefilter).prepare(prefilter_dir, pool, config)
        path = work / CANDIDATES
        if not path.is_file():
            values = prefilter_all(pool, prefilter)
            finite = np.where(np.isfinite(values), values, -np.inf)
            rows = top_rows(finite, min(config.candidate_count, int(np.isfinite(values).sum())))
            save_state(path, {"rows": rows.astype(np.int64)}, {"prefilter": config.prefilter})
            log.info(
                "hybrid: %s prefilter kept %d of %d rows for influence to re-rank",
                config.prefilter, len(rows), len(values),
            )  # fmt: skip
        rows = load_state(path)[0]["rows"]
        # The cosine needs the gradient norm of each candidate: the hooks engine's --normalize.
        influence = Influence().prepare(work, pool, dataclasses.replace(config, normalize=True))
        r = influence.target.r
        r_norm = float(np.sqrt(sum(float((t.double() ** 2).sum()) for t in r.values())))
        return HybridScorer(prefilter, influence, rows, r_norm if r_norm > 0 else 1.0)
