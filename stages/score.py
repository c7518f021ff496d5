"""score: stream the backbone pool once and give every sample its influence score (DESIGN §5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from batctl.config import DataOptions, parse_shard
from batctl.errors import NotBuilt


@dataclass(frozen=True)
class ScoreConfig(DataOptions):
    """Score every pool sample against the adaptation set, resumably."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "surrogate", "data", "pool", "out")

    surrogate: Path | None = None
    """Surrogate adapter directory (the output of `batctl surrogate`)."""

    pool: tuple[str, ...] = ()
    """Backbone pool parts (repeatable): tars, JSON/JSONL, text; braces like laion-{000..099}.tar are expanded by batctl."""

    target: str | None = None
    """Validation set whose mean gradient is the target; default: the adaptation set itself."""

    preconditioner: Literal["auto", "woodbury", "datainf", "identity"] = "auto"
    """How H⁻¹ is applied to the target: exact Woodbury, DataInf's approximation, or none (gradient alignment)."""

    damping: float = 0.1
    """c in λ_l = c · mean ||g_i||² / D_l."""

    engine: Literal["hooks", "fd"] = "hooks"
    """hooks: one batched backward with per-layer contractions; fd: central finite difference along r."""

    batch_size: int = 32
    """Pool samples per batch."""

    chunk_size: int = 4096
    """Rows per zarr chunk: the unit of resumption."""

    shard: str | None = None
    """Score only shard i of N (by part), e.g. 3/8; default from torchrun's RANK/WORLD_SIZE, else all."""

    layer_scores: bool = False
    """Also store each layer's contribution (layer_score f32[N, L])."""

    loss_draws: int = 4
    """Diffusion: (timestep, noise) draws per sample, seeded from the sample key."""

    def problems(self) -> list[str]:
        out = super().problems()
        if self.damping <= 0:
            out.append(f"--damping must be > 0, got {self.damping}")
        for name in ("batch_size", "chunk_size", "loss_draws"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        try:
            parse_shard(self.shard)
        except ValueError as exc:
            out.append(f"--shard: {exc}")
        return out


def run(config: ScoreConfig) -> dict:
    """Score the pool into a resumable store; returns a summary. Not built yet (score issue)."""
    raise NotBuilt("score")
