"""The score store: layout in pool order, chunk writes with done flags last, shard ownership."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batctl.scorestore import NON_FINITE, PENDING, SCORED, UNREADABLE, ScoreStore, chunk_owner


def layout(n):
    return ((f"k.{i}", i // 3, 1024 * i) for i in range(n))


def test_a_new_store_is_pending_rows_in_pool_order(tmp_path):
    store = ScoreStore.create(tmp_path, layout(10), 10, chunk_size=4, layer_names=["a", "b"])
    assert ScoreStore.exists(tmp_path)
    assert store.n_rows == 10 and store.n_chunks == 3 and store.chunk_size == 4
    assert list(store.column("key")) == [f"k.{i}" for i in range(10)]
    assert list(store.column("part")) == [i // 3 for i in range(10)]
    assert list(store.column("offset")) == [1024 * i for i in range(10)]
    assert (store.column("status") == PENDING).all() and np.isnan(store.column("score")).all()
    assert store.progress()["done"] == 0 and not store.is_complete()
    assert list(store.first_row_parts()) == [0, 1, 2]


def test_chunks_are_written_and_flagged_and_survive_reopening(tmp_path):
    store = ScoreStore.create(tmp_path, layout(10), 10, chunk_size=4, layer_names=["a", "b"])
    status = np.array([SCORED, UNREADABLE, SCORED, NON_FINITE])
    scores = np.array([0.5, np.nan, -1.0, np.nan])
    store.write_chunk(1, scores, status, np.ones((4, 2)))
    again = ScoreStore.open(tmp_path)
    assert list(again.done()) == [False, True, False]
    np.testing.assert_array_equal(again.column("score", slice(4, 8)), scores.astype(np.float32))
    assert list(again.column("status", slice(4, 8))) == list(status)
    assert again.column("layer_score", slice(4, 8)).tolist() == [[1.0, 1.0]] * 4
    assert again.progress()["status"] == {
        "pending": 6,
        "scored": 2,
        "unreadable": 1,
        "non-finite": 1,
    }
    store.write_chunk(0, np.zeros(4), np.full(4, SCORED))
    store.write_chunk(2, np.zeros(2), np.full(2, SCORED))
    assert ScoreStore.open(tmp_path).is_complete()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.integers(1, 40))
def test_every_chunk_has_one_owner_in_contiguous_ranges_balanced_within_one(n_chunks, shards):
    owners = chunk_owner(n_chunks, shards)
    assert len(owners) == n_chunks
    if n_chunks:
        assert owners.min() >= 0 and owners.max() < shards
    assert (np.diff(owners) >= 0).all()  # contiguous chunk ranges per shard
    counts = np.bincount(owners, minlength=shards)
    assert counts.max() - counts.min() <= 1  # whatever the number of pool files


def test_progress_per_shard_with_rate_and_eta(tmp_path, cli):
    """10 chunks of 4 rows over 2 shards: shard 0 finished 3 of its 5 chunks, 10 s apart."""
    import json

    from batctl.artifacts import open_partial

    work, _ = open_partial(
        tmp_path / "scores", {"stage": "score", "params": {}, "inputs": {}}, False
    )
    partial = json.loads((work / "partial.json").read_text())
    (work / "partial.json").write_text(json.dumps({**partial, "shards": 2}))
    store = ScoreStore.create(work, layout(40), 40, chunk_size=4)
    for chunk, stamp in ((0, 100.0), (1, 110.0), (2, 120.0)):
        store.write_chunk(chunk, np.zeros(4), np.full(4, SCORED))
        store.group["done_at"][chunk] = stamp
    rows = store.shard_progress(2, now=125.0)
    assert rows[0] == {
        "shard": "0/2",
        "done": 3,
        "total": 5,
        "rows_per_s": 0.4,  # 8 rows in the 20 s between the first and the last finished chunk
        "eta_s": 20,  # 8 rows left
        "last_chunk_age_s": 5,
    }
    assert rows[1]["done"] == 0 and rows[1]["rows_per_s"] is None and rows[1]["eta_s"] is None
    shown = cli("info", tmp_path / "scores")
    assert shown.exit_code == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "0/2 │ 3/5 chunks, 0.4 rows/s, ETA 0m20s" in text and "1/2 │ 0/5 chunks" in text
