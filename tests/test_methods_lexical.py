"""The text baselines against their definitions and against the libraries they come from."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from batctl.methods.lexical import (
    bm25_scores,
    bm25_tokens,
    dsir_counts,
    fit_bm25,
    fit_dsir,
    fit_tfidf,
    smooth_idf,
    tfidf_rows,
)

CORPUS = [
    "the cat sat on the mat mat",
    "dogs chase cats in the park",
    "a mime header in an email message",
    "email headers and MIME parts parts",
    "an event loop schedules coroutines and futures",
]
QUERIES = ["cat on a mat", "email MIME headers cat"]


def test_bm25_matches_its_formula_on_three_documents():
    docs = ["cat mat", "cat cat dog", "bird"]
    queries = ["cat", "mat dog"]
    meta = fit_bm25(docs, queries)
    # by hand: N = 3, lengths 2, 3, 1 (avgdl 2), k1 = 1.5, b = 0.75, Lucene idf
    n, avgdl, k1, b = 3, 2.0, 1.5, 0.75

    def idf(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def tfc(tf, length):
        return tf / (tf + k1 * (1 - b + b * length / avgdl))

    expected = [
        idf(2) * tfc(1, 2) + idf(1) * tfc(1, 2),  # cat (query 1) + mat (query 2)
        idf(2) * tfc(2, 3) + idf(1) * tfc(1, 3),  # cat ×2 + dog
        0.0,
    ]
    assert meta["n_docs"] == 3 and meta["avgdl"] == pytest.approx(avgdl)
    got = bm25_scores(bm25_tokens(docs), meta["query_weights"], meta["idf"], meta["avgdl"])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bm25_equals_bm25s_summed_over_queries():
    import bm25s

    tokens = bm25_tokens(CORPUS)
    index = bm25s.BM25()
    index.index(tokens, show_progress=False)
    reference = sum(index.get_scores(q) for q in bm25_tokens(QUERIES))
    meta = fit_bm25(iter(CORPUS), QUERIES)
    got = bm25_scores(tokens, meta["query_weights"], meta["idf"], meta["avgdl"])
    np.testing.assert_allclose(got, reference, rtol=1e-6)


def test_tfidf_cosine_equals_scikit_learn_vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(stop_words="english").fit(CORPUS)
    pool = vectorizer.transform(CORPUS).toarray()
    centroid = vectorizer.transform(QUERIES).toarray().mean(axis=0)
    reference = pool @ centroid / np.linalg.norm(centroid)

    df, n_docs = fit_tfidf(iter(CORPUS))
    idf = smooth_idf(df, n_docs)
    ours_centroid = np.asarray(tfidf_rows(QUERIES, idf).mean(axis=0)).ravel()
    got = tfidf_rows(CORPUS, idf) @ (ours_centroid / np.linalg.norm(ours_centroid))
    np.testing.assert_allclose(np.asarray(got).ravel(), reference, rtol=1e-9, atol=1e-12)


def test_dsir_equals_the_data_selection_package(tmp_path):
    from data_selection import HashedNgramDSIR

    raw = tmp_path / "raw.jsonl"
    target = tmp_path / "target.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    target.write_text("".join(json.dumps({"text": t}) + "\n" for t in QUERIES))
    dsir = HashedNgramDSIR([str(raw)], [str(target)], cache_dir=str(tmp_path / "cache"), num_proc=1)
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    reference = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")

    log_diff = fit_dsir(iter(CORPUS), QUERIES)
    np.testing.assert_allclose(log_diff, dsir.log_diff, rtol=1e-12)
    got = np.array([log_diff @ dsir_counts(t) for t in CORPUS])
    np.testing.assert_allclose(got, reference, rtol=1e-12)
