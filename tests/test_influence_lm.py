"""Influence on a tiny LLaMA with LoRA and DoRA: hooks and engines against brute force.

The surrogate is a real one: a LoRA/DoRA adapter trained for a few Adam steps on 8 Alpaca
records of one small domain (not to convergence, so the target gradient is not ~0). Exactness
checks run in float64 (the model converted with ``.to(torch.float64)``), fd in float32.
"""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch

from batctl.data import open_pool
from batctl.influence.engines import FDEngine, HooksEngine, NonFiniteInBatch, make_engine
from batctl.influence.grads import per_sample_grads
from batctl.influence.layers import InfluenceError, discover_layers
from batctl.influence.target import build_target, prepare_target
from batctl.tasks.base import AdapterSettings, Task, TaskSettings
from batctl.tasks.lm import LMTask
from batctl.tiny import build_tiny_lm
from tests.test_influence_math import brute_force_grads, brute_force_scores, max_rel, spearman

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
WORDS = "the quick brown fox jumps over a lazy dog photo cat house by the sea".split()


def _records(seed):
    rng = random.Random(seed)

    def color():
        n = rng.randint(1, 99)
        return {
            "instruction": f"What color is item {n}?",
            "input": "",
            "output": f"Item {n} is {rng.choice(COLORS)}.",
        }

    def text():
        return {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))}

    adaptation = [color() for _ in range(8)]
    # 32 pool samples: Spearman > 0.999 then tolerates one swap of two near-tied scores.
    pool = [color() for _ in range(16)] + [text() for _ in range(16)]
    return adaptation, pool


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence_lm")
    model = build_tiny_lm(root / "lm", hidden_size=32, num_layers=2)
    adaptation, pool = _records(0)
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in adaptation))
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    return model, list(open_pool([str(root / "a.jsonl")])), list(open_pool([str(root / "p.jsonl")]))


def _surrogate(model, adaptation, kind):
    task = LMTask(TaskSettings(str(model)))
    task.add_adapter(
        AdapterSettings(kind=kind, rank=4, targets=("q_proj", "v_proj", "down_proj")), seed=0
    )
    params = list(task.trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=1e-2)
    batch = task.collate(adaptation, "adaptation")
    for _ in range(30):
        loss = task.per_sample_loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task


class Surrogates:
    """One trained surrogate per adapter kind, and its exact references, built on first use."""

    def __init__(self, data):
        self.data = data
        self.built = {}

    def get(self, kind):
        """(kind, task in float64, adaptation, pool, exact) with exact = (hooked per-sample
        grads, brute-force grads, woodbury target, brute-force pool scores, their per-layer terms)."""
        model, adaptation, pool = self.data
        if kind not in self.built:
            task = _surrogate(model, adaptation, kind)
            task.model.to(torch.float64)
            grads = per_sample_grads(task, adaptation, batch_size=4)
            target = build_target(grads, preconditioner="woodbury")
            reference = brute_force_grads(task, adaptation, 4)
            scores, per_layer = brute_force_scores(brute_force_grads(task, pool, 8, "pool"), target)
            self.built[kind] = (task, (grads, reference, target, scores, per_layer))
        task, exact = self.built[kind]
        task.model.to(torch.float64)
        return kind, task, adaptation, pool, exact


@pytest.fixture(scope="module")
def surrogates(data):
    return Surrogates(data)


@pytest.fixture(params=["lora", "dora"])
def surrogate(request, surrogates):
    return surrogates.get(request.param)


def test_every_trainable_parameter_is_a_layer_hooked_or_generic(surrogate):
    kind, task, _, _, _ = surrogate
    layers = discover_layers(task)
    assert layers.names == list(task.trainable_parameters())
    assert {x.name for x in layers.hooked} | {x.name for x in layers.generic} == set(layers.names)
    assert {x.kind for x in layers.hooked} == {"linear"}
    assert all(".lora_A." in x.name or ".lora_B." in x.name for x in layers.hooked)
    generic = {x.name for x in layers.generic}
    if kind == "lora":
        assert not generic
    else:  # DoRA's magnitude vectors: one per adapted module, 3 targets x 2 layers
        assert len(generic) == 6 and all("lora_magnitude_vector" in n for n in generic)


def test_hook_per_sample_gradients_equal_brute_force(surrogate):
    grads, reference, _, _, _ = surrogate[4]
    assert grads.finite.all()
    errors = {name: max_rel(grads.grads[name], reference[name]) for name in reference}
    assert max(errors.values()) < 1e-8, errors


def test_hooks_scores_equal_brute_force(surrogate):
    kind, task, _, pool, exact = surrogate
    _, _, target, expected, expected_layers = exact
    batch = task.collate(pool, "pool")
    for p in task.trainable_parameters().values():
        p.grad = None
    got = HooksEngine(task, target).score(batch, layer_scores=True)
    assert max_rel(got.scores, expected) < 1e-6
    assert max_rel(got.layer_scores, expected_layers) < 1e-6
    assert torch.allclose(got.layer_scores.sum(1), got.scores, rtol=1e-12, atol=0)
    with torch.no_grad():  # a caller's no_grad does not stop the engine's own backward
        plain = make_engine("hooks", task, target).score(batch)
    assert max_rel(plain.scores, expected) < 1e-6 and plain.layer_scores is None
    hooked = [m.module for m in discover_layers(task).modules]
    assert not any(m._forward_hooks for m in hooked)  # nothing left behind between batches
    assert all(p.grad is None for p in task.trainable_parameters().values())  # no weight grads
    if kind == "dora":  # the other exact route for generic layers
        other = HooksEngine(task, target, generic="double_backward").score(batch)
        assert max_rel(other.scores, expected) < 1e-6


def test_normalized_scores_are_scores_over_brute_force_gradient_norms(surrogate):
    kind, task, _, pool, exact = surrogate
    _, _, target, expected, expected_layers = exact
    grads = brute_force_grads(task, pool, 8, "pool")
    norms = torch.stack([g.square().sum(1) for g in grads.values()]).sum(0).sqrt()
    got = HooksEngine(task, target, normalize=True).score(
        task.collate(pool, "pool"), layer_scores=True
    )
    assert max_rel(got.scores, expected / norms) < 1e-6
    assert max_rel(got.layer_scores, expected_layers / norms[:, None]) < 1e-6
    if kind == "dora":  # magnitudes' gradients come from the kept graph, not the hooks
        assert any("lora_magnitude_vector" in name for name in grads)
    # the ranking changes: otherwise the test could not tell normalising from not
    assert torch.argsort(got.scores).tolist() != torch.argsort(expected).tolist()


def test_fd_scores_in_float32_rank_like_the_exact_ones(surrogate):
    kind, task, adaptation, pool, exact = surrogate
    _, _, target, expected, _ = exact
    task.model.to(torch.float32)
    try:
        before = {n: p.detach().clone() for n, p in task.trainable_parameters().items()}
        calibration = task.collate(adaptation, "adaptation")
        engine = FDEngine(task, target, calibration=calibration)
        got = engine.score(task.collate(pool, "pool"))
        rho = spearman(got.scores, expected)
        assert rho > 0.999, (kind, rho, engine.calibration)
        assert max_rel(got.scores, expected) < 2e-2
        for n, p in task.trainable_parameters().items():  # restored bit for bit
            assert torch.equal(p, before[n])
        again = FDEngine(task, target, calibration=calibration)
        assert again.eps == engine.eps  # the same calibration batch gives the same step
        with pytest.raises(InfluenceError, match="per-layer"):
            engine.score(calibration, layer_scores=True)
    finally:
        task.model.to(torch.float64)


def test_prepare_target_streams_a_separate_target_set(surrogate):
    kind, task, adaptation, pool, exact = surrogate
    grads, _, _, _, _ = exact
    held_out = pool[:5]
    # Same batching as `exact`: LMTask's loss is float32 (see the report), so padding to another
    # width moves it by float32 rounding.
    got = prepare_target(task, adaptation, held_out, preconditioner="auto", batch_size=4)
    expected = build_target(grads, per_sample_grads(task, held_out, 4), preconditioner="woodbury")
    assert got.preconditioner == "woodbury" and got.n_target == 5
    for name in expected.layers:
        assert max_rel(got.r[name], expected.r[name]) < 1e-8
        assert math.isclose(got.damping[name], expected.damping[name], rel_tol=1e-12)
    assert math.isclose(got.ratio, expected.ratio, rel_tol=1e-8)
    with pytest.raises(InfluenceError, match="empty"):
        prepare_target(task, [])


# ----------------------------------------------------------------------------- non-finite


class PoisonedLM(Task):
    """The real LMTask, with one sample made non-finite: its loss (``how="loss"``: + inf) or its
    input embeddings (``how="activations"``: NaN, so the whole forward of that row is NaN)."""

    family = "lm"

    def __init__(self, inner: LMTask, key: str, how: str) -> None:
        self.inner, self.key, self.how = inner, key, how
        self.model, self.device = inner.model, inner.device

    def add_adapter(self, adapter, seed):
        raise NotImplementedError

    def load_adapter(self, path, trainable=False):
        raise NotImplementedError

    def save_adapter(self, path):
        raise NotImplementedError

    def collate(self, samples, role):
        batch = self.inner.collate(samples, role)
        batch["poison"] = torch.tensor([s.key == self.key for s in samples])
        return batch

    def per_sample_loss(self, batch):
        poison = batch["poison"].to(self.device)
        if self.how == "loss":
            loss = self.inner.per_sample_loss(batch)
            return loss + torch.where(poison, math.inf, 0.0).to(loss.dtype)

        def nan_rows(module, args, out):
            return torch.where(poison[:, None, None], torch.full_like(out, math.nan), out)

        handle = self.inner.base.get_input_embeddings().register_forward_hook(nan_rows)
        try:
            return self.inner.per_sample_loss(batch)
        finally:
            handle.remove()


@pytest.mark.parametrize("how", ["loss", "activations"])
def test_a_non_finite_sample_gets_nan_and_poisons_nothing_else(surrogates, how, caplog):
    # DoRA: it has generic layers too, whose batch-summed gradients a NaN row could reach.
    _, task, adaptation, pool, exact = surrogates.get("dora")
    _, _, target, _, _ = exact
    bad = pool[3].key
    poisoned = PoisonedLM(task, bad, how)
    clean = PoisonedLM(task, "no such key", how)
    batch, clean_batch = poisoned.collate(pool, "pool"), clean.collate(pool, "pool")
    others = torch.arange(len(pool)) != 3
    for engine in ("hooks", "fd"):
        per_layer = engine == "hooks"
        got = make_engine(engine, poisoned, target).score(batch, layer_scores=per_layer)
        ref = make_engine(engine, clean, target).score(clean_batch, layer_scores=per_layer)
        assert math.isnan(float(got.scores[3])) and not bool(got.finite[3])
        assert bool(got.finite[others].all()), engine
        assert max_rel(got.scores[others], ref.scores[others]) < 1e-10, engine
        if per_layer:
            assert torch.isnan(got.layer_scores[3]).all()
            assert torch.equal(got.layer_scores[others], ref.layer_scores[others])
    with caplog.at_level(logging.WARNING, logger="batctl.influence"):
        grads = per_sample_grads(poisoned, adaptation[:3] + pool[3:4], batch_size=4)
    assert grads.finite.tolist() == [True, True, True, False]
    assert bad in caplog.text
    reference = per_sample_grads(task, adaptation[:3], batch_size=4)
    for name, g in grads.grads.items():
        assert torch.isnan(g[3]).all()
        assert max_rel(g[:3], reference.grads[name]) < 1e-8
    target_bad = build_target(grads)
    assert target_bad.n_adaptation == 3


class ReversedLM(PoisonedLM):
    """Returns its losses in reverse order: hooks would credit gradients to the wrong sample."""

    def per_sample_loss(self, batch):
        return self.inner.per_sample_loss(batch).flip(0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_non_finite_sample_spoils_no_other_normalized_score(surrogates, kind):
    from batctl.methods.influence import score_batch

    _, task, _, pool, exact = surrogates.get(kind)
    target = exact[2]
    poisoned = PoisonedLM(task, pool[3].key, "activations")
    clean = PoisonedLM(task, "no such key", "activations")
    engine = HooksEngine(poisoned, target, normalize=True)
    reference = HooksEngine(clean, target, normalize=True).score(clean.collate(pool, "pool"))
    if kind == "dora":  # its magnitudes' norms come from one batched backward: refused ...
        with pytest.raises(NonFiniteInBatch):
            engine.score(poisoned.collate(pool, "pool"))
    # ... and the score stage then takes the batch one sample at a time
    got = dict(score_batch(pool, poisoned, engine, want_layers=False, strict=False))
    scores = torch.tensor([got[i][0] for i in range(len(pool))], dtype=torch.float64)
    others = torch.arange(len(pool)) != 3
    assert math.isnan(float(scores[3]))
    assert torch.isfinite(scores[others]).all() and (scores[others] != 0).all()
    assert max_rel(scores[others], reference.scores[others]) < 1e-6


class TwiceLM(PoisonedLM):
    """Every adapter module called twice per sample: L = L(x) + L(x)/2 from two forwards."""

    def __init__(self, inner: LMTask) -> None:
        super().__init__(inner, "no such key", "loss")

    def per_sample_loss(self, batch):
        return self.inner.per_sample_loss(batch) + 0.5 * self.inner.per_sample_loss(batch)


def test_normalized_scores_of_modules_called_twice_sum_before_the_norm(surrogates):
    _, task, _, pool, exact = surrogates.get("lora")
    target = exact[2]
    twice = TwiceLM(task)
    grads = brute_force_grads(twice, pool, 8, "pool")
    expected, _ = brute_force_scores(grads, target)
    norms = torch.stack([g.square().sum(1) for g in grads.values()]).sum(0).sqrt()
    got = HooksEngine(twice, target, normalize=True).score(twice.collate(pool, "pool"))
    assert max_rel(got.scores, expected / norms) < 1e-6


def test_hooks_are_checked_against_autograd(surrogates):
    _, task, adaptation, _, _ = surrogates.get("lora")
    with pytest.raises(InfluenceError, match="reaches other samples' rows"):
        per_sample_grads(ReversedLM(task, "", "loss"), adaptation[:4], batch_size=4)
