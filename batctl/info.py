"""`batctl info PATH`: what a path holds, as a dict (for --json) and as tables (for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batctl import artifacts
from batctl.console import print_table


def describe_model_dir(path: Path) -> dict[str, Any] | None:
    """A backbone directory: its family and architecture, or None when `path` is not one."""
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        return {"kind": "model", "family": "diffusion", "architecture": index.get("_class_name")}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        archs = config.get("architectures") or []
        if any(a.endswith("ForCausalLM") for a in archs):
            return {"kind": "model", "family": "lm", "architecture": archs[0]}
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        return {
            "kind": "adapter",
            "peft_type": config.get("peft_type"),
            "rank": config.get("r"),
            "base_model": config.get("base_model_name_or_path"),
        }
    return None


def describe_data(path: Path) -> dict[str, Any] | None:
    """A pool or adaptation-set part: its format and how many samples it holds (a fast scan that
    does not decode images), or None when `path` is no data batctl reads."""
    from batctl.data import detect_part, open_pool
    from batctl.errors import BatctlError

    try:
        part = detect_part(Path(path), 0)
    except BatctlError:
        return None
    (rows,) = open_pool([str(path)], decode=False).row_counts()
    found = {"kind": "data", "format": part.kind, "samples": rows}
    if part.compression:
        found["compression"] = part.compression
    return found


def describe_path(path: Path) -> dict[str, Any]:
    """Everything `batctl info` knows about `path`; `state` is complete/partial/running/foreign/absent."""
    description = artifacts.describe(path)
    if description["state"] in ("partial", "running"):
        from batctl.scorestore import ScoreStore

        if ScoreStore.exists(description["work"]):
            store = ScoreStore.open(description["work"])
            description["progress"] = store.progress()
            description["shard_progress"] = store.shard_progress(int(description.get("shards", 1)))
        return description
    if description["state"] not in ("complete", "foreign"):
        return description
    found = describe_model_dir(Path(path)) if Path(path).is_dir() else None
    if found is None and description["state"] == "foreign":
        found = describe_data(Path(path))
    if found is not None:
        description.update(found)
        if description["state"] == "foreign":
            description["state"] = "input"  # a model or data batctl reads, not one of its outputs
    return description


def shard_line(row: dict[str, Any]) -> tuple[str, str]:
    """One shard's progress for people: chunks, rate, ETA and how long it has been quiet."""
    text = f"{row['done']}/{row['total']} chunks"
    if row["rows_per_s"] is not None:
        text += f", {row['rows_per_s']:.1f} rows/s"
    if row["eta_s"] is not None:
        text += (
            ", done"
            if row["eta_s"] == 0
            else f", ETA {row['eta_s'] // 60}m{row['eta_s'] % 60:02d}s"
        )
    if row["last_chunk_age_s"] is not None and row["eta_s"] != 0:
        text += f", last chunk {row['last_chunk_age_s']}s ago"
    return row["shard"], text


def render(description: dict[str, Any]) -> None:
    """Print a description as readable tables on stdout."""
    head = [("path", description["path"]), ("state", description["state"])]
    if "stage" in description:
        head.append(("stage", description["stage"]))
    for key in (
        "kind",
        "family",
        "architecture",
        "peft_type",
        "rank",
        "base_model",
        "format",
        "compression",
        "samples",
    ):
        if key in description:
            head.append((key, description[key]))
    for key in ("version", "started", "finished", "host"):
        if key in description:
            head.append((key, description[key]))
    progress = description.get("progress")
    if progress:
        share = progress["done"] / progress["total"] if progress.get("total") else 0.0
        head.append(
            ("progress", f"{progress['done']}/{progress['total']} {progress['unit']} ({share:.0%})")
        )
    print_table("artifact", head)
    if description.get("shard_progress"):
        print_table("shards", [shard_line(row) for row in description["shard_progress"]])
    if description.get("params"):
        print_table("params", sorted(description["params"].items()))
    if description.get("inputs"):
        rows = []
        for name, value in sorted(description["inputs"].items()):
            items = value if isinstance(value, list) else [value]
            for item in items:
                rows.append(
                    (
                        name,
                        f"{item.get('path')} [{item.get('kind')}] {item.get('fingerprint', '')[:12]}",
                    )
                )
        print_table("inputs", rows)
    if description.get("outputs"):
        print_table(
            "outputs", [(k, f"{v} bytes") for k, v in sorted(description["outputs"].items())]
        )
