"""eval: measure adapters on held-out data against each other, the backbone and a reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from batctl.config import DataOptions
from batctl.errors import NotBuilt


@dataclass(frozen=True)
class EvalConfig(DataOptions):
    """Evaluate one or more adapters; the bare backbone is always a row."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "adapter", "data", "out")

    adapter: tuple[Path, ...] = ()
    """Adapter directories to evaluate (repeatable)."""

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


def run(config: EvalConfig) -> dict:
    """Write metrics.json, report.md and plots. Not built yet (LM and diffusion issues)."""
    raise NotBuilt("eval")
