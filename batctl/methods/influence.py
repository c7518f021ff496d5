"""Influence (DESIGN §5) as a score-store method: s(x) = Σ_l r_l · ∇_l L(x) at the surrogate.

`prepare` loads the backbone with the surrogate adapter and computes (or reloads) the
preconditioned target r, saved as target.safetensors in the score directory so every shard and
every resumed run scores with exactly the same r; `score` runs the configured engine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from batctl.data import Sample
from batctl.methods.base import Method, Result, Scorer
from batctl.scorestore import TARGET

log = logging.getLogger("batctl.score")

TARGET_BATCH = 8
"""The target is part of the store every shard and resumed run shares, so it must not depend on
--batch-size (which may change between runs): it is computed in batches of this many samples."""


def load_task_with_surrogate(config: Any, surrogate: Path) -> Any:
    """The backbone with the surrogate adapter, trainable so its gradients exist."""
    from batctl.tasks import load_task

    settings = dataclasses.replace(config.task_settings(), loss_draws=config.loss_draws)
    task = load_task(settings, config.task)
    task.load_adapter(surrogate, trainable=True)
    task.model.eval()
    return task


def ensure_target(work: Path, task: Any, config: Any) -> tuple[Any, dict[str, str]]:
    """r per layer: loaded from the work dir, or computed from D_A (and --target) and saved there.

    Every shard scores with the same saved r, so shards agree to the bit.
    """
    from batctl.influence.target import load_target, prepare_target, save_target

    path = work / TARGET
    if path.is_file():
        return load_target(path)
    adaptation = config.read_samples(config.data, "--data")
    target_samples = None
    if config.target is not None:
        target_samples = config.read_samples(config.target, "--target")
    target = prepare_target(
        task,
        adaptation,
        target_samples,
        preconditioner=config.preconditioner,
        damping=config.damping,
        batch_size=TARGET_BATCH,
    )
    metadata = {
        "preconditioner": target.preconditioner,
        "preconditioner_flag": config.preconditioner,
        "damping": str(config.damping),
        "engine": config.engine,
        "normalize": str(config.normalize),
        "target": "adaptation set" if config.target is None else str(config.target),
        **task.loss_settings(),
    }
    if config.engine == "fd":
        # The fd step is measured once, on D_A, and stored: a resumed run or another shard
        # must take exactly the same step or the store would not be one consistent run.
        from batctl.influence.engines import make_engine

        calibration = task.collate(adaptation[: min(TARGET_BATCH, len(adaptation))], "adaptation")
        metadata["fd_eps"] = repr(make_engine("fd", task, target, calibration=calibration).eps)
    staging = path.with_name(path.name + ".tmp")
    save_target(staging, target, metadata)
    os.replace(staging, path)  # a kill mid-write must not leave a truncated target to resume from
    return load_target(path)


def engine_for(config: Any, task: Any, target: Any, metadata: dict[str, str]) -> Any:
    """The configured engine, with the fd step recorded in target.safetensors."""
    from batctl.influence.engines import make_engine

    if config.engine == "fd":
        options: dict[str, Any] = {"eps": float(metadata["fd_eps"])}
    else:
        options = {"normalize": config.normalize}
    return make_engine(config.engine, task, target, **options)


def score_batch(
    samples: Sequence[Sample], task: Any, engine: Any, want_layers: bool, strict: bool
) -> Iterator[tuple[int, Result]]:
    """Yield (index, (score, layer scores) or None) for a batch; a sample the task rejects at
    collation is retried alone so it cannot take its batch down with it, and so is a batch
    the engine can only score sample by sample (a non-finite sample under --normalize)."""
    from batctl.errors import BadSampleError
    from batctl.influence.engines import NonFiniteInBatch

    try:
        result = engine.score(task.collate(samples, "pool"), layer_scores=want_layers)
    except NonFiniteInBatch:
        for i, sample in enumerate(samples):
            for _, single in score_batch([sample], task, engine, want_layers, strict):
                yield i, single
        return
    except BadSampleError as exc:
        if strict or len(samples) == 1:
            if strict:
                raise
            log.warning(
                "skipped %s (the %s task cannot take it): %s", samples[0].key, task.family, exc
            )
            yield 0, None
            return
        for i, sample in enumerate(samples):
            for _, single in score_batch([sample], task, engine, want_layers, strict):
                yield i, single
        return
    layers = (
        result.layer_scores.numpy() if want_layers and result.layer_scores is not None else None
    )
    for i, value in enumerate(result.scores.tolist()):
        yield i, (value, None if layers is None else layers[i])


def batches_by_size(
    task: Any, samples: Sequence[Sample], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices of `samples` cut into batches of similar size (LM: tokens), so batches pad less:
    at most `batch_size` samples and, with `max_tokens`, that many padded tokens; the costliest
    batch first (`batctl.batching.plan_batches`).

    No engine mixes rows, so a score does not depend on its batch (up to float rounding), and
    the order is fixed by the samples themselves: a resumed run or another shard batches the
    same chunk exactly the same way.
    """
    from batctl.batching import plan_batches

    order = sorted(range(len(samples)), key=lambda i: task.size_hint(samples[i]))
    sizes = [task.size_hint(samples[i]) for i in order]
    return [[order[j] for j in batch] for batch in plan_batches(sizes, batch_size, max_tokens)]


class InfluenceScorer(Scorer):
    def __init__(self, task: Any, engine: Any, target: Any, config: Any, layers: bool) -> None:
        from batctl.batching import MemoryGuard

        self.task, self.engine, self.config, self.target = task, engine, config, target
        self.n_adaptation = int(target.n_adaptation)
        self.layer_names = list(target.layers) if layers else None
        self.guard = MemoryGuard()  # an out-of-memory batch is halved, and so is every later one

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        from batctl.batching import TOO_BIG

        def results_of(batch: list[int]) -> list[Result]:
            found: list[Result] = [None] * len(batch)
            for index, result in score_batch(
                [samples[i] for i in batch],
                self.task,
                self.engine,
                self.layer_names is not None,
                self.config.strict,
            ):
                found[index] = result
            return found

        results: list[Result] = [None] * len(samples)
        plan = batches_by_size(
            self.task, samples, self.config.batch_size, self.config.max_batch_tokens
        )
        for batch in plan:
            for i, result in zip(batch, self.guard.run(batch, results_of), strict=True):
                # a sample the task cannot take, or too big to fit alone: stays unreadable
                results[i] = None if result is TOO_BIG else result
        return results


class Influence(Method):
    name = "influence"

    def prepare(self, work: Path, pool: Any, config: Any) -> Scorer:
        task = load_task_with_surrogate(config, Path(config.surrogate))
        target, metadata = ensure_target(work, task, config)
        engine = engine_for(config, task, target, metadata)
        return InfluenceScorer(task, engine, target, config, config.layer_scores)
