"""The score store (DESIGN §3): `scores.zarr`, one row per pool sample in pool order.

Arrays (all chunked by `chunk_size` rows, the unit of resumption):

| array | dtype | meaning |
|---|---|---|
| `score` | f32[N] | s(x) = Σ_l r_l · ∇_l L(x); NaN unless status is 1 |
| `key` | str[N] | the sample's key in its part |
| `part` | i32[N] | index of the part in the pool's expanded spec list |
| `offset` | i64[N] | where the sample starts in its part (fetch it back with `Pool.read`) |
| `status` | u8[N] | 0 pending, 1 scored, 2 unreadable input, 3 non-finite loss or gradient |
| `layer_score` | f32[N, L] | optional per-layer contributions (`--layer-scores`) |
| `done` | bool[C] | one flag per chunk, each in its own zarr chunk so shards never race on it |
| `done_at` | f64[C] | when each chunk was finished (Unix seconds; NaN pending): rate and ETA; removed when the store is published |

A chunk's rows are written first and its `done` flag last, so a killed run never leaves a flag
that claims rows it did not write. Chunks are owned by exactly one shard (see `chunk_owner`), so
two processes never write the same zarr chunk; that also holds on object stores, where there are
no locks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STORE = "scores.zarr"
TARGET = "target.safetensors"
"""The influence target r beside the store (influence-reading methods write it)."""
PENDING, SCORED, UNREADABLE, NON_FINITE = 0, 1, 2, 3
STATUS_NAMES = {
    PENDING: "pending",
    SCORED: "scored",
    UNREADABLE: "unreadable",
    NON_FINITE: "non-finite",
}


@dataclass(frozen=True)
class Layout:
    """Where every row is: built by one fast pass over the pool (no decoding)."""

    keys: list[str]
    parts: np.ndarray  # i32[N]
    offsets: np.ndarray  # i64[N]


def chunk_owner(n_chunks: int, shard_count: int) -> np.ndarray:
    """Shard of each chunk: contiguous chunk ranges, chunk c going to shard c·N // C.

    Rows, not pool files, are what is shared out: a one-file pool (the Alpaca case) gives every
    shard work, and any two shards' chunk counts differ by at most one whatever the number or
    sizes of the pool's parts.
    """
    return (np.arange(n_chunks, dtype=np.int64) * shard_count) // max(1, n_chunks)


def store_path(root: str | Path) -> str:
    """Where scores.zarr lives in score directory `root` (a local path or a URL)."""
    from batctl.remote import join

    return join(root, STORE)


class ScoreStore:
    """A `scores.zarr` group opened for reading or writing."""

    def __init__(self, group: Any) -> None:
        self.group = group
        # Read once: zarr re-reads metadata on every attribute access, per row that adds up.
        self.n_rows = int(group["score"].shape[0])
        self.chunk_size = int(group.attrs["chunk_size"])
        self.n_chunks = int(group["done"].shape[0])
        self.layer_names = list(group.attrs.get("layer_names", []))

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        root: str | Path,
        layout_rows: Iterable[tuple[str, int, int]],
        n_rows: int,
        chunk_size: int,
        layer_names: list[str] | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> ScoreStore:
        """A new store of `n_rows` pending rows; `layout_rows` streams (key, part, offset) in pool order.

        Memory stays at one chunk whatever the pool size.
        """
        import zarr

        group = zarr.open_group(store_path(root), mode="w")
        chunks = (chunk_size,)
        shape = (n_rows,)
        group.create_array("score", shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan)
        group.create_array("key", shape=shape, chunks=chunks, dtype=str, fill_value="")
        group.create_array("part", shape=shape, chunks=chunks, dtype="int32", fill_value=-1)
        group.create_array("offset", shape=shape, chunks=chunks, dtype="int64", fill_value=-1)
        group.create_array("status", shape=shape, chunks=chunks, dtype="uint8", fill_value=PENDING)
        n_chunks = -(-n_rows // chunk_size)
        group.create_array("done", shape=(n_chunks,), chunks=(1,), dtype=bool, fill_value=False)
        group.create_array(
            "done_at", shape=(n_chunks,), chunks=(1,), dtype="float64", fill_value=np.nan
        )
        if layer_names:
            group.create_array(
                "layer_score",
                shape=(n_rows, len(layer_names)),
                chunks=(chunk_size, len(layer_names)),
                dtype="float32",
                fill_value=np.nan,
            )
        group.attrs.update(
            {"chunk_size": chunk_size, "layer_names": layer_names or [], **(attrs or {})}
        )
        store = cls(group)
        start = 0
        keys: list[str] = []
        parts: list[int] = []
        offsets: list[int] = []
        for key, part, offset in layout_rows:
            keys.append(key)
            parts.append(part)
            offsets.append(offset)
            if len(keys) == chunk_size:
                store._write_layout(start, keys, parts, offsets)
                start += len(keys)
                keys, parts, offsets = [], [], []
        if keys:
            store._write_layout(start, keys, parts, offsets)
            start += len(keys)
        if start != n_rows:
            raise RuntimeError(
                f"pool changed while laying out the store: {start} rows, expected {n_rows}"
            )
        return store

    def _write_layout(
        self, start: int, keys: list[str], parts: list[int], offsets: list[int]
    ) -> None:
        stop = start + len(keys)
        self.group["key"][start:stop] = np.array(keys, dtype=object).astype(str)
        self.group["part"][start:stop] = np.asarray(parts, dtype=np.int32)
        self.group["offset"][start:stop] = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def open(cls, root: str | Path, mode: str = "r") -> ScoreStore:
        """Open the store inside score directory (or partial work directory) `root`, a local
        path or a URL (s3://...)."""
        import zarr

        return cls(zarr.open_group(store_path(root), mode=mode))

    @staticmethod
    def drop_clock(root: str | Path) -> None:
        """Remove `done_at` from a finished local store: it only serves progress and ETA while
        the store is written, and as wall-clock times it would make two identical runs differ
        in bytes."""
        import shutil

        shutil.rmtree(Path(root) / STORE / "done_at", ignore_errors=True)

    @staticmethod
    def exists(root: str | Path) -> bool:
        """True when `root` (a path or URL) holds a store (complete or not)."""
        from batctl import remote

        if remote.is_url(str(root)):
            return remote.exists(remote.join(store_path(root), "zarr.json"))
        return (Path(root) / STORE / "zarr.json").is_file()

    # ------------------------------------------------------------------ geometry

    def chunk_rows(self, chunk: int) -> range:
        """The rows of chunk `chunk`."""
        return range(chunk * self.chunk_size, min(self.n_rows, (chunk + 1) * self.chunk_size))

    def first_row_parts(self) -> np.ndarray:
        """The part of each chunk's first row."""
        return self.group["part"][:: self.chunk_size] if self.n_rows else np.zeros(0, np.int32)

    # ------------------------------------------------------------------ writing

    def write_chunk(
        self,
        chunk: int,
        scores: np.ndarray,
        status: np.ndarray,
        layer_scores: np.ndarray | None = None,
    ) -> None:
        """Write one chunk's rows, then (last) its done flag."""
        rows = self.chunk_rows(chunk)
        if len(scores) != len(rows) or len(status) != len(rows):
            raise ValueError(f"chunk {chunk} has {len(rows)} rows, got {len(scores)} scores")
        self.group["score"][rows.start : rows.stop] = scores.astype(np.float32)
        self.group["status"][rows.start : rows.stop] = status.astype(np.uint8)
        if layer_scores is not None and "layer_score" in self.group:
            self.group["layer_score"][rows.start : rows.stop] = layer_scores.astype(np.float32)
        if "done_at" in self.group:
            import time

            self.group["done_at"][chunk] = time.time()
        self.group["done"][chunk] = True

    # ------------------------------------------------------------------ reading

    def done(self) -> np.ndarray:
        """bool[C]: which chunks are finished."""
        return self.group["done"][:]

    def is_complete(self) -> bool:
        """True when every chunk is done."""
        return bool(self.done().all()) if self.n_chunks else True

    def column(self, name: str, rows: slice | None = None) -> np.ndarray:
        """One array (score, key, part, offset, status, layer_score), whole or a slice of rows."""
        array = self.group[name]
        return array[rows] if rows is not None else array[:]

    def progress(self) -> dict[str, Any]:
        """How far scoring has got: chunks done, rows per status."""
        done = self.done()
        status = self.column("status")
        counts = np.bincount(status, minlength=4)
        return {
            "done": int(done.sum()),
            "total": int(len(done)),
            "unit": "chunks",
            "rows": self.n_rows,
            "status": {STATUS_NAMES[i]: int(counts[i]) for i in range(4)},
        }

    def shard_progress(self, shards: int, now: float | None = None) -> list[dict[str, Any]]:
        """Per shard of `shards`: chunks done of its own, rows/s and ETA in seconds.

        The rate is measured between the shard's first and last finished chunk (so it needs two),
        over the rows of the chunks finished after the first; None when it cannot be measured.
        """
        import time

        now = time.time() if now is None else now
        done = self.done()
        stamps = self.group["done_at"][:] if "done_at" in self.group else np.full(len(done), np.nan)
        sizes = np.array([len(self.chunk_rows(c)) for c in range(self.n_chunks)])
        owners = chunk_owner(self.n_chunks, shards)
        out = []
        for shard in range(shards):
            mine = owners == shard
            finished = mine & done
            times = stamps[finished & np.isfinite(stamps)]
            rate = None
            if len(times) >= 2 and times.max() > times.min():
                order = np.argsort(stamps[finished])
                rows_after_first = sizes[finished][order][1:].sum()
                rate = float(rows_after_first / (times.max() - times.min()))
            left = int(sizes[mine & ~done].sum())
            out.append(
                {
                    "shard": f"{shard}/{shards}",
                    "done": int(finished.sum()),
                    "total": int(mine.sum()),
                    "rows_per_s": None if rate is None else round(rate, 2),
                    "eta_s": 0 if not left else (None if rate is None else round(left / rate)),
                    "last_chunk_age_s": None if not len(times) else round(now - times.max()),
                }
            )
        return out
