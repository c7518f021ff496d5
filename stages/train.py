"""train: the final adapter on D_A plus the selected backbone samples (or D_A alone: the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.config import TrainingOptions
from batctl.errors import BatctlError


@dataclass(frozen=True)
class TrainConfig(TrainingOptions):
    """Train the final adapter on D_A mixed with a selection."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data", "out")

    selection: Path | None = None
    """A selection directory (e.g. runs/select/gamma-0.75); its samples.tar is mixed into D_A."""

    init: Literal["fresh", "surrogate"] = "fresh"
    """Start from a fresh adapter or from the surrogate's weights (needs --surrogate)."""

    surrogate: Path | None = None
    """Surrogate adapter directory, for --init surrogate."""

    mix: Literal["uniform", "interleave"] = "uniform"
    """uniform: batches drawn from the augmented set; interleave: backbone samples at regular intervals."""

    backbone_weight: float = 1.0
    """Weight on the backbone samples' loss (DreamBooth's prior-preservation weight for diffusion)."""

    def problems(self) -> list[str]:
        out = super().problems()
        if self.init == "surrogate" and self.surrogate is None:
            out.append("--init surrogate needs --surrogate DIR")
        if self.backbone_weight < 0:
            out.append(f"--backbone-weight must be >= 0, got {self.backbone_weight}")
        return out


SAMPLES_TAR = "samples.tar"


def run(config: TrainConfig) -> dict[str, Any]:
    """Train the final adapter into `--out`; returns a summary (steps, losses, set sizes)."""
    from batctl.artifacts import check_same_model, describe_input, open_output, require_stage
    from batctl.safeload import check_adapter_dir
    from batctl.samples import describe_data, load_samples
    from batctl.tasks import load_task
    from batctl.training import train_adapter

    # setup: every input checked before the model is loaded
    model = describe_input(config.model, config.strict_fingerprints)
    inputs: dict[str, Any] = {
        "model": model,
        "data": describe_data(config.data, config.strict_fingerprints),
    }
    if config.selection is not None:
        require_stage(config.selection, "select", "--selection")
        if not (config.selection / SAMPLES_TAR).is_file():
            choices = sorted(
                p.name for p in config.selection.iterdir() if (p / SAMPLES_TAR).is_file()
            )
            raise BatctlError(
                f"--selection {config.selection} holds several selections ({', '.join(choices) or 'none'}); "
                f"pass one of them, e.g. {config.selection / choices[0] if choices else config.selection}"
            )
        check_same_model(config.selection, model, "--selection")
        inputs["selection"] = describe_input(config.selection)
    if config.init == "surrogate":
        require_stage(config.surrogate, "surrogate", "--surrogate")
        check_same_model(config.surrogate, model, "--surrogate")
        check_adapter_dir(config.surrogate, "--surrogate")
        inputs["surrogate"] = describe_input(config.surrogate)
    with open_output(
        config.out, stage="train", params=config.params(), inputs=inputs, force=config.force
    ) as out:
        # load
        adaptation = load_samples(
            config.data,
            flag="--data",
            strict=config.strict,
            paragraphs=config.paragraphs,
            max_sample_bytes=config.max_sample_bytes(),
        )
        backbone = []
        if config.selection is not None:
            # strategy none writes an empty samples.tar: plain adaptation through the same path
            tar = str(config.selection / SAMPLES_TAR)
            backbone = load_samples(
                tar,
                flag="--selection",
                strict=True,
                allow_empty=True,
                max_sample_bytes=config.max_sample_bytes(),
            )
        task = load_task(config.task_settings(), config.task)
        if config.init == "surrogate":
            task.load_adapter(config.surrogate, trainable=True)
        else:
            task.add_adapter(config.adapter_settings(), seed=config.seed)
        # loop + save
        loop = config.loop_settings(mix=config.mix, backbone_weight=config.backbone_weight)
        summary = train_adapter(task, adaptation, backbone, loop, out.work)
        summary.update(task.counters())
        out.extra["summary"] = summary
    return {"out": str(config.out), **summary}
