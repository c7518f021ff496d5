"""`--method mmr`: relevance re-ranked for diversity, against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from batctl.methods.lexical import tfidf_rows
from batctl.methods.mmr import mmr_order
from batctl.tiny import build_tiny_lm

from .lm_fixtures import lexical_by_hand

ADAPTATION = [
    "The parser reads the header lines of a message and returns a message object.",
    "A header value is folded when it is longer than the maximum line length.",
    "The generator writes the message object back out as a flat text file.",
    "Each part of a multipart message carries its own content type header.",
]
POOL = [
    "The parser reads the header lines of a message and returns a message object.",  # = D_A[0]
    "Attachments are parts whose content disposition header names a file.",
    "Attachments are parts whose content disposition header names a file.",  # duplicate
    "The policy object controls how header lines are folded and encoded by the generator.",
    "Bananas ripen faster in a paper bag next to apples.",
    "The tide table lists high water times for each harbour along the coast.",
    "A message body may be encoded as quoted printable or base64 text.",
    "Knitting a scarf takes a few evenings with thick wool and large needles.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmr")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ADAPTATION))
    (root / "pool.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(POOL))
    )
    return {"root": root, "lm": build_tiny_lm(root / "lm", seed=0)}


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from batctl.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], terminal_width=200)


def hand_mmr(relevance, vectors, seen_vectors, diversity):
    """The MMR picks, one loop per step, written out as the method's docstring states them."""
    scaled = (relevance - relevance.min()) / (relevance.max() - relevance.min())
    picked: list[int] = []
    for _ in range(len(relevance)):
        best, best_value = None, -np.inf
        for i in range(len(relevance)):
            if i in picked:
                continue
            others = [vectors[j] for j in picked] + list(seen_vectors)
            redundancy = max(float(vectors[i] @ o) for o in others)
            value = (1 - diversity) * scaled[i] - diversity * redundancy
            if value > best_value:
                best, best_value = i, value
        picked.append(best)
    return picked


def expected_store(relevance, idf, count, diversity):
    """The scores an mmr store must hold for this relevance (its docstring's rules): the top
    `count` rows by relevance in hand-computed MMR order above 2, the rest 1 / (1 + e^−rel)."""
    candidates = np.sort(np.argsort(-relevance, kind="stable")[:count])
    vectors = tfidf_rows([POOL[i] for i in candidates], idf).toarray()
    seen = tfidf_rows(ADAPTATION, idf).toarray()
    order = candidates[hand_mmr(relevance[candidates], vectors, seen, diversity)]
    expected = 1 / (1 + np.exp(-relevance))
    expected[order] = 2 + (count - np.arange(count)) / count
    return expected


def test_mmr_ranks_the_fused_top_candidates_for_diversity_as_a_hand_computation(
    setup, cli_module, tmp_path
):
    out = tmp_path / "mmr"
    result = cli_module(
        "score", "--model", setup["lm"], "--data", setup["root"] / "a.jsonl",
        "--pool", setup["root"] / "pool.jsonl", "--method", "mmr", "--fuse", "bm25",
        "--fuse", "tfidf", "--candidates", "6", "--diversity", "0.5", "--chunk-size", "3",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr

    bm25, tfidf, idf = lexical_by_hand(POOL, ADAPTATION)

    def z(x):
        return (x - x.mean()) / x.std()

    relevance = z(bm25) + z(tfidf)
    expected = expected_store(relevance, idf, 6, 0.5)
    got = zarr.open_group(str(out / "scores.zarr"), mode="r")["score"][:].astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # what diversity is for: the copy of an adaptation text is the most relevant row but not
    # the first pick, and the two identical rows are not both near the top
    assert int(np.argmax(relevance)) == 0 and int(np.argmax(expected)) != 0
    ranked = list(np.argsort(-got, kind="stable"))
    # p5 (tides) shares no word with the adaptation set; the second copy of p1 falls below it
    assert relevance[2] > relevance[5] and ranked.index(5) < ranked.index(2)
    assert ranked.index(0) > ranked.index(1)  # the D_A copy below a fresh in-domain row

    # select takes the store as it takes any other: the top k in stored order
    sel = tmp_path / "sel"
    result = cli_module("select", "--scores", out, "--gamma", "0.5", "--out", sel)
    assert result.exit_code == 0, result.stderr
    chosen = json.loads((sel / "gamma-0.5" / "selection.json").read_text())["chosen"]
    assert [c["key"] for c in chosen] == [f"p{i}" for i in ranked[:4]]
    assert zarr.open_group(str(out / "scores.zarr")).attrs["method"] == "mmr"


def test_mmr_needs_a_surrogate_only_when_fuse_names_influence(setup, cli_module, tmp_path):
    common = ["score", "--model", setup["lm"], "--data", setup["root"] / "a.jsonl",
              "--pool", setup["root"] / "pool.jsonl", "--method", "mmr"]  # fmt: skip
    result = cli_module(*common, "--fuse", "influence", "--fuse", "bm25", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--surrogate is required with --method mmr" in result.stderr
    # the default relevance is lexical: no surrogate, and the parts are in the store's identity
    result = cli_module(*common, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.stderr
    params = json.loads((tmp_path / "c" / "manifest.json").read_text())["params"]
    assert params["fuse"] == ["bm25", "tfidf"] and params["diversity"] == 0.5
    assert params["candidates"] == 1024 and "prefilter" not in params and "damping" not in params
    result = cli_module(*common, "--fuse", "bm25", "--fuse", "tfidf", "--diversity", "1",
                        "--candidates", "0", "--out", tmp_path / "b")  # fmt: skip
    assert result.exit_code == 2
    assert "--diversity must be in [0, 1), got 1.0" in result.stderr
    assert "--candidates must be >= 1" in result.stderr


def test_mmr_with_one_fuse_part_reranks_that_methods_relevance(setup, cli_module, tmp_path):
    out = tmp_path / "mmr-bm25"
    common = ["score", "--model", setup["lm"], "--data", setup["root"] / "a.jsonl",
              "--pool", setup["root"] / "pool.jsonl"]  # fmt: skip
    result = cli_module(*common, "--method", "mmr", "--fuse", "bm25", "--candidates", "5",
                        "--diversity", "0.5", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr

    bm25, _, idf = lexical_by_hand(POOL, ADAPTATION)
    relevance = (bm25 - bm25.mean()) / bm25.std()
    expected = expected_store(relevance, idf, 5, 0.5)
    got = zarr.open_group(str(out / "scores.zarr"), mode="r")["score"][:].astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    params = json.loads((out / "manifest.json").read_text())["params"]
    assert params["fuse"] == ["bm25"]
    # a fusion of one part is no fusion: refused, naming the flag and what it needs
    result = cli_module(*common, "--method", "fusion", "--fuse", "bm25", "--out", tmp_path / "f")
    assert result.exit_code == 2
    assert "--fuse: give two or more of influence, bm25, tfidf, embed with --method fusion" in (
        result.stderr
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 7).flatmap(
        lambda m: st.tuples(
            st.lists(st.floats(0, 1), min_size=m, max_size=m),
            st.lists(st.floats(0, 1), min_size=m * m, max_size=m * m),
            st.lists(st.floats(0, 1), min_size=m, max_size=m),
            st.floats(0, 0.99),
        )
    )
)
def test_mmr_order_is_a_permutation_that_takes_the_best_marginal_value_each_step(case):
    relevance, flat, seen, diversity = case
    m = len(relevance)
    relevance, seen = np.array(relevance), np.array(seen)
    similarity = np.array(flat).reshape(m, m)
    similarity = (similarity + similarity.T) / 2
    order = mmr_order(relevance, similarity, seen, diversity)
    assert sorted(order.tolist()) == list(range(m))
    redundancy = seen.copy()
    for t, pick in enumerate(order):
        rest = [i for i in range(m) if i not in order[:t]]
        values = {i: (1 - diversity) * relevance[i] - diversity * redundancy[i] for i in rest}
        assert values[pick] == max(values.values())
        assert pick == min(i for i in rest if values[i] == values[pick])  # ties: lower index
        redundancy = np.maximum(redundancy, similarity[:, pick])
    if diversity == 0:
        assert order.tolist() == np.argsort(-relevance, kind="stable").tolist()


def test_candidates_default_to_the_methods_own_count_and_enter_its_identity():
    from batctl.stages.score import ScoreConfig

    mmr, hybrid = ScoreConfig(method="mmr"), ScoreConfig(method="hybrid")
    assert (mmr.candidate_count, hybrid.candidate_count) == (1024, 256)
    assert mmr.params()["candidates"] == 1024 and hybrid.params()["candidates"] == 256
    assert ScoreConfig(method="mmr", candidates=64).params()["candidates"] == 64
    # mmr over embeddings alone keeps the count it was measured with (the dev digits)
    assert ScoreConfig(method="mmr", fuse=("embed",)).candidate_count == 256
    # and its identity differs from the TF-IDF-redundancy stores written before it existed
    assert ScoreConfig(method="mmr", fuse=("embed",)).params()["similarity"] == "embed"
    assert "similarity" not in mmr.params()
    assert "candidates" not in ScoreConfig(method="bm25").params()
