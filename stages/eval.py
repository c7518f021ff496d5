"""eval: measure adapters on held-out data against each other, the backbone and a reference."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from batctl.config import DataOptions, flag_name

if TYPE_CHECKING:
    from batctl.data import Sample
    from batctl.metrics.options import EvalOptions
    from batctl.tasks.base import Task

log = logging.getLogger("batctl.eval")

BACKBONE = "backbone"
ADAPTER_STAGES = ("surrogate", "train")


@dataclass(frozen=True)
class EvalConfig(DataOptions):
    """Evaluate one or more adapters; the bare backbone is always a row."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "adapter", "data", "out")
    UNSHARED: ClassVar[tuple[str, ...]] = ("out", "force", "data", "adapter", "batch_size")

    data: str | None = None
    """Held-out data (not D_A): a JSON/JSONL/text file, a webdataset tar or an image folder."""

    adapter: tuple[Path, ...] = ()
    """Adapter directories to evaluate."""

    reference: Path | None = None
    """Reference adapter θ*: weight differences ||θ − θ*|| are measured against it."""

    benchmark: Path | None = None
    """LM: multiple-choice JSONL (context, choices, label), scored as lm-evaluation-harness does."""

    prompts: Path | None = None
    """Diffusion: a text file of prompts, one per line, rendered at fixed seeds."""

    dino: Path | None = None
    """Diffusion: local DINOv2 directory for DINO similarity."""

    clip: Path | None = None
    """Diffusion: local CLIP directory for CLIP-I and CLIP-T."""

    batch_size: int = 8
    """Held-out samples (LM: benchmark continuations) per forward pass."""

    def problems(self) -> list[str]:
        out = super().problems()
        if self.batch_size < 1:
            out.append(f"{flag_name('batch_size')} must be >= 1, got {self.batch_size}")
        return out


# --------------------------------------------------------------------------- inputs


def check_family_flags(config: EvalConfig) -> None:
    """Refuse eval flags the --model's family does not read: they would be ignored in silence."""
    from batctl.errors import UsageError
    from batctl.tasks import TRAITS, family_traits

    family = config.family()
    own = family_traits(family).eval_flags
    every = {name for traits in TRAITS.values() for name in traits.eval_flags}
    foreign = sorted(n for n in every - set(own) if getattr(config, n) is not None)
    if foreign:
        raise UsageError(
            f"{', '.join(flag_name(n) for n in foreign)}: not read for an {family} model "
            f"(--model {config.model}); drop them (they are for "
            f"{' and '.join(f for f in TRAITS if f != family)} models)"
        )


def check_adapter(
    path: Path, model: dict[str, Any], flag: str, allow_foreign: bool = False
) -> Path:
    """`path` must be a finished surrogate or train output built on `model`.

    With `allow_foreign` (the reference), a plain peft adapter directory written by another tool
    is accepted too: it has no manifest to check the model against.
    """
    from batctl.artifacts import check_same_model, describe, read_manifest
    from batctl.errors import BatctlError
    from batctl.safeload import check_adapter_dir

    path = Path(path)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None:
        if allow_foreign and (path / "adapter_config.json").is_file():
            check_adapter_dir(path, flag)
            return path
        state = describe(path)["state"]
        hint = {
            "partial": "it was interrupted; rerun the stage that writes it",
            "running": "it is still being written; wait for it to finish",
            "absent": "nothing there",
        }.get(state, "no manifest.json")
        raise BatctlError(
            f"{flag} {path}: not a finished batctl surrogate or train output ({hint})"
        )
    if manifest.get("stage") not in ADAPTER_STAGES:
        raise BatctlError(
            f"{flag} {path}: a {manifest.get('stage')} output; expected an adapter "
            "(the output of batctl surrogate or batctl train)"
        )
    check_same_model(path, model, flag)
    check_adapter_dir(path, flag)  # now, not after minutes on the rows before it
    return path


def row_labels(paths: Sequence[Path]) -> list[str]:
    """Row names for adapter dirs: the dir name, with parents added where names clash.

    Never "backbone" (that row is the bare model); the same path given twice gets "-2", "-3".
    """
    resolved = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(resolved)
    while True:
        labels = ["/".join(parts[-d:]) for parts, d in zip(resolved, depth, strict=True)]
        clashing = [
            i
            for i, label in enumerate(labels)
            if depth[i] < len(resolved[i])
            and (
                label == BACKBONE
                or any(
                    labels[j] == label and resolved[j] != resolved[i] for j in range(len(labels))
                )
            )
        ]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    out: list[str] = []
    for label in labels:
        candidate, n = label, 1
        while candidate in out or candidate == BACKBONE:
            n += 1
            candidate = f"{label}-{n}"
        out.append(candidate)
    return out


# --------------------------------------------------------------------------- rows


def load_adapter(task: Task, path: Path) -> None:
    """Put the adapter at `path` on the bare backbone, in eval mode.

    Loaded trainable so that `task.adapter_state()` sees its parameters; nothing is trained.
    """
    task.load_adapter(path, trainable=True)
    task.model.eval()


def unload_adapter(task: Task, path: Path) -> None:
    """Take the adapter off again, leaving the bare backbone for the next row."""
    from batctl.errors import BatctlError

    task.remove_adapter()
    if task.trainable_parameters():
        raise BatctlError(f"{path}: the adapter could not be taken off the backbone again")


def heldout_loss(task: Task, heldout: Sequence[Sample], batch_size: int) -> float:
    """Mean over samples of the per-sample loss (no gradients)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for start in range(0, len(heldout), batch_size):
            losses = task.per_sample_loss(
                task.collate(heldout[start : start + batch_size], "adaptation")
            )
            total += float(losses.double().sum())
    return total / len(heldout)


def evaluate_row(
    task: Task, heldout: Sequence[Sample], options: EvalOptions, out_dir: Path, label: str
) -> dict[str, Any]:
    """Every metric of the model as loaded now: held-out loss, then the family's own."""
    task.model.eval()
    row: dict[str, Any] = {"heldout_loss": heldout_loss(task, heldout, options.batch_size)}
    row.update(task.family_metrics(heldout, options, out_dir, label))
    return row


def weight_diff_curve(
    task: Task, path: Path, final_state: dict[str, Any], reference: dict[str, Any]
) -> list[dict[str, Any]]:
    """||θ − θ*|| at every checkpoints/step-N of the adapter at `path`, and at its final step."""
    from batctl.metrics.weights import adapter_checkpoints, final_step, weight_difference

    last = final_step(path)
    points = []
    for step, checkpoint in adapter_checkpoints(path):
        if step == last:
            continue  # the final adapter is that step's weights; measured below without a reload
        load_adapter(task, checkpoint)
        state = task.adapter_state()
        unload_adapter(task, checkpoint)
        diff = weight_difference(state, reference, f"--adapter {checkpoint}")
        points.append(
            {
                "step": step,
                "weight_diff": diff.absolute,
                "weight_diff_rel": diff.relative,
                "adapter": f"checkpoints/{checkpoint.name}",
            }
        )
    if last is not None:
        diff = weight_difference(final_state, reference, f"--adapter {path}")
        points.append(
            {
                "step": last,
                "weight_diff": diff.absolute,
                "weight_diff_rel": diff.relative,
                "adapter": "final",
            }
        )
    return sorted(points, key=lambda p: p["step"])


# --------------------------------------------------------------------------- run


def run(config: EvalConfig) -> dict[str, Any]:
    """Write metrics.json, report.md and plots into `--out`; returns the metrics per row."""
    from batctl.artifacts import describe_input, describe_model, open_output
    from batctl.metrics.benchmark import read_benchmark
    from batctl.metrics.options import EvalOptions
    from batctl.metrics.report import (
        METRICS_JSON,
        jsonable,
        plot_heldout,
        plot_weight_diff,
        render_report,
        write_json,
    )
    from batctl.samples import describe_data

    # setup: every input checked before the model is loaded
    check_family_flags(config)
    strict = config.strict_fingerprints
    model = describe_model(config.model, strict)
    inputs: dict[str, Any] = {"model": model, "data": describe_data(config.data, strict)}
    adapters = [check_adapter(p, model, "--adapter") for p in config.adapter]
    inputs["adapter"] = [describe_input(p) for p in adapters]
    if config.reference is not None:
        check_adapter(config.reference, model, "--reference", allow_foreign=True)
        inputs["reference"] = describe_input(config.reference, strict)
    questions = ()
    if config.benchmark is not None:
        questions = read_benchmark(config.benchmark)
        inputs["benchmark"] = describe_input(config.benchmark, strict)
    for name in ("prompts", "dino", "clip"):
        if getattr(config, name) is not None:
            inputs[name] = describe_input(getattr(config, name), strict)
    options = EvalOptions(
        batch_size=config.batch_size,
        benchmark=questions,
        benchmark_path=config.benchmark,
        prompts=config.prompts,
        dino=config.dino,
        clip=config.clip,
    )
    labels = row_labels(adapters)

    with open_output(
        config.out, stage="eval", params=config.params(), inputs=inputs, force=config.force
    ) as out:
        # torch and transformers only now: an up-to-date output is decided without them
        from batctl.metrics.weights import weight_difference
        from batctl.tasks import load_task

        # load
        heldout = config.read_samples(config.data, "--data")
        task = load_task(config.task_settings(), config.task)
        reference = None
        reference_loss = None
        if config.reference is not None:
            load_adapter(task, config.reference)
            reference = task.adapter_state()
            task.model.eval()
            # the oracle's own held-out loss: the plot's lower reference line
            reference_loss = heldout_loss(task, heldout, options.batch_size)
            unload_adapter(task, config.reference)
        # loop: the bare backbone, then each adapter on it in turn
        from batctl.console import progress_bar

        rows: dict[str, dict[str, Any]] = {}
        with progress_bar("eval", len(adapters) + 1, unit="models") as advance:
            log.info("%s: %d held-out samples", BACKBONE, len(heldout))
            rows[BACKBONE] = {
                "adapter": None,
                **evaluate_row(task, heldout, options, out.work, BACKBONE),
            }
            if reference is not None:
                rows[BACKBONE].update(weight_diff=None, weight_diff_rel=None)
            advance(1, done=BACKBONE)
            for label, path in zip(labels, adapters, strict=True):
                log.info("%s: evaluating %s", label, path)
                load_adapter(task, path)
                row = {
                    "adapter": str(path.resolve()),
                    **evaluate_row(task, heldout, options, out.work, label),
                }
                state = task.adapter_state()
                unload_adapter(task, path)
                if reference is not None:
                    diff = weight_difference(state, reference, f"--adapter {path}")
                    row.update(weight_diff=diff.absolute, weight_diff_rel=diff.relative)
                    row["weight_diff_curve"] = weight_diff_curve(task, path, state, reference)
                rows[label] = row
                advance(1, done=label)
        # save
        notes = []
        if reference is None:
            notes.append("weight difference: no --reference given")
        notes += [note for note in task.metric_notes if note not in notes]
        counters = task.counters()
        notes += [f"{name.replace('_', ' ')}: {value}" for name, value in counters.items() if value]
        context = {
            "model": config.model,
            "held-out data": f"{config.data} ({len(heldout)} samples)",
            "benchmark": f"{config.benchmark} ({len(questions)} questions)" if questions else None,
            "reference": str(config.reference) if config.reference is not None else None,
        }
        write_json(
            out.work / METRICS_JSON,
            {
                "rows": rows,
                "heldout_samples": len(heldout),
                "benchmark_questions": len(questions),
                "reference": str(Path(config.reference).resolve())
                if config.reference is not None
                else None,
                "reference_heldout_loss": reference_loss,
                "family": task.family,
                "counters": counters,
                "notes": notes,
            },
        )
        (out.work / "report.md").write_text(render_report(rows, context, notes), encoding="utf-8")
        plot_heldout(rows, out.work / "heldout_loss.png", reference=reference_loss)
        if reference is not None:
            plot_weight_diff(rows, out.work / "weight_diff.png")
        summary = {
            label: {k: v for k, v in row.items() if k not in ("adapter", "weight_diff_curve")}
            for label, row in rows.items()
        }
        out.extra["summary"] = jsonable(summary)
    return {"out": str(config.out), "rows": summary}
