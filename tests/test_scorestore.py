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
@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.integers(1, 16), st.integers(1, 6))
def test_every_chunk_has_exactly_one_owner_and_shards_read_contiguous_stretches(
    sizes, chunk_size, shards
):
    parts = np.repeat(np.arange(len(sizes)), sizes)
    first = parts[::chunk_size]
    owners = chunk_owner(first, len(sizes), shards)
    assert owners.min() >= 0 and owners.max() < shards
    assert (np.diff(owners) >= 0).all()  # contiguous chunk ranges per shard
    # A part never straddles two shards' parts: shard of a part is monotone in the part index.
    part_shard = chunk_owner(np.arange(len(sizes)), len(sizes), shards)
    assert (np.diff(part_shard) >= 0).all()
