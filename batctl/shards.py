"""Score shards: what makes several processes (nodes, GPUs) write one store as one run.

- Every shard owns a contiguous range of chunks (`scorestore.chunk_owner`), so the number of
  shards decides who writes which zarr chunk. Two processes started with different counts
  (`--shard 0/2` and `--shard 1/4`) would write the same chunks at once, so the count is part of
  the unfinished store's identity (its `partial.json`) and a mismatch is refused.
- Every input (pool parts, the model, --data, --target, --clip) is identified by a content
  fingerprint (size and the first and last MiB of each file, or the whole file with
  --strict-fingerprints), never its mtime: each node's own download or copy of a LAION shard or
  of the model is the same input.
- A refusal never suggests `--force` when the unfinished store holds finished chunks: that would
  discard other shards' work. It says how to resume instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batctl.errors import BatctlError


def describe_pool(specs: str | Sequence[str], strict: bool = False) -> list[dict[str, Any]]:
    """Manifest entries for the pool's parts, in pool order: the normalised path (or the URL of a
    remote part), kind and a content fingerprint (no mtime)."""
    from batctl.artifacts import describe_input, fingerprint_file
    from batctl.data.specs import expand_specs
    from batctl.remote import is_url, localize

    described = []
    for named, local in localize(specs):
        paths = [Path(local)] if is_url(named) else expand_specs(named)
        for path in paths:
            if not path.is_file():
                described.append(describe_input(path, strict, content_only=True))  # a folder
                continue
            described.append(
                {
                    "path": named if is_url(named) else str(path.resolve()),
                    "kind": "file",
                    "fingerprint": fingerprint_file(path, strict, content_only=True),
                }
            )
    return described


def normalise_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A score run's params with --pool and --out spelt as absolute paths, so `pool.jsonl` run
    from its folder and `/data/pool.jsonl` are the same run (URLs are kept as written)."""
    import os

    def absolute(spec: Any) -> Any:
        if not isinstance(spec, str) or "://" in spec:
            return spec
        return os.path.normpath(os.path.abspath(spec))

    out = dict(params)
    if isinstance(out.get("pool"), list):
        out["pool"] = [absolute(spec) for spec in out["pool"]]
    if out.get("out") is not None:
        out["out"] = absolute(out["out"])
    return out


def read_partial(out: Path) -> dict[str, Any] | None:
    """partial.json of the unfinished store beside `out`, or None."""
    from batctl.artifacts import PARTIAL, partial_dir

    try:
        return json.loads((partial_dir(out) / PARTIAL).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finished_chunks(work: Path) -> int:
    """How many chunks of the unfinished store in `work` are done (0 when it has no store yet)."""
    from batctl.scorestore import ScoreStore

    if not ScoreStore.exists(work):
        return 0
    try:
        return int(ScoreStore.open(work).done().sum())
    except (KeyError, ValueError, FileNotFoundError):
        return 0


def open_score_partial(out: Path, identity: Mapping[str, Any], force: bool, shards: int) -> Path:
    """The unfinished store's work dir for this run of `shards` shards (created when absent).

    Refuses (BatctlError, one line) an unfinished store of another run or another shard count;
    with finished chunks in it, the message says how to resume, not `--force`.
    """
    from batctl.artifacts import diff_runs, open_partial, partial_dir

    work = partial_dir(out)
    recorded = read_partial(out)
    if recorded is not None:
        differences = diff_runs(recorded, identity)
        done = finished_chunks(work)
        if differences and not force and done:
            shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
            raise BatctlError(
                f"{out}: its unfinished store ({work}) was started with other flags or inputs "
                f"({shown}) and holds {done} finished chunks; rerun with what it was started with "
                "to resume it, or choose another --out"
            )
        counted = recorded.get("shards", shards)
        if not differences and counted != shards:
            if not force or done:
                raise BatctlError(
                    f"{out}: its unfinished store is being scored as {counted} shard(s), not "
                    f"{shards}; start every shard with --shard i/{counted} (or {counted} torchrun "
                    "ranks) to resume it, or choose another --out"
                )
            shutil.rmtree(work)  # --force on a store with nothing finished: start over
    work, _ = open_partial(out, {**identity, "shards": shards}, force)
    return work
