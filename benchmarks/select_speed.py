"""Selection speed: 20 γ values from a 1,000,000-row score store, against reading the store.

Builds a real `scores.zarr` (default chunks of 4096 rows, ~1% unreadable or non-finite rows,
LAION-style keys) with n = 1000 adaptation samples behind it, then times, best of `--repeats`
after one warm-up run (so both sides read from the page cache):

- `read`: opening the store and reading every column whole (score, status, key, part, offset,
  done), the floor of anything that looks at every row;
- `select albat` / `select random`: what `batctl select` does before it writes files: open the
  store, read the columns it needs, eligibility, the strategy's order, key dedupe, k for each of
  the 20 γ values, and the (part, offset, key) of the chosen rows (samples.tar, plots and
  selection.json excluded: they cost the same whatever the store size);
- `select albat, 1% repeated keys`: the same with duplicate keys, so the dedupe walk cannot take
  its fast path.

    python benchmarks/select_speed.py [--rows 1000000] [--repeats 3] [--keep DIR]

Prints a table and one JSON line. Goal (issue 5): select < 2x read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from batctl.scorestore import NON_FINITE, SCORED, UNREADABLE, ScoreStore
from batctl.selection import plan_selection, read_columns, read_locations, read_n

GAMMAS = [round(0.05 * i, 2) for i in range(1, 20)] + [0.99]  # 20 values, k = 19n .. n/99
N_ADAPTATION = 1000


def build_store(root: Path, rows: int, chunk: int, duplicate_share: float = 0.0) -> None:
    """A complete store of `rows` rows with random scores, written chunk by chunk."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    per_part = 10_000
    names = np.array([f"{i:09d}" for i in range(rows)])
    if duplicate_share:
        repeat = rng.random(rows) < duplicate_share
        names[repeat] = names[rng.integers(0, rows, int(repeat.sum()))]
    layout = (
        (f"laion-{i // per_part:03d}/{names[i]}", i // per_part, (i % per_part) * 3072)
        for i in range(rows)
    )
    store = ScoreStore.create(root, layout, rows, chunk, attrs={"pool": []})
    for c in range(store.n_chunks):
        span = store.chunk_rows(c)
        size = len(span)
        scores = rng.standard_normal(size).astype(np.float32)
        status = np.full(size, SCORED, np.uint8)
        bad = rng.random(size)
        status[bad < 0.01] = UNREADABLE
        status[(bad >= 0.01) & (bad < 0.012)] = NON_FINITE
        scores[status != SCORED] = np.nan
        store.write_chunk(c, scores, status)
    save_file(
        {"lambda/x": np.zeros(1)},
        str(root / "target.safetensors"),
        metadata={
            "influence.format": "batctl.target/1",
            "influence.n_adaptation": str(N_ADAPTATION),
        },
    )


def read_everything(root: Path) -> int:
    store = ScoreStore.open(root)
    total = 0
    for name in ("score", "status", "key", "part", "offset"):
        total += len(store.column(name))
    total += len(store.done())
    return total


def select_math(root: Path, strategy: str) -> int:
    """What `batctl select` computes before writing: returns the rows chosen over all values."""
    store = ScoreStore.open(root)
    n = read_n(root / "target.safetensors")
    columns = read_columns(store)
    plan = plan_selection(columns, n, strategy=strategy, gammas=GAMMAS, seed=0)
    longest = max(v.count for v in plan.values)
    part, offset = read_locations(store, plan.stream[:longest])
    keys = columns.key[plan.stream[:longest]]
    assert len(part) == len(offset) == len(keys) == longest
    return sum(v.count for v in plan.values)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, zarr metadata, numpy allocations
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--keep", type=Path, default=None, help="build the stores here and keep them"
    )
    args = parser.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="batctl-select-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        stores = {"unique": base / "unique", "dup": base / "dup"}
        build = {}
        for label, root in stores.items():
            if not ScoreStore.exists(root):
                start = time.perf_counter()
                build_store(root, args.rows, args.chunk_size, 0.01 if label == "dup" else 0.0)
                build[label] = time.perf_counter() - start
        rows = [
            (
                "read (all columns)",
                best_time(lambda: read_everything(stores["unique"]), args.repeats),
            ),
            (
                "select albat, 20 γ",
                best_time(lambda: select_math(stores["unique"], "albat"), args.repeats),
            ),
            (
                "select random, 20 γ",
                best_time(lambda: select_math(stores["unique"], "random"), args.repeats),
            ),
            (
                "select albat, 20 γ, 1% repeated keys",
                best_time(lambda: select_math(stores["dup"], "albat"), args.repeats),
            ),
        ]
        read = rows[0][1]
        print(
            f"{args.rows:,} rows, chunks of {args.chunk_size}, n = {N_ADAPTATION}, {len(GAMMAS)} γ values"
        )
        print(f"{'':38s} {'seconds':>8s} {'x read':>7s}")
        for label, seconds in rows:
            print(f"{label:38s} {seconds:8.3f} {seconds / read:7.2f}")
        worst = max(seconds for _, seconds in rows[1:]) / read
        goal = "met" if worst < 2 else "NOT met"
        print(f"goal select < 2x read: {goal} (worst {worst:.2f}x)")
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "chunk_size": args.chunk_size,
                    "gammas": len(GAMMAS),
                    "n_adaptation": N_ADAPTATION,
                    "build_s": {k: round(v, 2) for k, v in build.items()},
                    "seconds": {label: round(s, 4) for label, s in rows},
                    "ratio_to_read": {label: round(s / read, 3) for label, s in rows},
                    "goal_met": worst < 2,
                }
            )
        )
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
