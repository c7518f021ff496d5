"""Score batching by sample count and token budget, and healing out-of-memory batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batctl.batching import TOO_BIG, MemoryGuard, plan_batches

from .test_score_stage import read_store, score_args, setup  # noqa: F401


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, 600), max_size=60).map(sorted),
    st.integers(1, 16),
    st.one_of(st.none(), st.integers(1, 4000)),
)
def test_batches_cover_every_sample_once_within_both_caps_costliest_first(sizes, most, budget):
    batches = plan_batches(sizes, most, budget)
    assert sorted(j for b in batches for j in b) == list(range(len(sizes)))
    costs = [len(b) * max(sizes[j] for j in b) for b in batches]
    for batch, cost in zip(batches, costs, strict=True):
        assert len(batch) <= most
        assert budget is None or cost <= budget or len(batch) == 1  # one oversized sample alone
        assert batch == sorted(batch) and batch == list(range(batch[0], batch[-1] + 1))
    assert costs == sorted(costs, reverse=True)


def test_a_token_budget_packs_short_samples_and_isolates_long_ones():
    sizes = [10, 10, 10, 10, 50, 50, 300]
    assert plan_batches(sizes, 32, 100) == [[6], [4, 5], [0, 1, 2, 3]]
    assert plan_batches(sizes, 3, None) == [[6], [3, 4, 5], [0, 1, 2]]


def oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_out_of_memory_batch_is_halved_and_later_batches_stay_small():
    calls = []

    def score(items):
        calls.append(list(items))
        if len(items) > 2:
            raise oom()
        return [x * 10 for x in items]

    guard = MemoryGuard()
    assert guard.run([1, 2, 3, 4, 5], score) == [10, 20, 30, 40, 50]
    assert guard.cap == 2 and calls[0] == [1, 2, 3, 4, 5]
    calls.clear()
    assert guard.run([6, 7, 8], score) == [60, 70, 80]
    assert calls == [[6, 7], [8]]  # no second failure: the cap is remembered
    # The cap shrinking again inside a split batch loses no item.
    halving = MemoryGuard()
    assert halving.run(
        list(range(8)), lambda xs: [x for x in xs] if len(xs) <= 1 else (_ for _ in ()).throw(oom())
    ) == list(range(8))
    assert halving.cap == 1


def test_a_sample_too_big_alone_is_skipped_and_other_errors_pass_through():
    def score(items):
        if 99 in items:
            raise RuntimeError("CUDA error: out of memory")
        return list(items)

    guard = MemoryGuard()
    assert guard.run([1, 99, 3], score) == [1, TOO_BIG, 3]
    assert guard.skipped == 1
    with pytest.raises(ValueError):
        MemoryGuard().run([1], lambda items: (_ for _ in ()).throw(ValueError("bug")))


def test_score_heals_injected_out_of_memory_errors_with_identical_scores(
    cli,
    setup,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """Every batch above 2 samples runs out of memory: the store equals a --batch-size 2 run."""
    reference = tmp_path / "reference"
    assert cli(*score_args(setup, reference, "--batch-size", "2")).exit_code == 0

    import batctl.methods.influence as influence

    real = influence.score_batch
    sizes = []

    def small_memory(samples, *args):
        sizes.append(len(samples))
        if len(samples) > 2:
            raise oom()
        yield from real(samples, *args)

    monkeypatch.setattr(influence, "score_batch", small_memory)
    out = tmp_path / "healed"
    result = cli(*score_args(setup, out, "--batch-size", "8", "--max-batch-tokens", "100000"))
    assert result.exit_code == 0, result.stderr
    assert max(sizes) == 8 and sizes.count(8) == 1  # only the first batch failed at full size
    assert "out of memory on a batch of 8 samples" in caplog.text
    a, b = read_store(reference), read_store(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
