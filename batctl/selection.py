"""Selection math for `batctl select` (DESIGN §3, §5): γ arithmetic, eligibility, dedupe, strategies.

Everything here is numpy and the score store: no model, no torch, so a γ sweep costs the time
of reading the store's columns.

    source = open_scores("runs/scores")                       # refuses a partial store
    columns = read_columns(source.store)                      # score, status, key, done per row
    plan = plan_selection(columns, source.n, strategy="albat", gammas=[0.5, 0.75])
    for value in plan.values:                                 # gamma-0.5, gamma-0.75
        rows = plan.rows_of(value)                            # store rows, best first

Definitions:

- γ = n / (n + m), m the pool samples added (the paper's Definition 2 writes n/k with k = n + m
  the augmented set's size): D_A's share of the augmented set. A requested γ gives
  m = round(n(1 − γ)/γ) pool samples, rounded half up, computed exactly from the decimal γ
  (n = 30, γ = 0.75 → 10). The γ a selection actually has is n / (n + m); it differs from the
  requested one only by that rounding. (In the code below, `k` and `count` are this m.)
- n is the number of finite adaptation samples behind the score store (target.safetensors).
- Eligible rows: status 1 (scored) with a finite score, in a chunk whose `done` flag is set.
- Strategies, each an order over the eligible rows; every value takes a prefix of one order, so
  a selection at a smaller γ contains the one at a larger γ, for every strategy:
  - `albat`: highest score first, ties by row (pool) order;
  - `random`: a uniform random permutation of the eligible rows (ascending row order permuted by
    `numpy.random.default_rng(seed)`): the same seed and store give the same selections,
    whatever other values are asked for in the same call;
  - `none`: nothing (the plain-adaptation baseline).
- Duplicates: walking the order, a row whose key was already taken is skipped, so `albat` keeps
  the best-scored copy of a key and `random` the first one drawn. With `--dedupe` a row whose
  content was already taken is skipped too (content = the image member's bytes when the sample
  has an image, else all its members, hashed with BLAKE2b); only the rows walked are read and
  hashed, never the whole pool.
- `--threshold η`: `albat` takes every eligible (deduplicated) row with score ≥ η; `random`
  takes as many rows as there are eligible rows with distinct keys and score ≥ η, uniformly from
  all eligible rows (the random baseline at the threshold's size).
- `--gamma auto` (with a model): the γ grid `GAMMA_GRID` is walked as far as the eligible pool
  allows; see `batctl.prop2`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from batctl.errors import BatctlError
from batctl.scorestore import SCORED, STATUS_NAMES, TARGET, ScoreStore

STRATEGIES = ("albat", "random", "none")

GAMMA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""The γ values `--gamma auto` tries: 0.05, 0.10, ..., 0.95 (m = 19n down to about n/19 pool samples)."""

_TARGET_PREFIX = (
    "influence."  # batctl.influence.target's metadata prefix (that module imports torch)
)


# ------------------------------------------------------------------------------ γ arithmetic


def pool_count(n: int, gamma: float) -> int:
    """m = round(n(1 − γ)/γ) pool samples, rounded half up, exact for the decimal γ the user typed.

    `gamma` in (0, 1); n >= 0. n = 30, γ = 0.75 gives 10; n = 3, γ = 0.4 gives 5 (4.5 up).
    """
    if not 0 < gamma < 1:
        raise ValueError(f"γ must be in (0, 1), got {gamma}")
    g = Fraction(repr(float(gamma)))  # repr is the shortest decimal: 0.75 -> 3/4, not 0.75000..01
    return math.floor(n * (1 - g) / g + Fraction(1, 2))


def effective_gamma(n: int, k: int) -> float:
    """The γ = n / (n + m) of an augmented set of n adaptation and m pool samples."""
    return n / (n + k) if n + k else 1.0


def value_name(kind: str, requested: Any) -> str:
    """Output subdirectory of one value: gamma-0.75, count-100, threshold-0.5, gamma-auto."""
    if kind == "auto":
        return "gamma-auto"
    if kind == "count":
        return f"count-{int(requested)}"
    return f"{kind}-{float(requested)!r}"


# ------------------------------------------------------------------------------ the score store


@dataclass
class ScoreSource:
    """A score store opened for selection: where it is and what its run recorded."""

    path: Path
    """The directory holding scores.zarr (the score output, or its .partial work dir)."""

    store: ScoreStore
    n: int
    """Finite adaptation samples behind the scores (the store's n_adaptation attribute)."""

    record: dict[str, Any]
    """The score run's manifest, or its partial.json for an unfinished store."""

    complete: bool
    """The store has a manifest and every chunk is done."""

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.record.get("params", {}))

    @property
    def inputs(self) -> dict[str, Any]:
        return dict(self.record.get("inputs", {}))

    def pool_paths(self) -> list[str]:
        """The pool's parts in store order (`part` indexes this list), as absolute paths.

        The store's `pool` attribute lists them as the score run saw them (relative paths are
        relative to where it ran); the run's inputs record the same parts resolved, which is
        what a select run from another directory needs.
        """
        paths = [str(p) for p in self.store.group.attrs.get("pool", [])]
        recorded = self.inputs.get("pool") or []
        out = []
        for i, p in enumerate(paths):
            if i < len(recorded) and isinstance(recorded[i], dict) and recorded[i].get("path"):
                if Path(recorded[i]["path"]).exists() or not Path(p).exists():
                    out.append(str(recorded[i]["path"]))
                    continue
            out.append(str(Path(p).resolve()))
        return out


def read_n(path: str | Path) -> int:
    """n_adaptation from target.safetensors' metadata, read from its JSON header (no torch)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        return int(header["__metadata__"][_TARGET_PREFIX + "n_adaptation"])
    except FileNotFoundError:
        raise BatctlError(
            f"--scores: {path} is missing; is this a batctl score directory?"
        ) from None
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BatctlError(f"--scores: {path} is not a batctl target file ({exc})") from None


def open_scores(path: str | Path | None, allow_partial: bool = False) -> ScoreSource:
    """The score store of `--scores`: a finished score output, or with `allow_partial` one still
    being written (`path` or its `.NAME.partial` work dir). Refuses an unfinished store with how
    far it got, anything else with one line."""
    from batctl import artifacts

    if path is None:
        raise BatctlError("--scores is required")
    from batctl.remote import is_url, mirror_store, url_problem

    if is_url(str(path)):
        problem = url_problem(path, "--scores", True)
        if problem:
            raise BatctlError(problem)
        path = mirror_store(str(path))  # read through a local copy, refreshed when it changes
    path = Path(path)
    manifest = artifacts.read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        if manifest.get("stage") != "score":
            raise BatctlError(
                f"--scores {path}: a {manifest.get('stage')} output, expected a score output"
            )
        if not ScoreStore.exists(path):
            raise BatctlError(f"--scores {path}: no scores.zarr inside")
        work, record = path, manifest
    else:
        work = path if ScoreStore.exists(path) else artifacts.partial_dir(path)
        if not ScoreStore.exists(work):
            raise BatctlError(
                f"--scores {path}: not a batctl score output (no manifest.json and no scores.zarr)"
            )
        try:
            record = json.loads((work / artifacts.PARTIAL).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            record = {}
    store = ScoreStore.open(work)
    complete = manifest is not None and store.is_complete()
    if not complete and not allow_partial:
        progress = store.progress()
        done, total = progress["done"], progress["total"]
        share = f" ({100 * done / total:.0f}%)" if total else ""
        raise BatctlError(
            f"--scores {path}: the store is not finished: {done} of {total} chunks done{share}; "
            "let `batctl score` finish (rerun it to resume), or pass --allow-partial to select "
            "from the finished chunks"
        )
    return ScoreSource(work.absolute(), store, store_n(store, work), record, complete)


def store_n(store: ScoreStore, work: Path) -> int:
    """n behind a store: its `n_adaptation` attribute (every method writes it), else, for stores
    written before methods existed, target.safetensors' metadata."""
    n = store.group.attrs.get("n_adaptation")
    return int(n) if n is not None else read_n(work / TARGET)


@dataclass
class Columns:
    """The per-row arrays selection needs (part and offset are read for the chosen rows only)."""

    score: np.ndarray  # f32[N]
    status: np.ndarray  # u8[N]
    key: np.ndarray  # str[N]
    done: np.ndarray  # bool[N]: the row's chunk is finished

    def __len__(self) -> int:
        return len(self.score)


def read_columns(store: ScoreStore) -> Columns:
    """score, status, key and each row's chunk-done flag, whole: four sequential zarr reads."""
    chunk_done = store.done()
    if store.n_rows and chunk_done.all():
        row_done = np.ones(store.n_rows, dtype=bool)
    else:
        row_done = np.repeat(chunk_done, store.chunk_size)[: store.n_rows]
    return Columns(
        score=store.column("score"),
        status=store.column("status"),
        key=store.column("key"),
        done=row_done,
    )


def read_locations(store: ScoreStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(part, offset) of `rows` (any order): only the chunks that hold them when they are few,
    the whole columns when they are spread over most chunks anyway (cheaper than zarr's
    orthogonal indexing then)."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    if len(rows) > store.n_chunks:
        return store.column("part")[rows], store.column("offset")[rows]
    unique, inverse = np.unique(rows, return_inverse=True)
    part, offset = (
        np.asarray(store.group[name].oindex[unique])[inverse] for name in ("part", "offset")
    )
    return part, offset


# ------------------------------------------------------------------------------ eligibility + orders


def eligible_rows(columns: Columns) -> np.ndarray:
    """Ascending row indices of the eligible rows: status 1, finite score, chunk done."""
    mask = (columns.status == SCORED) & np.isfinite(columns.score) & columns.done
    return np.flatnonzero(mask)


def albat_order(scores: np.ndarray, need: int | None = None) -> np.ndarray:
    """Positions into `scores` by descending score, ties by position: at least the first `need`
    of the full stable order (all of it when `need` is None or not much smaller than the input).

    Uses a partition when `need` is small, then sorts only the candidates: every score above the
    need-th largest, and every tie with it (so ties are still broken by position).
    """
    size = len(scores)
    if need is None or need >= size // 4:
        return np.argsort(-scores, kind="stable")
    if need <= 0:
        return np.zeros(0, dtype=np.int64)
    cutoff = -np.partition(-scores, need - 1)[need - 1]
    candidates = np.flatnonzero(scores >= cutoff)
    return candidates[np.argsort(-scores[candidates], kind="stable")]


def random_order(size: int, seed: int) -> np.ndarray:
    """A uniform random permutation of range(size) from `seed` (numpy's PCG64)."""
    return np.random.default_rng(seed).permutation(size)


# ------------------------------------------------------------------------------ the plan


@dataclass
class Value:
    """One requested selection: a γ, a count, a threshold, or the γ `auto` chose."""

    kind: str  # gamma, count, threshold, auto
    requested: Any  # the γ, K or η asked for (auto: None until chosen)
    count: int  # k, pool samples selected
    n: int

    @property
    def name(self) -> str:
        return value_name(self.kind, self.requested)

    @property
    def gamma(self) -> float:
        """The γ this selection has: n / (n + k)."""
        return effective_gamma(self.n, self.count)


@dataclass
class Plan:
    """Which rows every value selects: each value takes a prefix of `stream`."""

    strategy: str
    n: int
    rows: int  # rows in the store
    eligible: int  # eligible rows before dedupe
    stream: np.ndarray  # chosen store rows, best (albat) or first drawn (random) first
    stream_scores: np.ndarray  # their scores (f32)
    values: list[Value]
    status_counts: dict[str, int]
    pending_rows: int  # rows in chunks that are not done (partial stores)
    duplicate_keys: int  # rows skipped for a repeated key while walking
    duplicate_content: int  # rows skipped for repeated content (--dedupe)
    exhausted: bool  # the walk reached the end of the eligible rows
    auto_grid: list[tuple[float, int]] = field(default_factory=list)
    """(γ, k) of the `--gamma auto` grid points the eligible pool can serve."""

    def rows_of(self, value: Value) -> np.ndarray:
        return self.stream[: value.count]

    def summary(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "n_adaptation": self.n,
            "rows": self.rows,
            "eligible": self.eligible,
            "status": self.status_counts,
            "pending_rows": self.pending_rows,
            "duplicate_keys_dropped": self.duplicate_keys,
            "duplicate_content_dropped": self.duplicate_content,
        }


def plan_selection(
    columns: Columns,
    n: int,
    *,
    strategy: str = "albat",
    gammas: Iterable[float] = (),
    counts: Iterable[int] = (),
    thresholds: Iterable[float] = (),
    auto: bool = False,
    seed: int = 0,
    content: Callable[[int], bytes] | None = None,
) -> Plan:
    """Every value's selection, as prefixes of one deduplicated order over the eligible rows.

    Inputs: the store's columns, n (finite adaptation samples), the strategy, the values, whether
    the `auto` grid is wanted (its points are served as far as the pool allows), the seed for
    `random`, and `content(row) -> digest` for `--dedupe` (called only for rows walked).
    Raises BatctlError (one line) when a value asks for more pool samples than the eligible
    pool holds, saying how many it holds.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    gammas, counts, thresholds = list(gammas), list(counts), list(thresholds)
    rows_all = eligible_rows(columns)
    # float64, so `--threshold 0.7` and the reported scores agree (numpy 2 compares float32
    # arrays with Python floats in float32, where float32(0.7) >= 0.7).
    scores_e = columns.score[rows_all].astype(np.float64)
    m = len(rows_all)
    counts_by_status = np.bincount(columns.status, minlength=4)
    status_counts = {STATUS_NAMES[i]: int(counts_by_status[i]) for i in range(4)}
    pending_rows = int((~columns.done).sum())

    # How many rows each value needs (albat thresholds: as many as score >= η).
    hard: list[tuple[str, int]] = []  # (what the user typed, k) for the error message
    values: list[Value] = []
    for g in gammas:
        k = pool_count(n, g)
        values.append(Value("gamma", g, k, n))
        hard.append((f"--gamma {g!r} (n = {n})", k))
    for k in counts:
        values.append(Value("count", int(k), int(k), n))
        hard.append((f"--count {int(k)}", int(k)))
    until = None
    for eta in thresholds:
        if strategy == "random":
            k = _distinct_count(columns.key, rows_all[scores_e >= eta])
            hard.append((f"--threshold {eta!r}", k))
        else:
            k = 0  # albat: known after the walk; none: nothing
            until = eta if until is None else min(until, eta)
        values.append(Value("threshold", eta, k, n))
    if strategy == "none":
        for v in values:
            v.count = 0
        return Plan(
            strategy, n, len(columns), m, np.zeros(0, np.int64), np.zeros(0, np.float32),
            values, status_counts, pending_rows, 0, 0, False,
        )  # fmt: skip

    need = max((k for _, k in hard), default=0)
    if need > m:
        what = max(hard, key=lambda item: item[1])[0]
        raise BatctlError(
            _too_many(what, need, _distinct_count(columns.key, rows_all), m, status_counts)
        )
    # k = 0 (γ near 1 with small n) is plain adaptation, where both sides are equal: never a win.
    grid = [(g, k) for g in GAMMA_GRID if (k := pool_count(n, g)) > 0] if auto else []
    want = max([need] + [min(k, m) for _, k in grid])  # grid points past the pool are dropped
    if until is not None:
        want = max(want, int((scores_e >= until).sum()))

    keys_e = columns.key[rows_all]
    order_in = _order(strategy, scores_e, seed, min(want, m), keys_e)
    kept, dup_keys, dup_content, exhausted = _walk(
        rows_all, order_in, scores_e, columns.key, want, until, content,
        refill=lambda: _order(strategy, scores_e, seed, None, keys_e),
    )  # fmt: skip
    stream = np.asarray(kept, dtype=np.int64)
    stream_scores = columns.score[stream].astype(np.float64)
    if need > len(stream):
        what = max(hard, key=lambda item: item[1])[0]
        raise BatctlError(
            _too_many(what, need, len(stream), m, status_counts, dup_keys, dup_content)
        )
    if until is not None:
        for v in values:
            if v.kind == "threshold":
                v.count = int(np.count_nonzero(stream_scores >= v.requested))
    return Plan(
        strategy, n, len(columns), m, stream, stream_scores, values, status_counts,
        pending_rows, dup_keys, dup_content, exhausted,
        auto_grid=[(g, k) for g, k in grid if k <= len(stream)],
    )  # fmt: skip


def _order(
    strategy: str, scores_e: np.ndarray, seed: int, need: int | None, keys_e: np.ndarray
) -> np.ndarray:
    if strategy == "albat":
        return albat_order(scores_e, need)
    # Uniform over distinct keys: permuting rows would favour a key by its number of copies.
    first = np.sort(np.unique(keys_e, return_index=True)[1])
    return first[random_order(len(first), seed)]


def _walk(
    rows_all: np.ndarray,
    order: np.ndarray,
    scores_e: np.ndarray,
    keys: np.ndarray,
    want: int,
    until: float | None,
    content: Callable[[int], bytes] | None,
    refill: Callable[[], np.ndarray],
) -> tuple[list[int], int, int, bool]:
    """Take rows along `order` (positions into rows_all), skipping repeated keys (and contents),
    until `want` are kept and the next score is below `until`. Returns (kept rows, duplicate
    keys skipped, duplicate contents skipped, whether the eligible rows ran out)."""
    m = len(rows_all)
    kept: list[int] = []
    seen: set[str] = set()
    seen_content: set[bytes] = set()
    dup_keys = dup_content = 0
    pos = 0
    full = len(order) == m

    def satisfied(at: int) -> bool:
        return len(kept) >= want and (until is None or scores_e[order[at]] < until)

    while True:
        if pos >= len(order):
            if full:
                return kept, dup_keys, dup_content, True
            if len(kept) >= want:
                # A partial order holds every score >= until (see plan_selection): done.
                return kept, dup_keys, dup_content, False
            order, full = refill(), True  # the partial order ran out (duplicates): sort it all
            continue
        if satisfied(pos):
            return kept, dup_keys, dup_content, False
        # A block at a time: keys come out of numpy in one go, and the common case (no
        # duplicates, no --dedupe) takes the whole block without a Python loop.
        block_len = max(want - len(kept), 256)
        if until is not None:
            block_len = max(block_len, int(np.count_nonzero(scores_e[order[pos:]] >= until)))
        block = order[pos : pos + block_len]
        rows = rows_all[block]
        block_keys = keys[rows].tolist()
        if content is None and len(set(block_keys)) == len(block) and seen.isdisjoint(block_keys):
            seen.update(block_keys)
            kept.extend(rows.tolist())
            pos += len(block)
            continue
        for row, key in zip(rows.tolist(), block_keys, strict=True):
            if satisfied(pos):
                break
            pos += 1
            if key in seen:
                dup_keys += 1
                continue
            if content is not None:
                digest = content(row)
                if digest in seen_content:
                    dup_content += 1
                    continue
                seen_content.add(digest)
            seen.add(key)
            kept.append(row)


def _distinct_count(keys: np.ndarray, rows: np.ndarray) -> int:
    return len(set(keys[rows].tolist())) if len(rows) else 0


def _too_many(
    what: str,
    need: int,
    holds: int,
    eligible: int,
    status: dict[str, int],
    dup_keys: int | None = None,
    dup_content: int = 0,
) -> str:
    dropped = []
    if eligible != holds:
        if dup_content:
            dropped.append(f"{dup_content} repeated contents")
        duplicates = eligible - holds - dup_content if dup_keys is None else dup_keys
        if duplicates:
            dropped.append(f"{duplicates} repeated keys")
    others = [f"{count} {name}" for name, count in status.items() if name != "scored" and count]
    detail = f"{eligible} rows are scored with a finite score"
    if dropped:
        detail += f", less {' and '.join(dropped)}"
    if others:
        detail += f"; {', '.join(others)}"
    return (
        f"{what} asks for {need} pool samples but the eligible pool holds only {holds} ({detail}); "
        "ask for fewer, or score a larger pool"
    )


# ------------------------------------------------------------------------------ content hashing


def content_digest(raw: dict[str, bytes]) -> bytes:
    """What --dedupe compares: the image member's bytes when the sample has an image (captions
    and metadata of re-posted images differ), else every member (extension and bytes)."""
    import hashlib

    from batctl.data.core import image_ext_of

    h = hashlib.blake2b(digest_size=16)
    image = image_ext_of(raw)
    if image is not None:
        h.update(raw[image])
    else:
        for ext in sorted(raw):
            h.update(ext.encode() + b"\0" + len(raw[ext]).to_bytes(8, "little"))
            h.update(raw[ext])
    return h.digest()


def histogram(scores: np.ndarray, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the eligible scores, for scores.png."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return np.zeros(0, np.int64), np.zeros(1)
    return np.histogram(scores, bins=bins)


def cut_of(plan: Plan, value: Value) -> float | None:
    """The score of the last row `value` selects under albat (its score cut), else None."""
    if plan.strategy != "albat" or value.count == 0:
        return None
    return float(plan.stream_scores[value.count - 1])
