"""`--method hybrid`: the prefilter's candidates and their influence order, by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from batctl.methods.lexical import bm25_scores, bm25_tokens, fit_bm25
from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, lexical_by_hand, mixed_pool_lines, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cli_module):
    root = tmp_path_factory.mktemp("hybrid")
    lm = build_tiny_lm(root / "lm", seed=0)
    domain = write_jsonl(root / "domain.jsonl", color_records(8, seed=1))
    rng = np.random.default_rng(0)
    (root / "pool.jsonl").write_text("\n".join(mixed_pool_lines(24, 5, rng)) + "\n")
    result = cli_module(
        "surrogate", "--model", lm, "--data", domain, "--out", root / "sur", "--steps", "4",
        "--lr", "1e-2", "--targets", "all-linear",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return {
        "root": root,
        "lm": lm,
        "domain": domain,
        "pool": root / "pool.jsonl",
        "sur": root / "sur",
    }


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from batctl.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], terminal_width=200)


def column(path, name):
    return zarr.open_group(str(path / "scores.zarr"), mode="r")[name][:]


def test_hybrid_reranks_the_bm25_top_candidates_by_influence_cosine(setup, cli_module, tmp_path):
    from batctl.influence.target import load_target

    common = ["--model", setup["lm"], "--data", setup["domain"], "--pool", setup["pool"],
              "--surrogate", setup["sur"], "--chunk-size", "8"]  # fmt: skip
    hybrid = tmp_path / "hybrid"
    result = cli_module(
        "score", *common, "--method", "hybrid", "--candidates", "5", "--out", hybrid
    )
    assert result.exit_code == 0, result.stderr
    exact = tmp_path / "influence"
    result = cli_module("score", *common, "--method", "influence", "--normalize", "--out", exact)
    assert result.exit_code == 0, result.stderr

    # by hand: bm25 of every pool text against the adaptation texts, its top 5 rows
    texts = []
    for line in setup["pool"].read_text().splitlines():
        record = json.loads(line)
        texts.append(
            record.get("text")
            or "\n".join(
                str(record[k]) for k in ("instruction", "input", "output") if record.get(k)
            )
        )
    queries = [
        "\n".join(str(r[k]) for k in ("instruction", "input", "output") if r.get(k))
        for r in map(json.loads, setup["domain"].read_text().splitlines())
    ]
    meta = fit_bm25(texts, queries)
    bm25 = bm25_scores(bm25_tokens(texts), meta["query_weights"], meta["idf"], meta["avgdl"])
    candidates = np.sort(np.argsort(-bm25, kind="stable")[:5])
    # candidates: 2 + cosine(r, ∇L(x)) = 2 + (normalised influence score) / ||r||
    target, _ = load_target(exact / "target.safetensors")
    r_norm = np.sqrt(sum(float((t.double() ** 2).sum()) for t in target.r.values()))
    influence = column(exact, "score").astype(np.float64)
    expected = bm25 / (1 + bm25)
    expected[candidates] = 2 + influence[candidates] / r_norm
    got = column(hybrid, "score").astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # every candidate ranks above every other row, in influence order among themselves
    order = np.argsort(-got, kind="stable")
    assert set(order[:5]) == set(candidates)
    assert list(order[:5]) == list(candidates[np.argsort(-influence[candidates], kind="stable")])
    assert (hybrid / "candidates.safetensors").is_file()
    assert zarr.open_group(str(hybrid / "scores.zarr")).attrs["method"] == "hybrid"


def test_fusion_adds_the_z_scores_of_influence_bm25_and_tfidf(setup, cli_module, tmp_path):
    common = ["--model", setup["lm"], "--data", setup["domain"], "--pool", setup["pool"],
              "--surrogate", setup["sur"], "--chunk-size", "8"]  # fmt: skip
    fused = tmp_path / "fusion"
    result = cli_module("score", *common, "--method", "fusion", "--out", fused)
    assert result.exit_code == 0, result.stderr
    exact = tmp_path / "influence"
    result = cli_module("score", *common, "--method", "influence", "--normalize", "--out", exact)
    assert result.exit_code == 0, result.stderr

    records = [json.loads(line) for line in setup["pool"].read_text().splitlines()]

    def text(r):
        return r.get("text") or "\n".join(
            str(r[k]) for k in ("instruction", "input", "output") if r.get(k)
        )

    texts = [text(r) for r in records]
    queries = [text(json.loads(line)) for line in setup["domain"].read_text().splitlines()]
    bm25, tfidf, _ = lexical_by_hand(texts, queries)
    influence = column(exact, "score").astype(np.float64)  # 24 rows: all in influence's sample

    def z(x):
        return (x - x.mean()) / x.std()

    expected = z(bm25) + z(tfidf) + z(influence)
    np.testing.assert_allclose(column(fused, "score"), expected, rtol=1e-4, atol=1e-4)
    # the ablation without influence needs no surrogate
    lexical = tmp_path / "lexical"
    common = [a for a in common if a not in ("--surrogate", str(setup["sur"]), setup["sur"])]
    result = cli_module(
        "score",
        *common,
        "--method",
        "fusion",
        "--fuse",
        "bm25",
        "--fuse",
        "tfidf",
        "--out",
        lexical,
    )
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(column(lexical, "score"), z(bm25) + z(tfidf), rtol=1e-4, atol=1e-4)
    assert {p.name for p in fused.iterdir()} >= {
        "bm25",
        "tfidf",
        "fusion.safetensors",
        "target.safetensors",
    }
