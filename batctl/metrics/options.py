"""What `eval` hands a Task's `family_metrics`: the eval flags, already read and checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batctl.metrics.benchmark import Question


@dataclass(frozen=True)
class EvalOptions:
    """The eval flags a model family may use for its own metrics."""

    batch_size: int = 8
    """Samples (or benchmark continuations) per forward pass."""

    benchmark: tuple[Question, ...] = ()
    """LM: the --benchmark questions, parsed and checked up front; empty when not given."""

    benchmark_path: Path | None = None
    """Where the questions came from (for messages)."""

    prompts: Path | None = None
    """Diffusion: --prompts, a text file of prompts, one per line."""

    dino: Path | None = None
    """Diffusion: --dino, a local DINOv2 directory."""

    clip: Path | None = None
    """Diffusion: --clip, a local CLIP directory."""
