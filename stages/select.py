"""select: turn one score store into training sets at any γ, count or threshold (DESIGN §3, §5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from batctl.config import OutputOptions
from batctl.errors import NotBuilt


def parse_gammas(values: tuple[str, ...]) -> tuple[list[float], bool, list[str]]:
    """Comma-separated or repeated --gamma values -> (sorted floats, auto requested, problems)."""
    gammas: list[float] = []
    auto = False
    problems: list[str] = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if item == "auto":
                auto = True
                continue
            try:
                gamma = float(item)
            except ValueError:
                problems.append(f"--gamma: {item!r} is not a number or 'auto'")
                continue
            if not 0 < gamma < 1:
                problems.append(
                    f"--gamma: {item} is outside (0, 1); γ = n/k is D_A's share of the augmented set"
                )
            else:
                gammas.append(gamma)
    return sorted(set(gammas)), auto, problems


@dataclass(frozen=True)
class SelectConfig(OutputOptions):
    """Select pool samples from a finished score store."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("scores", "out")

    scores: Path | None = None
    """Score directory (the output of `batctl score`)."""

    gamma: tuple[str, ...] = ()
    """γ = n/k, D_A's share of the augmented set: comma-separated or repeated, or auto (needs --model)."""

    count: tuple[int, ...] = ()
    """Select exactly K pool samples (repeatable)."""

    threshold: tuple[float, ...] = ()
    """Select every sample with score >= η (repeatable); the resulting γ is reported."""

    strategy: Literal["albat", "random", "none"] = "albat"
    """albat: highest scores; random: uniform at random (seeded); none: empty (plain adaptation)."""

    seed: int = 0
    """Seed for --strategy random."""

    dedupe: bool = False
    """Also drop samples whose content hash repeats (keys are always deduplicated)."""

    allow_partial: bool = False
    """Select from a store whose chunks are not all done."""

    model: str | None = None
    """Backbone, for the Proposition 2 report and --gamma auto."""

    surrogate: Path | None = None
    """Surrogate adapter, for the Proposition 2 report and --gamma auto."""

    data: str | None = None
    """Adaptation set, for the Proposition 2 report and --gamma auto."""

    def problems(self) -> list[str]:
        out = super().problems()
        _, auto, gamma_problems = parse_gammas(self.gamma)
        out += gamma_problems
        if self.strategy != "none" and not (self.gamma or self.count or self.threshold):
            out.append("give at least one --gamma, --count or --threshold")
        if any(k < 1 for k in self.count):
            out.append("--count values must be >= 1")
        if auto and not (self.model and self.surrogate and self.data):
            out.append("--gamma auto needs --model, --surrogate and --data")
        return out


def run(config: SelectConfig) -> dict:
    """Write one selection directory per γ/count/threshold. Not built yet (select issue)."""
    raise NotBuilt("select")
