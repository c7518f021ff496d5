"""surrogate: train the cheap adapter θ_s on D_A whose gradients the score stage uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from batctl.config import TrainingOptions
from batctl.errors import NotBuilt


@dataclass(frozen=True)
class SurrogateConfig(TrainingOptions):
    """Train a surrogate adapter on the adaptation set."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data", "out")


def run(config: SurrogateConfig) -> dict:
    """Train the surrogate adapter; returns a summary for stdout. Not built yet (LM issue)."""
    raise NotBuilt("surrogate")
