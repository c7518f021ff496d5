"""surrogate: train the cheap adapter θ_s on D_A whose gradients the score stage uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from batctl.config import TrainingOptions


@dataclass(frozen=True)
class SurrogateConfig(TrainingOptions):
    """Train a surrogate adapter on the adaptation set."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data", "out")


def run(config: SurrogateConfig) -> dict[str, Any]:
    """Train the surrogate adapter into `--out`; returns a summary (steps, losses, sizes)."""
    from batctl.artifacts import describe_model
    from batctl.distributed import check_batch_fits, rank_output, world_from_env
    from batctl.samples import describe_data

    # setup
    inputs = {
        "model": describe_model(config.model, config.strict_fingerprints),
        "data": describe_data(config.data, config.strict_fingerprints),
    }
    check_batch_fits(config.batch_size, world_from_env())
    with rank_output(  # under torchrun / accelerate launch, only rank 0 writes
        config.out, stage="surrogate", params=config.params(), inputs=inputs, force=config.force
    ) as out:
        # torch and transformers only now: an up-to-date output is decided without them
        from batctl.tasks import load_task
        from batctl.training import train_adapter

        # load
        adaptation = config.read_samples(config.data, "--data")
        task = load_task(config.task_settings(), config.task)
        task.add_adapter(config.adapter_settings(), seed=config.seed)
        # loop + save
        summary = train_adapter(
            task, adaptation, [], config.loop_settings(), out.work, description="surrogate"
        )
        summary.update(task.counters())
        out.extra["summary"] = summary
    return {"out": str(config.out), **summary}
