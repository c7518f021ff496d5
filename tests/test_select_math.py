"""Selection math (batctl.selection): γ arithmetic, eligibility, dedupe, albat/random/none.

Brute force here is plain Python over lists: sort the eligible rows, drop repeated keys, take k.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batctl.errors import BatctlError
from batctl.scorestore import NON_FINITE, PENDING, SCORED, UNREADABLE, ScoreStore
from batctl.selection import (
    GAMMA_GRID,
    albat_order,
    effective_gamma,
    plan_selection,
    pool_count,
    read_columns,
    value_name,
)

from .select_fixtures import columns_of

# ------------------------------------------------------------------------------ γ arithmetic


def test_gamma_is_n_over_k_so_thirty_adaptation_samples_at_three_quarters_take_ten():
    assert pool_count(30, 0.75) == 10
    assert effective_gamma(30, 10) == 0.75
    assert pool_count(30, 0.5) == 30
    assert pool_count(3, 0.4) == 5  # 4.5 rounds half up
    assert pool_count(30, 0.99) == 0  # 0.303 rounds to nothing
    assert pool_count(100, 0.05) == 1900
    plan = plan_selection(columns_of(np.arange(50.0)), 30, gammas=[0.75])
    (value,) = plan.values
    assert value.count == 10 and value.gamma == 0.75 and value.name == "gamma-0.75"
    assert list(plan.rows_of(value)) == list(range(49, 39, -1))
    assert [value_name("count", 100), value_name("threshold", 0.5)] == [
        "count-100",
        "threshold-0.5",
    ]
    assert GAMMA_GRID[0] == 0.05 and GAMMA_GRID[-1] == 0.95 and len(GAMMA_GRID) == 19


@given(st.integers(0, 10_000), st.integers(1, 999))
def test_pool_count_is_the_nearest_integer_to_n_one_minus_gamma_over_gamma(n, per_mille):
    gamma = per_mille / 1000
    exact = Fraction(n) * (1 - Fraction(per_mille, 1000)) / Fraction(per_mille, 1000)
    k = pool_count(n, gamma)
    assert abs(k - exact) <= Fraction(1, 2)
    assert k == math.floor(exact + Fraction(1, 2))


def test_gamma_outside_the_unit_interval_is_refused():
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            pool_count(10, bad)


# ------------------------------------------------------------------------------ orders


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=60),
    st.integers(0, 70),
)
def test_albat_partial_order_is_a_prefix_of_the_full_stable_order(values, need):
    scores = np.array(values, dtype=np.float32)  # many ties: the tie rule is what is tested
    full = sorted(range(len(values)), key=lambda i: (-values[i], i))
    got = albat_order(scores, need)
    assert len(got) >= min(need, len(values))
    assert list(got) == full[: len(got)]


# ------------------------------------------------------------------------------ random stores


def brute_force(scores, status, keys, done, strategy="albat"):
    """Eligible rows by (-score, row), first of each key kept (albat only)."""
    eligible = [
        i
        for i in range(len(scores))
        if status[i] == SCORED and math.isfinite(scores[i]) and done[i]
    ]
    eligible.sort(key=lambda i: (-float(scores[i]), i))
    seen, out = set(), []
    for i in eligible:
        if keys[i] not in seen:
            seen.add(keys[i])
            out.append(i)
    return out


@st.composite
def stores(draw):
    rows = draw(st.integers(1, 60))
    chunk = draw(st.integers(1, 16))
    scores = draw(
        st.lists(
            st.one_of(st.integers(-5, 5).map(float), st.just(math.nan), st.floats(-1e3, 1e3)),
            min_size=rows,
            max_size=rows,
        )
    )
    status = draw(
        st.lists(
            st.sampled_from([SCORED, SCORED, SCORED, PENDING, UNREADABLE, NON_FINITE]),
            min_size=rows,
            max_size=rows,
        )
    )
    keys = draw(
        st.lists(st.sampled_from([f"k{i}" for i in range(rows + 3)]), min_size=rows, max_size=rows)
    )
    chunks = -(-rows // chunk)
    done = draw(st.lists(st.booleans(), min_size=chunks, max_size=chunks))
    return scores, status, keys, chunk, done


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stores(),
    st.integers(1, 20),
    st.sampled_from([0.3, 0.5, 0.75, 0.9]),
    st.sampled_from([0.1, 0.2, 0.4]),
)
def test_albat_on_real_zarr_stores_is_the_brute_force_top_k_and_nests(
    store_spec, n, g_big, g_small
):
    scores, status, keys, chunk, done = store_spec
    rows = len(scores)
    with tempfile.TemporaryDirectory() as tmp:
        store = ScoreStore.create(tmp, ((k, 0, i) for i, k in enumerate(keys)), rows, chunk)
        for c in range(store.n_chunks):
            if done[c]:
                span = store.chunk_rows(c)
                store.write_chunk(
                    c,
                    np.array(scores[span.start : span.stop]),
                    np.array(status[span.start : span.stop]),
                )
        columns = read_columns(ScoreStore.open(tmp))
    row_done = np.repeat(done, chunk)[:rows]
    stored = np.array(scores, dtype=np.float32)  # what the store holds (1e-130 is 0.0 there)
    expected = brute_force(
        [float(s) if row_done[i] else math.nan for i, s in enumerate(stored)],
        [s if row_done[i] else PENDING for i, s in enumerate(status)],
        keys,
        row_done,
    )
    ask = [g for g in (g_big, g_small) if pool_count(n, g) <= len(expected)]
    too_many = [g for g in (g_big, g_small) if pool_count(n, g) > len(expected)]
    if too_many:
        with pytest.raises(BatctlError, match=f"holds only {len(expected)}"):
            plan_selection(columns, n, gammas=[g_big, g_small])
    plan = plan_selection(columns, n, gammas=ask)
    chosen = {v.requested: list(plan.rows_of(v)) for v in plan.values}
    for g, got in chosen.items():
        assert got == expected[: pool_count(n, g)]
        assert all(status[i] == SCORED and math.isfinite(stored[i]) and row_done[i] for i in got)
        assert len({keys[i] for i in got}) == len(got)
    if len(chosen) == 2:
        small, large = sorted(chosen.values(), key=len)  # the larger γ takes fewer pool samples
        assert set(small) <= set(large)
        assert len(chosen[max(chosen)]) <= len(chosen[min(chosen)])


def test_ineligible_rows_are_never_selected_even_when_asking_for_everything():
    scores = np.array([5, 4, np.nan, 3, 2, 1, 9, 8], dtype=np.float32)
    status = [SCORED, UNREADABLE, SCORED, NON_FINITE, PENDING, SCORED, SCORED, SCORED]
    done = [True] * 6 + [False] * 2  # rows 6 and 7 sit in an unfinished chunk
    columns = columns_of(scores, status, done=done)
    for strategy in ("albat", "random"):
        plan = plan_selection(columns, 1, strategy=strategy, counts=[2])
        assert sorted(plan.rows_of(plan.values[0])) == [0, 5]
        with pytest.raises(BatctlError) as info:
            plan_selection(columns, 1, strategy=strategy, counts=[3])
        message = str(info.value)
        assert "\n" not in message and "--count 3" in message and "holds only 2" in message
    assert plan.status_counts == {"pending": 1, "scored": 5, "unreadable": 1, "non-finite": 1}
    assert plan.pending_rows == 2


# ------------------------------------------------------------------------------ random


def test_random_is_reproducible_per_seed_nested_and_independent_of_other_values():
    columns = columns_of(np.arange(100.0))
    a = plan_selection(columns, 10, strategy="random", gammas=[0.5], seed=7)
    b = plan_selection(columns, 10, strategy="random", gammas=[0.5, 0.2], counts=[3], seed=7)
    c = plan_selection(columns, 10, strategy="random", gammas=[0.5], seed=8)
    rows = {v.name: list(b.rows_of(v)) for v in b.values}
    assert list(a.rows_of(a.values[0])) == rows["gamma-0.5"]
    assert list(c.rows_of(c.values[0])) != rows["gamma-0.5"]
    assert set(rows["count-3"]) <= set(rows["gamma-0.5"]) <= set(rows["gamma-0.2"])


def test_random_subsets_are_uniform_over_the_eligible_rows():
    # 6 eligible rows among 9 (3 ineligible), k = 2: every one of the 15 pairs equally likely.
    scores = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.float32)
    status = [SCORED, UNREADABLE, SCORED, SCORED, PENDING, SCORED, SCORED, NON_FINITE, SCORED]
    columns = columns_of(scores, status)
    eligible = [0, 2, 3, 5, 6, 8]
    draws = 3000
    counts = dict.fromkeys(itertools.combinations(eligible, 2), 0)
    for seed in range(draws):
        plan = plan_selection(columns, 2, strategy="random", counts=[2], seed=seed)
        counts[tuple(sorted(plan.rows_of(plan.values[0])))] += 1
    expected = draws / len(counts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 36.1  # chi-square, 14 degrees of freedom, p = 0.001


def test_random_threshold_takes_as_many_as_albat_would_from_all_eligible_rows():
    columns = columns_of(np.arange(40.0))
    albat = plan_selection(columns, 5, thresholds=[30.0])
    random = plan_selection(columns, 5, strategy="random", thresholds=[30.0], seed=1)
    assert albat.values[0].count == random.values[0].count == 10
    assert list(albat.rows_of(albat.values[0])) == list(range(39, 29, -1))
    assert min(random.rows_of(random.values[0])) < 30  # drawn from the whole eligible pool


def test_none_selects_nothing_for_every_value():
    plan = plan_selection(columns_of(np.arange(10.0)), 5, strategy="none", gammas=[0.5], counts=[3])
    assert [v.count for v in plan.values] == [0, 0] and [v.gamma for v in plan.values] == [1.0, 1.0]


# ------------------------------------------------------------------------------ duplicates


def test_repeated_keys_keep_the_best_scored_row_under_albat_and_one_row_per_key_under_random():
    keys = ["a", "b", "a", "c", "b", "d"]
    scores = np.array([1, 9, 5, 3, 2, 4], dtype=np.float32)
    columns = columns_of(scores, keys=keys)
    plan = plan_selection(columns, 1, counts=[4])
    assert list(plan.rows_of(plan.values[0])) == [1, 2, 5, 3]  # b@9, a@5 (not a@1), d, c
    assert plan.duplicate_keys == 0  # the walk stopped before meeting a repeat
    every = plan_selection(columns, 1, thresholds=[-100.0])
    assert list(every.rows_of(every.values[0])) == [1, 2, 5, 3]
    assert every.duplicate_keys == 2
    with pytest.raises(BatctlError, match="holds only 4.*2 repeated keys"):
        plan_selection(columns, 1, counts=[5])
    for seed in range(20):
        random = plan_selection(columns, 1, strategy="random", counts=[4], seed=seed)
        chosen = list(random.rows_of(random.values[0]))
        # random is uniform over distinct keys, each represented by its first row
        assert sorted(chosen) == [0, 1, 3, 5]


def test_random_is_uniform_over_keys_not_rows():
    keys = ["a"] * 9 + ["b"]  # a row-uniform draw would pick "a" 90% of the time
    columns = columns_of(np.zeros(10, dtype=np.float32), keys=keys)
    picks = [
        keys[plan_selection(columns, 1, strategy="random", counts=[1], seed=s).stream[0]]
        for s in range(400)
    ]
    assert 0.4 < picks.count("b") / 400 < 0.6


def test_content_dedupe_hashes_only_the_rows_it_walks():
    contents = [b"x", b"y", b"x", b"z", b"y", b"w", b"v", b"u"]
    scores = np.array([8, 7, 6, 5, 4, 3, 2, 1], dtype=np.float32)
    seen: list[int] = []

    def content(row: int) -> bytes:
        seen.append(row)
        return contents[row]

    plan = plan_selection(columns_of(scores), 1, counts=[3], content=content)
    assert list(plan.rows_of(plan.values[0])) == [0, 1, 3]  # row 2 repeats row 0's content
    assert seen == [0, 1, 2, 3] and plan.duplicate_content == 1
    with pytest.raises(BatctlError, match="holds only 6"):
        plan_selection(columns_of(scores), 1, counts=[7], content=lambda r: contents[r])


def test_a_partial_sort_that_runs_out_of_distinct_keys_falls_back_to_the_full_order():
    rows = 400
    scores = np.arange(rows, dtype=np.float32)[::-1].copy()  # row 0 best
    keys = ["same"] * 50 + [f"k{i}" for i in range(50, rows)]  # the top 50 share one key
    plan = plan_selection(columns_of(scores, keys=keys), 1, counts=[5])
    assert list(plan.rows_of(plan.values[0])) == [0, 50, 51, 52, 53]
    assert plan.duplicate_keys == 49


def test_the_auto_grid_never_offers_an_empty_augmentation():
    # n = 5: γ = 0.95 rounds to k = 0, where both sides of Proposition 2 are trivially equal.
    columns = columns_of(np.arange(100, dtype=np.float32), keys=[f"k{i}" for i in range(100)])
    plan = plan_selection(columns, 5, auto=True)
    assert plan.auto_grid and all(k > 0 for _, k in plan.auto_grid)
