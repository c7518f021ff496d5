"""`score --out s3://bucket/run`: one score store on an object store, written by any number of
shards on any number of machines, with no file locks (object stores have none).

The protocol, in the store's own prefix (there is no rename on an object store, so the store
is written in place and `manifest.json`, written last, is what makes it complete):

1. `partial.json` (identity: stage, params, inputs, shard count, started) is written by shard 0;
   every other shard waits for it and refuses to join a store of another run or shard count.
2. Shard 0 prepares the method's state (target, corpus statistics), lays out `scores.zarr`,
   uploads the state files and then `state.json`, whose presence means "laid out": the other
   shards wait for it and load the same state, and a shard 0 killed before it lays out again.
3. Every shard writes only the chunks it owns (`scorestore.chunk_owner`), each chunk's rows
   before its `done` flag; a SIGKILLed shard rerun skips its finished chunks.
4. Whoever finds every chunk done writes `manifest.json` (two shards finishing together write
   the same run's manifest; either is right) and removes `partial.json`.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from batctl.errors import BatctlError, UpToDate
from batctl.remote import exists, filesystem, join, read_json, write_json

STATE_READY = "state.json"
"""Written last by shard 0 once the store and the method's state files are uploaded."""

log = logging.getLogger("batctl.score")

WAIT_S = 6 * 3600.0  # how long other shards wait for shard 0 to lay the store out
POLL_S = 1.0


def check_published(out: str, identity: dict[str, Any], force: bool) -> None:
    """UpToDate when `out` already holds this run; refuse (or with `force` delete) another one."""
    from batctl.artifacts import diff_runs

    manifest = read_json(join(out, "manifest.json"))
    if manifest is None:
        return
    differences = diff_runs(manifest, identity)
    if not differences and not force:
        raise UpToDate(out)
    if not force:
        raise BatctlError(
            f"{out} holds a different {manifest.get('stage', '?')} output "
            f"({'; '.join(differences[:4])}); pass --force to replace it or choose another --out"
        )


def remove(out: str) -> None:
    """Delete everything under `out` (a --force restart)."""
    fs, path = filesystem(out)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def claim(out: str, identity: dict[str, Any], shard: int, shards: int, force: bool) -> str:
    """Join (or, as shard 0, start) the run in `out`; returns its `started` time."""
    from batctl.artifacts import diff_runs, utcnow
    from batctl.scorestore import ScoreStore

    deadline = time.monotonic() + WAIT_S
    while True:
        recorded = read_partial(out)
        if recorded is None and shard == 0:
            if force:
                remove(out)
            write_json(
                join(out, "partial.json"), {**identity, "shards": shards, "started": utcnow()}
            )
            continue
        if recorded is not None:
            differences = diff_runs(recorded, identity)
            counted = recorded.get("shards", shards)
            if differences or counted != shards:
                done = 0
                if ScoreStore.exists(out):
                    try:
                        done = int(ScoreStore.open(out).done().sum())
                    except (KeyError, ValueError, FileNotFoundError):
                        done = 0
                if force and shard == 0 and not done:
                    remove(out)
                    continue
                what = "; ".join(differences[:4]) or f"{counted} shard(s), not {shards}"
                raise BatctlError(
                    f"{out}: its unfinished store was started by another run ({what}) and holds "
                    f"{done} finished chunks; rerun with the flags, inputs and shard count it was "
                    "started with to resume it, or choose another --out"
                )
            return str(recorded["started"])
        if time.monotonic() > deadline:
            raise BatctlError(f"{out}: shard 0 has not started the store; start shard 0 too")
        time.sleep(POLL_S)


def read_partial(out: str) -> dict[str, Any] | None:
    """The unfinished remote store's partial.json (its run identity, shard count and start
    time), or None when shard 0 has not written it yet."""
    return read_json(join(out, "partial.json"))


def wait_for_layout(out: str) -> None:
    """Block until shard 0 has laid out the store (its method state is uploaded, marker last)."""
    deadline = time.monotonic() + WAIT_S
    while not exists(join(out, STATE_READY)):
        if time.monotonic() > deadline:
            raise BatctlError(f"{out}: shard 0 has not laid out the store; is shard 0 running?")
        time.sleep(POLL_S)


def lay_out(out: str, pool: Any, n_rows: int, config: Any, method: Any, scratch: Path) -> Any:
    """Shard 0: the method's state (target, corpus statistics) prepared locally, the store's
    rows, then the state uploaded and, last, the marker the other shards wait for."""
    from batctl.scorestore import ScoreStore

    scorer = method.prepare(scratch, pool, config)
    rows = ((row.key, row.part, row.offset) for row in pool.iter_rows())
    attrs = {
        "pool": [str(p.path) for p in pool.parts],
        "method": method.name,
        "n_adaptation": scorer.n_adaptation,
        **scorer.attrs(),
    }
    ScoreStore.create(out, rows, n_rows, config.chunk_size, scorer.layer_names, attrs)
    fs, path = filesystem(out)
    files = sorted(str(f.relative_to(scratch)) for f in scratch.rglob("*") if f.is_file())
    for name in files:
        fs.put_file(str(scratch / name), join(path, name))
    write_json(join(out, STATE_READY), {"files": files})
    log.info("laid out %s: %d rows", out, n_rows)
    return scorer


def fetch_state(out: str, scratch: Path) -> None:
    """The method state shard 0 uploaded, copied into `scratch` (where `prepare` reloads it)."""
    fs, path = filesystem(out)
    for name in read_json(join(out, STATE_READY))["files"]:
        local = scratch / name
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(join(path, name), str(local))


def publish(out: str, identity: dict[str, Any], started: str) -> bool:
    """Write the manifest when every chunk is done; True when this call published."""
    from batctl import __version__
    from batctl.artifacts import utcnow
    from batctl.scorestore import ScoreStore

    store = ScoreStore.open(out)
    if not store.is_complete():
        return False
    fs, path = filesystem(out)
    try:  # progress timestamps only serve an unfinished store (see ScoreStore.drop_clock)
        fs.rm(join(path, "scores.zarr/done_at"), recursive=True)
    except FileNotFoundError:
        pass  # another shard published at the same moment
    outputs = {
        name[len(path) + 1 :]: int(size)
        for name, size in sorted(fs.du(path, total=False).items())
        if not name.endswith(("/partial.json", "/manifest.json"))
    }
    manifest = {
        **identity,
        "version": __version__,
        "outputs": outputs,
        "started": started,
        "finished": utcnow(),
        "host": socket.gethostname(),
        "summary": store.progress(),
    }
    write_json(join(out, "manifest.json"), manifest)
    try:
        fs.rm_file(join(path, "partial.json"))
    except FileNotFoundError:
        pass  # another shard published at the same moment
    return True


def run_remote(
    config: Any, out: str, identity: dict[str, Any], shard: int, shards: int
) -> dict[str, Any]:
    """Score this shard's chunks into the store at URL `out` (see the module docstring)."""
    from batctl.methods import make_method
    from batctl.scorestore import ScoreStore
    from batctl.stages.score import count_rows, score_shard

    check_published(out, identity, config.force)
    started = claim(out, identity, shard, shards, config.force)
    pool = config.open_pool()
    method = make_method(config.method)
    with tempfile.TemporaryDirectory(prefix="batctl-state-") as scratch:
        if shard == 0 and not exists(join(out, STATE_READY)):
            scorer = lay_out(out, pool, count_rows(pool, config), config, method, Path(scratch))
        else:
            wait_for_layout(out)
            fetch_state(out, Path(scratch))
            scorer = method.prepare(Path(scratch), pool, config)
        summary = score_shard(out, pool, scorer, config, shard, shards)  # type: ignore[arg-type]
    summary["published"] = (
        publish(out, identity, started) if not exists(join(out, "manifest.json")) else False
    )
    if not summary["published"]:
        progress = ScoreStore.open(out).progress()
        log.info(
            "shard %d/%d finished; %d of %d chunks done overall (the last shard to finish "
            "publishes %s)",
            shard,
            shards,
            progress["done"],
            progress["total"],
            out,
        )
    return {"out": out, **summary}
