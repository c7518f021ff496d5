"""The shared training loop's parts: epoch order, mixing, schedule, step counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batctl.training import LoopSettings, epoch_order, lr_factor, total_steps


@given(
    st.integers(0, 40),
    st.integers(0, 40),
    st.sampled_from(["uniform", "interleave"]),
    st.integers(0, 9),
)
def test_an_epoch_visits_every_example_once(n_adapt, n_backbone, mix, seed):
    order = epoch_order(n_adapt, n_backbone, mix, np.random.default_rng(seed))
    assert sorted(order) == list(range(n_adapt + n_backbone))


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 9))
def test_interleave_spreads_backbone_samples_evenly(n_adapt, n_backbone, seed):
    order = epoch_order(n_adapt, n_backbone, "interleave", np.random.default_rng(seed))
    positions = [i for i, index in enumerate(order) if index >= n_adapt]
    # Between two consecutive backbone samples sit floor(n/m) or ceil(n/m) adaptation samples.
    gaps = {b - a - 1 for a, b in zip(positions, positions[1:], strict=False)}
    assert gaps <= {n_adapt // n_backbone, -(-n_adapt // n_backbone)}


def test_uniform_order_is_seeded():
    a = epoch_order(10, 5, "uniform", np.random.default_rng(3))
    b = epoch_order(10, 5, "uniform", np.random.default_rng(3))
    c = epoch_order(10, 5, "uniform", np.random.default_rng(4))
    assert a == b and a != c


def test_epochs_become_steps():
    assert total_steps(LoopSettings(steps=None, epochs=3, batch_size=4, grad_accum=2), 17) == 7
    assert total_steps(LoopSettings(steps=None, epochs=3, batch_size=4, grad_accum=2), 5) == 2
    assert total_steps(LoopSettings(steps=50), 17) == 50


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_then_schedule(schedule):
    settings = LoopSettings(steps=100, warmup_steps=10, schedule=schedule)
    factors = [lr_factor(s, settings, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    if schedule == "cosine":
        assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
        assert factors[-1] < 0.01
    else:
        assert factors[-1] == 1.0
