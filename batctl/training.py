"""The one adapter training loop, shared by `surrogate` and `train` and blind to the model family.

It sees a Task (per-sample losses, trainable parameters, save_adapter) and two lists of samples:
the adaptation set D_A and the backbone samples chosen by `select` (empty for the surrogate and
for plain adaptation). Each optimizer step draws `batch_size * grad_accum` samples:

- `uniform`: every epoch shuffles D_A ∪ backbone together, so each batch is a uniform draw from
  the augmented set;
- `interleave`: every epoch shuffles each set on its own and spreads the backbone samples evenly
  between the adaptation samples (the paper's setting).

A batch's loss is Σ_i w_i l_i / B with w = 1 for adaptation samples and `backbone_weight` for
backbone samples (DreamBooth's prior-preservation weight, with real data as the prior).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batctl.data import Sample
from batctl.errors import BatctlError, UsageError
from batctl.tasks.base import Role, Task

log = logging.getLogger("batctl.training")


@dataclass(frozen=True)
class LoopSettings:
    """What the loop does; mirrors the training flags of `surrogate` and `train`."""

    steps: int | None = 200
    """Optimizer steps, unless `epochs` is given."""

    epochs: int | None = None
    """Passes over the augmented set; overrides `steps`."""

    batch_size: int = 4
    """Samples per micro-batch."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""

    lr: float = 1e-4
    """Peak AdamW learning rate."""

    schedule: str = "cosine"
    """cosine (to 0) or constant, after warmup."""

    warmup_steps: int = 0
    """Linear warmup from 0 to `lr`."""

    seed: int = 0
    """Seeds data order and dropout."""

    save_every: int = 0
    """Checkpoint every N steps into checkpoints/step-N (0: never)."""

    mix: str = "uniform"
    """uniform or interleave (see the module docstring)."""

    backbone_weight: float = 1.0
    """Loss weight of backbone samples."""


@dataclass(frozen=True)
class Example:
    """A sample with the role it plays in training."""

    sample: Sample
    role: Role


def total_steps(settings: LoopSettings, n_examples: int) -> int:
    """Optimizer steps the run will take."""
    if settings.epochs is not None:
        # Micro-batches run across epoch boundaries, so count samples, not per-epoch batches.
        return math.ceil(settings.epochs * n_examples / (settings.batch_size * settings.grad_accum))
    assert settings.steps is not None
    return settings.steps


def epoch_order(n_adapt: int, n_backbone: int, mix: str, rng: np.random.Generator) -> list[int]:
    """One epoch's order over indices 0..n_adapt-1 (D_A) and n_adapt.. (backbone samples)."""
    if mix == "uniform" or n_backbone == 0 or n_adapt == 0:
        return [int(i) for i in rng.permutation(n_adapt + n_backbone)]
    adapt = rng.permutation(n_adapt)
    backbone = rng.permutation(n_backbone) + n_adapt
    # Place item i of a set of size n at (i + 0.5) / n: both sets spread evenly over the epoch.
    slots = [((i + 0.5) / n_adapt, 0, int(a)) for i, a in enumerate(adapt)]
    slots += [((j + 0.5) / n_backbone, 1, int(b)) for j, b in enumerate(backbone)]
    return [index for _, _, index in sorted(slots)]


def micro_batches(
    examples: Sequence[Example], n_adapt: int, settings: LoopSettings, seed: Any = None
) -> Iterator[list[Example]]:
    """Endless micro-batches of `batch_size` examples, epoch after epoch, seeded (by
    `settings.seed`, or by `seed`, anything `numpy.random.default_rng` takes)."""
    rng = np.random.default_rng(settings.seed if seed is None else seed)
    pending: list[Example] = []
    while True:
        for index in epoch_order(n_adapt, len(examples) - n_adapt, settings.mix, rng):
            pending.append(examples[index])
            if len(pending) == settings.batch_size:
                yield pending
                pending = []


def warmup_cosine(step: int, warmup_steps: int, total: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `total` (step 0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, settings: LoopSettings, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if settings.schedule == "constant" and step >= settings.warmup_steps:
        return 1.0
    return warmup_cosine(step, settings.warmup_steps, total)


def batch_loss(task: Task, batch: Sequence[Example], backbone_weight: float) -> torch.Tensor:
    """Σ_i w_i l_i / B over one micro-batch, collating each role on its own."""
    total = torch.zeros((), device=task.device)
    for role, weight in (("adaptation", 1.0), ("pool", backbone_weight)):
        samples = [e.sample for e in batch if e.role == role]
        if samples:
            losses = task.per_sample_loss(task.collate(samples, role))
            total = total + weight * losses.sum()
    return total / len(batch)


def training_examples(adaptation: Sequence[Sample], backbone: Sequence[Sample]) -> list[Example]:
    """D_A (role adaptation) followed by the backbone samples (role pool)."""
    return [Example(s, "adaptation") for s in adaptation] + [Example(s, "pool") for s in backbone]


def train_adapter(
    task: Task,
    adaptation: Sequence[Sample],
    backbone: Sequence[Sample],
    settings: LoopSettings,
    out_dir: Path | None,
    description: str = "training",
    reselector: Any = None,
) -> dict[str, Any]:
    """Train the task's adapter in place; write log.jsonl, loss.png, checkpoints/step-N, the adapter.

    Progress (step, loss, lr, rate, ETA) goes to stderr under `description`. Under torchrun /
    accelerate launch every rank runs this with the same seed and takes its slice of each global
    batch (`batctl.distributed`); only rank 0 passes an `out_dir` (the others pass None and
    write nothing). `reselector` (a `batctl.reselect.Reselector`, optional) is asked after every
    optimizer step but the last whether to train on other backbone samples from then on; the
    data order is then redrawn, seeded by (seed, step). Returns a summary: steps, first and last
    loss, samples seen.
    """
    import contextlib

    from batctl.console import progress_bar
    from batctl.distributed import Parallel

    examples = training_examples(adaptation, backbone)
    initial_backbone = len(backbone)
    steps = total_steps(settings, len(examples))
    if settings.warmup_steps > steps:
        raise UsageError(
            f"--warmup-steps {settings.warmup_steps} is more than the run's {steps} steps; "
            "lower it or train longer"
        )
    params = list(task.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings, steps)
    )
    batches = micro_batches(examples, len(adaptation), settings)
    torch.manual_seed(settings.seed)  # adapter dropout
    task.model.train()
    parallel = Parallel(task, optimizer)
    history: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        log_file = (
            stack.enter_context((out_dir / "log.jsonl").open("w", encoding="utf-8"))
            if out_dir is not None
            else None
        )
        advance = stack.enter_context(progress_bar(description, steps, unit="steps"))
        for step in range(steps):
            lr = optimizer.param_groups[0]["lr"]
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                mine, share = parallel.share(next(batches))
                loss = batch_loss(task, mine, settings.backbone_weight) * share
                loss = loss / settings.grad_accum
                parallel.backward(loss, sync=micro == settings.grad_accum - 1)
                step_loss += parallel.mean(loss)
            if not math.isfinite(step_loss):
                raise_diverged(step + 1, f"the loss is {step_loss}")
            parallel.optimizer.step()
            scheduler.step()
            parallel.optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "loss": step_loss, "lr": lr}
            history.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record, allow_nan=False) + "\n")
            advance(1, loss=step_loss, lr=lr)
            if (
                out_dir is not None
                and settings.save_every
                and (step + 1) % settings.save_every == 0
            ):
                check_finite_weights(task, step + 1)
                with parallel.unwrapped():
                    task.save_adapter(out_dir / "checkpoints" / f"step-{step + 1}")
            # A check after the last step could change nothing: it is not made.
            if reselector is not None and step + 1 < steps:
                chosen = reselector.maybe_reselect(step + 1, task, backbone)
                if chosen is not None:
                    backbone = chosen
                    examples = training_examples(adaptation, backbone)
                    batches = micro_batches(
                        examples, len(adaptation), settings, seed=(settings.seed, step + 1)
                    )
    parallel.close()
    task.model.eval()
    check_finite_weights(task, steps)
    if out_dir is not None:
        task.save_adapter(out_dir)
        plot_loss(history, out_dir / "loss.png")
    return {
        "steps": steps,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "samples_seen": steps * settings.batch_size * settings.grad_accum,
        "adaptation_samples": len(adaptation),
        "backbone_samples": initial_backbone,
    }


def raise_diverged(step: int, what: str) -> None:
    """The one error for a run that went non-finite: nothing of it is published."""
    raise BatctlError(
        f"training diverged at step {step}: {what}; no adapter was written "
        "(lower --lr, check --alpha, or look for a sample with an extreme loss)"
    )


def check_finite_weights(task: Task, step: int) -> None:
    """BatctlError when any adapter weight is NaN or infinite: such an adapter is never saved."""
    for name, param in task.trainable_parameters().items():
        if not bool(torch.isfinite(param.detach()).all()):
            raise_diverged(step, f"adapter weight {name} is not finite")


def plot_loss(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Training loss against step, with a moving average, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
