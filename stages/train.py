"""train: the final adapter on D_A plus the selected backbone samples (or D_A alone: the baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.config import TrainingOptions
from batctl.errors import BatctlError
from batctl.selection_files import SAMPLES_TAR


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

    reselect_every: int = 0
    """The paper's ALBAT loop: every N steps re-check Proposition 2 at the current adapter and, when it fails, re-select as many samples from the candidates (--scores or --candidates); 0: the --selection is kept throughout."""

    scores: Path | None = None
    """Re-selection candidates: the top --candidate-count rows of this score store."""

    candidates: Path | None = None
    """Re-selection candidates: every sample of this selection directory (e.g. a larger one, gamma-0.25)."""

    candidate_count: int = 256
    """How many of the score store's top rows are re-selection candidates (M)."""

    damping: float | None = None
    """c in Proposition 2's λ = c · mean ||g||² / D_l for the checks; default: the --scores run's --damping, else 0.1."""

    def problems(self) -> list[str]:
        out = super().problems()
        if self.init == "surrogate" and self.surrogate is None:
            out.append("--init surrogate needs --surrogate DIR")
        if self.backbone_weight < 0:
            out.append(f"--backbone-weight must be >= 0, got {self.backbone_weight}")
        out += self.reselect_problems()
        return out

    def reselect_problems(self) -> list[str]:
        """The ALBAT loop's flags: a selection to start from and exactly one candidate source."""
        out = []
        if self.reselect_every < 0:
            out.append(f"--reselect-every must be >= 0, got {self.reselect_every}")
        if self.candidate_count < 1:
            out.append(f"--candidate-count must be >= 1, got {self.candidate_count}")
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping > 0):
            out.append(f"--damping must be a finite number > 0, got {self.damping}")
        sources = [f for f in ("scores", "candidates") if getattr(self, f) is not None]
        if self.reselect_every > 0:
            if self.selection is None:
                out.append(
                    "--reselect-every needs --selection (its size k is kept when re-selecting)"
                )
            if len(sources) != 1:
                out.append(
                    "--reselect-every needs one candidate source: --scores DIR or --candidates DIR"
                )
        elif sources:
            out.append(f"--{sources[0]} is only used with --reselect-every N")
        return out


def run(config: TrainConfig) -> dict[str, Any]:
    """Train the final adapter into `--out`; returns a summary (steps, losses, set sizes)."""
    from batctl.artifacts import check_same_model, describe_input, describe_model, require_stage
    from batctl.distributed import check_batch_fits, rank_output, world_from_env
    from batctl.safeload import check_adapter_dir
    from batctl.samples import describe_data, load_samples
    from batctl.selection_files import warn_other_adaptation

    # setup: every input checked before the model is loaded
    model = describe_model(config.model, config.strict_fingerprints)
    inputs: dict[str, Any] = {
        "model": model,
        "data": describe_data(config.data, config.strict_fingerprints),
    }
    for flag in ("selection", "candidates"):
        path = getattr(config, flag)
        if path is not None:
            require_selection(path, f"--{flag}")
            check_same_model(path, model, f"--{flag}")
            inputs[flag] = describe_input(path)
    if config.scores is not None:
        require_stage(config.scores, "score", "--scores")
        check_same_model(config.scores, model, "--scores")
        inputs["scores"] = describe_input(config.scores)
    if config.init == "surrogate":
        require_stage(config.surrogate, "surrogate", "--surrogate")
        check_same_model(config.surrogate, model, "--surrogate")
        check_adapter_dir(config.surrogate, "--surrogate")
        inputs["surrogate"] = describe_input(config.surrogate)
    check_batch_fits(config.batch_size, world_from_env())
    with rank_output(  # under torchrun / accelerate launch, only rank 0 writes
        config.out, stage="train", params=config.params(), inputs=inputs, force=config.force
    ) as out:
        # torch and transformers only now: an up-to-date output is decided without them
        from batctl.tasks import load_task
        from batctl.training import train_adapter

        # load
        adaptation = config.read_samples(config.data, "--data")
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
        if config.selection is not None:
            warn_other_adaptation(config.selection, len(adaptation), len(backbone))
        reselector = make_reselector(config, adaptation, backbone, out.work)
        task = load_task(config.task_settings(), config.task)
        if config.init == "surrogate":
            task.load_adapter(config.surrogate, trainable=True)
        else:
            task.add_adapter(config.adapter_settings(), seed=config.seed)
        # loop + save
        loop = config.loop_settings(mix=config.mix, backbone_weight=config.backbone_weight)
        summary = train_adapter(
            task, adaptation, backbone, loop, out.work, description="train", reselector=reselector
        )
        summary.update(task.counters())
        if reselector is not None:
            from batctl.reselect import PLOT, plot_history

            plot_history(reselector.records, out.work / PLOT)
            out.extra["reselect"] = reselector.summary()
            summary["reselect"] = {
                k: v for k, v in out.extra["reselect"].items() if k != "final_keys"
            }
        out.extra["summary"] = summary
    return {"out": str(config.out), **summary}


def require_selection(path: Path, flag: str) -> None:
    """`path` must be one finished selection (a select output holding samples.tar)."""
    from batctl.artifacts import require_stage

    require_stage(path, "select", flag)
    if not (path / SAMPLES_TAR).is_file():
        choices = sorted(p.name for p in path.iterdir() if (p / SAMPLES_TAR).is_file())
        raise BatctlError(
            f"{flag} {path} holds several selections ({', '.join(choices) or 'none'}); "
            f"pass one of them, e.g. {path / choices[0] if choices else path}"
        )


def make_reselector(
    config: TrainConfig, adaptation: list[Any], backbone: list[Any], out_dir: Path
) -> Any:
    """The ALBAT loop's hook (`batctl.reselect.Reselector`) with its candidates, or None when
    --reselect-every is 0."""
    if config.reselect_every == 0:
        return None
    from batctl.reselect import Reselector, ReselectSettings, candidates_from_scores
    from batctl.samples import load_samples

    if not backbone:
        raise BatctlError(
            f"--selection {config.selection} is empty (plain adaptation): --reselect-every keeps "
            "its size, so give a selection with samples (e.g. select --gamma 0.75)"
        )
    damping = None
    if config.scores is not None:
        candidates, damping = candidates_from_scores(config.scores, config.candidate_count)
    else:
        tar = str(config.candidates / SAMPLES_TAR)  # type: ignore[operator]
        candidates = load_samples(tar, flag="--candidates", strict=True, allow_empty=True)
    if not candidates:
        raise BatctlError(
            f"--{'scores' if config.scores else 'candidates'}: no candidate samples to re-select from"
        )
    if config.damping is not None:
        damping = config.damping
    settings = ReselectSettings(
        every=config.reselect_every,
        damping=0.1 if damping is None else damping,
        batch_size=config.batch_size,
    )
    return Reselector(adaptation, backbone, candidates, settings, out_dir)
