"""The selection-method interface (DESIGN §5b): every method writes the same score store.

A method turns pool samples into one score each (higher is better). `score` streams the pool
chunk by chunk, asks the method for the chunk's scores, and writes them with their status; it
never knows which method it runs, and `select` never knows which method wrote the store.

The life of a method in one `score` run:

    method = make_method(config.method)           # cheap: no model, no pool pass
    scorer = method.prepare(work, pool, config)   # under the set-up lock: fit corpus statistics,
                                                  # compute the target, load the model; saved in
                                                  # `work` and reloaded by every shard / resume
    for chunk in my chunks:
        results = scorer.score(samples, rows)     # [(score, layer scores) or None] per sample

Which flags each method reads (and so which make a run's identity) is `ScoreConfig`'s, beside
the flags themselves (`stages/score.py`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from batctl.data import Sample

Result = tuple[float, np.ndarray | None] | None
"""One sample's outcome: (score, per-layer scores or None), or None when the method cannot
take the sample (it stays unreadable, status 2). A non-finite score is stored as status 3."""


class Scorer(abc.ABC):
    """A prepared method: everything needed to score pool samples, loaded."""

    n_adaptation: int
    """Adaptation samples behind the scores (what γ = n / (n + m) counts as n)."""

    layer_names: list[str] | None = None
    """Names of per-layer contributions, when the method has layers (influence)."""

    @abc.abstractmethod
    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        """One result per sample (`rows`: their store rows, for methods that precomputed)."""

    def attrs(self) -> dict[str, Any]:
        """What the store's attributes record about the method (name, settings)."""
        return {}


class Method(abc.ABC):
    """A selection method's flags and set-up; `prepare` returns its Scorer."""

    name: ClassVar[str]

    @abc.abstractmethod
    def prepare(self, work: Path, pool: Any, config: Any) -> Scorer:
        """Fit or load what scoring needs (saved under `work`, so every shard and every resumed
        run scores with exactly the same state) and return the scorer."""


def target_samples(config: Any) -> list[Sample]:
    """The samples a method compares the pool with: --target when given (it defines the
    target), else the adaptation set (--data)."""
    spec, flag = (
        (config.target, "--target") if config.target is not None else (config.data, "--data")
    )
    return config.read_samples(spec, flag)


def text_of(sample: Sample, instance_prompt: str | None = None) -> str:
    """The words of a sample, for the text methods: an LM record's text (Alpaca: instruction,
    input and output), an image's caption, else the instance prompt (DreamBooth's D_A images
    have no captions of their own), else ""."""
    record = sample.record
    if record.get("text"):
        return str(record["text"])
    if record.get("instruction") or record.get("output"):
        parts = (record.get("instruction"), record.get("input"), record.get("output"))
        return "\n".join(str(p) for p in parts if p)
    if record.get("caption"):
        return str(record["caption"])
    return instance_prompt or ""
