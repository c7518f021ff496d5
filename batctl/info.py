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


def describe_data(spec: str) -> dict[str, Any] | None:
    """Data batctl reads (a pool or adaptation set: a file, a directory of data files, a brace
    pattern or glob): its parts with format and samples each (a fast scan that does not decode
    images), or None when `spec` is no data batctl reads. A pattern with a missing part raises
    the UsageError `--pool` would."""
    from batctl.data import detect_part, expand_specs, open_pool
    from batctl.errors import BatctlError

    try:
        paths = expand_specs(spec)
        parts = [detect_part(Path(p), i) for i, p in enumerate(paths)]
    except BatctlError:
        if not _is_pattern(spec):
            return None  # a file or folder batctl does not read
        raise
    rows = open_pool([str(p) for p in paths], decode=False).row_counts()
    formats = sorted({part.kind for part in parts})
    found: dict[str, Any] = {
        "kind": "data",
        "format": ", ".join(formats),
        "parts": len(parts),
        "samples": sum(rows),
        "part_samples": {str(part.path): count for part, count in zip(parts, rows, strict=True)},
    }
    compressions = sorted({part.compression for part in parts if part.compression})
    if compressions:
        found["compression"] = ", ".join(compressions)
    return found


def _is_pattern(spec: str) -> bool:
    import glob

    from batctl.data.specs import expand_braces

    return glob.has_magic(spec) or len(expand_braces(spec)) > 1


def describe_path(path: Path) -> dict[str, Any]:
    """Everything `batctl info` knows about `path`; `state` is complete/partial/running/input.

    Raises BatctlError (one line) for a path that is none of these: absent (a brace pattern or
    glob is described as the data it matches, or its missing part named), or something batctl
    neither wrote nor reads.
    """
    from batctl.errors import BatctlError

    description = artifacts.describe(path)
    if description["state"] in ("partial", "running"):
        from batctl.scorestore import ScoreStore

        if ScoreStore.exists(description["work"]):
            store = ScoreStore.open(description["work"])
            description["progress"] = store.progress()
            description["shard_progress"] = store.shard_progress(int(description.get("shards", 1)))
        return description
    if description["state"] == "absent":
        if not _is_pattern(str(path)):
            raise BatctlError(f"{path}: nothing there")
        description.update(describe_data(str(path)) or {}, state="input")
        return description
    found = describe_model_dir(Path(path)) if Path(path).is_dir() else None
    if found is None and description["state"] == "foreign":
        found = describe_data(str(path))
    if found is not None:
        description.update(found)
        if description["state"] == "foreign":
            description["state"] = "input"  # a model or data batctl reads, not one of its outputs
    if description["state"] == "foreign":
        raise BatctlError(
            f"{path}: not a batctl output, a model or adapter directory, nor data batctl reads "
            "(.tar, .json, .jsonl, .txt, an image folder or a datasets directory)"
        )
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
        "parts",
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
    print_table("data" if description.get("kind") == "data" else "artifact", head)
    if description.get("kind") == "data" and description.get("parts", 0) > 1:
        print_table("parts", [(p, f"{n} samples") for p, n in description["part_samples"].items()])
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
