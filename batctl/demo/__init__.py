"""The demo's embedded default worlds (real data every machine has, a backbone pretrained on it
by batctl) and its report. ``stages/demo.py`` runs the pipeline on them."""

from __future__ import annotations

from pathlib import Path

from batctl.demo.world import World, cache_dir
from batctl.errors import UsageError

__all__ = ["World", "build_world", "cache_dir"]


def build_world(family: str, seed: int = 0, cache: Path | None = None) -> tuple[World, bool]:
    """The demo world of ``family`` ("lm" or "diffusion"), cached; returns (world, built now)."""
    if family == "lm":
        from batctl.demo.lm import lm_world

        return lm_world(seed, cache)
    if family == "diffusion":
        try:
            from batctl.demo.digits import digits_world
        except ModuleNotFoundError as exc:
            if exc.name != "batctl.demo.digits":
                raise
            raise UsageError(
                "batctl demo --task diffusion: the diffusion demo world is not built yet "
                "(see CHANGELOG); --task lm runs"
            ) from None
        return digits_world(seed, cache)
    raise ValueError(f"unknown demo family {family!r}")
