"""Weight difference to a reference adapter θ*, as the BAT paper measures it.

For adapter parameters θ and reference θ* (the trainable parameters, matched by name, each
flattened and concatenated): `weight_diff` = ||θ − θ*||₂ and `weight_diff_rel` =
||θ − θ*||₂ / ||θ*||₂. Computed in float64. Also: where an adapter's checkpoints are and at
which optimizer step each was saved, for the curve against steps.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from batctl.errors import BatctlError

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class WeightDiff:
    """||θ − θ*||₂, its ratio to ||θ*||₂ (None when θ* is all zeros), and ||θ*||₂."""

    absolute: float
    relative: float | None
    reference_norm: float


def weight_difference(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str = "adapter"
) -> WeightDiff:
    """Distance between two adapter states with the same parameter names and shapes.

    A different set of names or a shape mismatch (another rank, other target modules, LoRA vs
    DoRA) is a BatctlError naming `what` and the first differences.
    """
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        shown = [f"missing {n}" for n in missing[:2]] + [f"extra {n}" for n in extra[:2]]
        raise BatctlError(
            f"{what} and --reference have different adapter parameters ({len(missing)} missing, "
            f"{len(extra)} extra: {'; '.join(shown)}); weight differences need the same adapter "
            "kind and --targets"
        )
    if not reference:
        raise BatctlError(f"{what}: no adapter parameters to compare with --reference")
    for name in reference:
        if tuple(state[name].shape) != tuple(reference[name].shape):
            raise BatctlError(
                f"{what} and --reference differ in shape at {name}: {tuple(state[name].shape)} vs "
                f"{tuple(reference[name].shape)}; weight differences need the same adapter kind and --rank"
            )
    names = sorted(reference)
    theta = torch.cat([state[n].detach().reshape(-1).to(torch.float64) for n in names])
    star = torch.cat([reference[n].detach().reshape(-1).to(torch.float64) for n in names])
    absolute = float(torch.linalg.norm(theta - star))
    norm = float(torch.linalg.norm(star))
    return WeightDiff(absolute, absolute / norm if norm > 0 else None, norm)


def adapter_checkpoints(adapter_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `checkpoints/step-N/` holding an adapter, by step."""
    root = Path(adapter_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / "adapter_config.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def final_step(adapter_dir: Path) -> int | None:
    """The optimizer step of an adapter output's final adapter (from its manifest or log.jsonl)."""
    adapter_dir = Path(adapter_dir)
    try:
        manifest = json.loads((adapter_dir / "manifest.json").read_text(encoding="utf-8"))
        steps = manifest.get("summary", {}).get("steps")
        if isinstance(steps, int):
            return steps
    except (OSError, ValueError, AttributeError):
        pass
    try:
        lines = (adapter_dir / "log.jsonl").read_text(encoding="utf-8").strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such values are written as null."""
    if value is None or not math.isfinite(value):
        return None
    return value
