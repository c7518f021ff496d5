"""The LM demo: its stdlib corpus, the world split and cache, and `batctl demo` end to end."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from batctl.demo import lm as demo_lm
from batctl.demo.stdlib import DOMAINS, clip, docstring_paragraphs, read_corpus
from batctl.demo.world import World, cached_world


@pytest.fixture(scope="module")
def corpus():
    return read_corpus()


def test_docstring_paragraphs_split_collapse_and_drop_short_ones():
    source = textwrap.dedent(
        '''
        """Module summary that is long enough to be kept as a paragraph.

        Short.
        """
        class A:
            """Class   docstring
            spread over lines, long enough to keep."""
            def f(self):
                pass
        '''
    )
    assert list(docstring_paragraphs(source)) == [
        "Module summary that is long enough to be kept as a paragraph.",
        "Class docstring spread over lines, long enough to keep.",
    ]
    assert list(docstring_paragraphs("def broken(:\n")) == []
    assert clip("word " * 100, 23) == "word word word word"


def test_the_stdlib_corpus_has_the_target_domain_and_no_test_suites(corpus):
    domains = {p.domain for p in corpus}
    assert demo_lm.TARGET in domains and domains <= set(DOMAINS)
    assert len({p.text for p in corpus}) == len(corpus)  # repeats kept once
    assert all(40 <= len(p.text) <= 300 for p in corpus)
    email = [p.text for p in corpus if p.domain == "email"]
    assert len(email) >= 2 * demo_lm.N_ADAPTATION + demo_lm.N_HELDOUT
    assert any("header" in t.lower() for t in email)  # it really is about email


def test_split_is_disjoint_seeded_and_keys_carry_the_domain(corpus):
    parts = demo_lm.split(corpus, seed=0)
    keys = {name: [r["id"] for r in rows] for name, rows in parts.items()}
    assert len(keys["adaptation"]) == demo_lm.N_ADAPTATION
    assert len(keys["heldout"]) == demo_lm.N_HELDOUT
    assert not set(keys["heldout"]) & (set(keys["pool"]) | set(keys["adaptation"]))
    assert not set(keys["adaptation"]) & set(keys["pool"])
    target_in_pool = {k for k in keys["pool"] if World.domain_of(k) == demo_lm.TARGET}
    assert set(keys["oracle"]) == set(keys["adaptation"]) | target_in_pool
    assert len(keys["pool"]) + demo_lm.N_ADAPTATION + demo_lm.N_HELDOUT == len(corpus)
    assert all(World.domain_of(k) == demo_lm.TARGET for k in keys["heldout"])
    assert demo_lm.split(corpus, seed=0) == parts
    assert demo_lm.split(corpus, seed=1)["adaptation"] != parts["adaptation"]


def test_an_error_inside_the_world_build_is_raised_after_one_build(tmp_path):
    from batctl.errors import BatctlError

    calls = []

    def build(work):
        calls.append(work)
        raise BatctlError("the corpus is missing")

    with pytest.raises(BatctlError, match="the corpus is missing"):
        cached_world("t", {"v": 1}, build, cache=tmp_path)
    assert len(calls) == 1


def test_cached_world_is_built_once_and_a_broken_entry_is_rebuilt(tmp_path):
    calls = []

    def build(work):
        calls.append(work)
        (work / "data").mkdir()
        for name in ("a.jsonl", "h.jsonl", "o.jsonl", "p.jsonl"):
            (work / "data" / name).write_text('{"id": "x-00000", "text": "t"}\n')
        (work / "model").mkdir()
        return World(
            family="lm",
            root=work,
            model=work / "model",
            adaptation=work / "data" / "a.jsonl",
            heldout=work / "data" / "h.jsonl",
            oracle=work / "data" / "o.jsonl",
            pool=(work / "data" / "p.jsonl",),
            target="x",
            pool_domains={"x": 1, "y": 3},
        )

    # A tuple in the params is a list in the manifest: the rerun must still compare equal.
    world, built = cached_world("t", {"v": (1,)}, build, cache=tmp_path)
    assert built and world.root.parent == tmp_path / "demo" and world.base_rate == 0.25
    assert world.pool[0].read_text().startswith('{"id"')
    again, built = cached_world("t", {"v": (1,)}, build, cache=tmp_path)
    assert not built and again == world and len(calls) == 1
    (world.root / "manifest.json").unlink()  # as a crash mid-build would leave it
    _, built = cached_world("t", {"v": (1,)}, build, cache=tmp_path)
    assert built and len(calls) == 2
    other, _ = cached_world("t", {"v": 2}, build, cache=tmp_path)
    assert other.root != world.root


@pytest.fixture
def quick_recipe(monkeypatch):
    """The LM demo's recipe cut short: a few pretraining and training steps, and an eighth of
    the other domains' paragraphs (every target paragraph is kept), so the pool scores fast."""
    corpus = read_corpus()
    small = [p for i, p in enumerate(corpus) if p.domain == demo_lm.TARGET or i % 8 == 0]
    monkeypatch.setattr(demo_lm, "read_corpus", lambda: small)
    monkeypatch.setitem(demo_lm.PRETRAIN, "max_steps", 6)
    train = {**demo_lm.TRAIN_FLAGS, "steps": 4}
    monkeypatch.setitem(demo_lm.RECIPE, "train_flags", train)
    monkeypatch.setitem(demo_lm.RECIPE, "oracle_flags", {**train, "steps": 8})
    monkeypatch.setitem(demo_lm.RECIPE, "surrogate_flags", {**train, "steps": 2, "warmup_steps": 1})


def test_demo_runs_the_whole_pipeline_and_reports(cli, tmp_path, monkeypatch, quick_recipe):
    monkeypatch.setenv("BATCTL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--gamma", "0.5,0.9", "--reselect-every", "2", "--json")
    assert result.exit_code == 0, result.stderr
    # the paper's ALBAT loop, from mmr's selection and store, is a row of its own
    assert "| mmr-dynamic-g0.5 |" in json.loads(result.stdout)["table"]
    assert (out / "train" / "mmr-dynamic-g0.5" / "reselect.jsonl").is_file()
    payload = json.loads(result.stdout)
    assert (
        "| mmr-g0.5 |" in payload["table"]
        and "| bm25-g0.5 |" in payload["table"]
        and "oracle θ*" in payload["table"]
    )
    for name in (
        "scores-mmr",
        "scores-bm25",
        "select-mmr",
        "select-bm25",
        "select-random",
        "oracle",
    ):
        assert (out / name / "manifest.json").is_file(), name
    for label in ("none", "random-g0.5", "random-g0.9", "mmr-g0.5", "bm25-g0.9"):
        assert (out / "train" / label / "adapter_model.safetensors").is_file(), label
    report = out / "report"
    for name in (
        "results.json",
        "table.md",
        "heldout_loss.png",
        "weight_diff.png",
        "train_loss.png",
        "scores.png",
    ):
        assert (report / name).is_file(), name

    results = json.loads((report / "results.json").read_text())
    world = World.load(results["world"])
    assert results["base_rate"] == pytest.approx(world.base_rate) and 0 < world.base_rate < 0.5
    rows = {r["adapter"]: r for r in results["rows"]}
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["rows"]
    for label, row in rows.items():
        assert row["heldout_loss"] == pytest.approx(metrics[label]["heldout_loss"])
        assert math.isfinite(row["weight_diff_rel"]) and row["weight_diff_rel"] > 0
    # γ = 0.5 adds k = n samples; their domain make-up is read from the selection itself.
    chosen = json.loads((out / "select-mmr" / "gamma-0.5" / "selection.json").read_text())
    keys = [c["key"] for c in chosen["chosen"]]
    assert rows["mmr-g0.5"]["selected"] == len(keys) == demo_lm.N_ADAPTATION
    share = sum(World.domain_of(k) == "email" for k in keys) / len(keys)
    assert rows["mmr-g0.5"]["target_share"] == pytest.approx(share)

    # the recipe reached the stages: train's own steps; the default methods read no surrogate,
    # so none is trained
    train_log = (out / "train" / "none" / "log.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in train_log) == 4
    assert not (out / "surrogate").exists()
    score_params = json.loads((out / "scores-mmr" / "manifest.json").read_text())["params"]
    assert score_params["fuse"] == ["bm25", "tfidf"] and "surrogate" not in score_params

    again = cli("demo", "--out", out, "--gamma", "0.5,0.9", "--reselect-every", "2", "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["table"] == payload["table"]
    assert "building the lm demo world" not in again.stderr
