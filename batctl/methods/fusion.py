"""Influence fused with the lexical baselines (DESIGN §5b): one method, `--method fusion`.

A pool sample's score is the sum of its standardised scores under the `--fuse` methods, by
default influence (DESIGN §5, with `--normalize`), bm25 and tfidf:

    s(x) = Σ_m (s_m(x) − μ_m) / σ_m,   m ∈ --fuse

Lexical overlap finds the target domain's vocabulary; the gradient finds what lowers the
target loss at the surrogate. On the demo worlds neither ranks the target domain as well as
their sum (benchmarks/bat_quality.py; the recipe was chosen on the `logging` dev world).

The standardising constants μ_m, σ_m are fitted once, in `prepare`, and saved with the other
state (`fusion.safetensors`), so every shard and every resumed run adds the same z-scores: the
lexical ones over the whole pool (a text pass), influence's over a fixed sample of rows (every
⌈N / 512⌉-th readable row: a full pass of gradients would double the method's cost).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batctl.data import Sample
from batctl.methods.base import Method, Result, Scorer

log = logging.getLogger("batctl.score")

STATE = "fusion.safetensors"
PARTS = ("influence", "bm25", "tfidf", "embed")
"""The methods --fuse may name (embed: the backbone's, or CLIP's with --clip)."""
INFLUENCE_SAMPLE = 512
"""Rows whose influence scores estimate influence's mean and spread."""


def readable_samples(pool: Any, every: int = 1) -> list[Sample]:
    """Every `every`-th readable sample of the pool, decoded, in pool order."""
    from batctl.data import BadSample

    out, seen = [], 0
    for row in pool.iter_rows():
        if type(row) is BadSample:
            continue
        if seen % every == 0:
            sample = pool.decoded(row)
            if type(sample) is not BadSample:
                out.append(sample)
        seen += 1
    return out


def moments(values: np.ndarray) -> tuple[float, float]:
    """(mean, standard deviation) of the finite values; σ = 1 when they do not spread."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 0.0, 1.0
    sigma = float(finite.std())
    return float(finite.mean()), sigma if sigma > 0 else 1.0


class FusionScorer(Scorer):
    def __init__(self, scorers: dict[str, Scorer], stats: dict[str, tuple[float, float]]) -> None:
        self.scorers, self.stats = scorers, stats
        self.n_adaptation = next(iter(scorers.values())).n_adaptation

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        total = np.zeros(len(samples))
        usable = np.ones(len(samples), dtype=bool)
        for name, scorer in self.scorers.items():
            mu, sigma = self.stats[name]
            for i, result in enumerate(scorer.score(samples, rows)):
                if result is None:
                    usable[i] = False
                else:
                    total[i] += (result[0] - mu) / sigma
        return [(float(t), None) if ok else None for t, ok in zip(total, usable, strict=True)]

    def attrs(self) -> dict[str, Any]:
        return {
            "fuse": list(self.scorers),
            **{f"{m}_mean_std": list(v) for m, v in self.stats.items()},
        }


class Fusion(Method):
    name = "fusion"

    def prepare(self, work: Path, pool: Any, config: Any) -> Scorer:
        from batctl.methods import make_method
        from batctl.methods.hybrid import prefilter_all
        from batctl.methods.influence import Influence
        from batctl.methods.lexical import load_state, save_state

        parts = list(config.fuse_parts)
        scorers: dict[str, Scorer] = {}
        for name in parts:
            if name == "influence":
                # The cosine, as the hybrid uses it: comparable across pools, not dominated by
                # the few samples with huge gradients.
                scorers[name] = Influence().prepare(
                    work, pool, dataclasses.replace(config, normalize=True)
                )
                continue
            folder = work / name
            folder.mkdir(exist_ok=True)
            scorers[name] = make_method(name).prepare(folder, pool, config)
        path = work / STATE
        if not path.is_file():
            stats = {m: moments(prefilter_all(pool, scorers[m])) for m in parts if m != "influence"}
            sampled = 0
            if "influence" in scorers:
                n = sum(pool.row_counts())
                sample = readable_samples(pool, every=max(1, math.ceil(n / INFLUENCE_SAMPLE)))
                values = scorers["influence"].score(sample, list(range(len(sample))))
                stats["influence"] = moments(
                    np.array([np.nan if v is None else v[0] for v in values], dtype=np.float64)
                )
                sampled = len(sample)
            save_state(
                path,
                {m: np.array(stats[m], dtype=np.float64) for m in parts},
                {"parts": parts, "influence_sample": sampled},
            )
            log.info("fusion: z-scores of %s", ", ".join(parts))
        arrays = load_state(path)[0]
        return FusionScorer(scorers, {m: (float(arrays[m][0]), float(arrays[m][1])) for m in parts})
