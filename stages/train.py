"""train: the final adapter on D_A plus the selected backbone samples (or D_A alone: the baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from batctl.config import TrainingOptions
from batctl.errors import NotBuilt


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


def run(config: TrainConfig) -> dict:
    """Train the final adapter; returns a summary for stdout. Not built yet (LM issue)."""
    raise NotBuilt("train")
