"""The cheap text baselines a practitioner reaches for first (DESIGN §5b), as score-store methods.

Each one reads the text of every pool sample (an LM record's text, an image's caption) and of
the adaptation set (its texts, or the instance prompt for captionless DreamBooth images):

- `bm25`: Okapi BM25 (Lucene's variant, bm25s' default: k1 = 1.5, b = 0.75), every adaptation
  sample a query against the pool as the corpus, the n query scores summed. Tokens as bm25s
  makes them (lower case, words of 2+ characters, English stop words dropped).
- `tfidf`: cosine between a pool sample's TF-IDF vector and the centroid of the adaptation
  samples' (scikit-learn's tf · (ln((1 + N)/(1 + df)) + 1), rows L2-normalised; terms hashed
  into 2^20 columns by HashingVectorizer so the corpus statistics fit in constant memory).
- `dsir`: DSIR's log importance weight (Xie et al. 2023, the `data-selection` package's hashed
  n-gram featuriser): log p_target(x) − log p_pool(x) under bag-of-hashed-{1,2}-grams models fit
  on the adaptation set and on the pool.

All three need corpus statistics (document frequencies, the pool's n-gram distribution), so
`prepare` makes one streaming pass over the pool's text first and saves them in the score
work directory: every shard and every resumed run scores against the same statistics.
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batctl.data import Sample
from batctl.methods.base import Method, Result, Scorer, target_samples, text_of

log = logging.getLogger("batctl.score")

STATE = "method.safetensors"
"""Where a method's fitted state lives in the score directory (arrays + JSON metadata)."""


def pool_texts(pool: Any) -> Iterator[str]:
    """The text of every readable pool sample, in pool order (unreadable ones are skipped)."""
    from batctl.data import BadSample

    for row in pool.iter_rows():
        if type(row) is BadSample:
            continue
        sample = pool.decoded(row) if not row.record else row
        if type(sample) is BadSample:
            continue
        yield text_of(sample)


def adaptation_texts(config: Any) -> list[str]:
    """The adaptation set's texts (--data; --target when given, since it defines the target)."""
    samples = target_samples(config)
    return [text_of(s, getattr(config, "instance_prompt", None)) for s in samples]


def save_state(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write arrays and JSON metadata to safetensors atomically (a kill leaves no half file)."""
    from safetensors.numpy import save_file

    staging = path.with_name(path.name + ".tmp")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())},
        str(staging),
        metadata={"state": json.dumps(meta, sort_keys=True, allow_nan=False)},
    )
    os.replace(staging, path)


def load_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata `save_state` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
        meta = json.loads(f.metadata()["state"])
    return arrays, meta


class TextMethod(Method):
    """A text method: `fit` its state once from the pool's and the adaptation set's texts
    (saved as method.safetensors in the score directory), then build its scorer from it."""

    def prepare(self, work: Path, pool: Any, config: Any) -> Scorer:
        path = work / STATE
        if not path.is_file():
            queries = adaptation_texts(config)
            arrays, meta = self.fit(pool_texts(pool), queries)
            save_state(path, arrays, {**meta, "n_adaptation": len(queries)})
            log.info("%s: fit on the pool and %d adaptation texts", self.name, len(queries))
        return self.scorer(*load_state(path))

    @abc.abstractmethod
    def fit(
        self, texts: Iterable[str], queries: Sequence[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON metadata) from one pass over the pool's texts and the queries."""

    @abc.abstractmethod
    def scorer(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Scorer:
        """The scorer for a fitted state."""


# ---------------------------------------------------------------------------------------- BM25

K1, B = 1.5, 0.75
"""bm25s' defaults (and Lucene's)."""


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """bm25s' tokenisation: lower case, `\\b\\w\\w+\\b`, English stop words removed."""
    import bm25s

    if not texts:
        return []
    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def bm25_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """Lucene's idf: ln(1 + (N − df + 0.5) / (df + 0.5)), never negative."""
    return np.log1p((n_docs - df + 0.5) / (df + 0.5))


def bm25_scores(
    docs: Sequence[Sequence[str]],
    query_weights: dict[str, float],
    idf: dict[str, float],
    avgdl: float,
    k1: float = K1,
    b: float = B,
) -> np.ndarray:
    """Σ_t w_t · idf_t · tf / (tf + k1 (1 − b + b |d| / avgdl)) for each tokenised doc.

    `query_weights`: how often each term occurs over all queries (summing the BM25 score of n
    queries is one query with the terms' total counts). Returns f64[len(docs)].
    """
    out = np.zeros(len(docs))
    for i, doc in enumerate(docs):
        if not doc:
            continue
        counts = Counter(t for t in doc if t in query_weights)
        norm = k1 * (1 - b + b * len(doc) / avgdl) if avgdl > 0 else k1
        out[i] = sum(query_weights[t] * idf[t] * tf / (tf + norm) for t, tf in counts.items())
    return out


class Bm25Scorer(Scorer):
    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.n_adaptation = int(meta["n_adaptation"])
        self.weights = {t: float(w) for t, w in meta["query_weights"].items()}
        self.idf = {t: float(v) for t, v in meta["idf"].items()}
        self.avgdl = float(meta["avgdl"])

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        docs = bm25_tokens([text_of(s) for s in samples])
        values = bm25_scores(docs, self.weights, self.idf, self.avgdl)
        return [(float(v), None) for v in values]

    def attrs(self) -> dict[str, Any]:
        return {"k1": K1, "b": B, "avgdl": self.avgdl}


def fit_bm25(texts: Iterable[str], queries: Sequence[str]) -> dict[str, Any]:
    """Corpus statistics BM25 needs for these queries: N, avgdl, and df and idf of the query
    terms only (all that a query's score reads), in one streaming pass over the corpus."""
    weights = Counter(t for q in bm25_tokens(queries) for t in q)
    df: Counter[str] = Counter()
    n_docs = total = 0
    batch: list[str] = []

    def consume(batch: list[str]) -> None:
        nonlocal n_docs, total
        for doc in bm25_tokens(batch):
            n_docs += 1
            total += len(doc)
            df.update(set(doc) & weights.keys())

    for text in texts:
        batch.append(text)
        if len(batch) == 4096:
            consume(batch)
            batch = []
    consume(batch)
    terms = sorted(weights)
    idf = bm25_idf(np.array([df[t] for t in terms], dtype=np.float64), n_docs)
    return {
        "n_docs": n_docs,
        "avgdl": total / n_docs if n_docs else 0.0,
        "query_weights": {t: weights[t] for t in terms},
        "df": {t: df[t] for t in terms},
        "idf": {t: float(v) for t, v in zip(terms, idf, strict=True)},
    }


class Bm25(TextMethod):
    name = "bm25"

    def fit(self, texts: Iterable[str], queries: Sequence[str]) -> tuple[dict, dict]:
        return {}, fit_bm25(texts, queries)

    def scorer(self, arrays: dict, meta: dict) -> Scorer:
        return Bm25Scorer(arrays, meta)


# ---------------------------------------------------------------------------------------- TF-IDF

TFIDF_FEATURES = 2**20


def tfidf_vectorizer() -> Any:
    """Term counts hashed into 2^20 columns: scikit-learn's tokenisation (lower case,
    `\\b\\w\\w+\\b`, English stop words), no sign flipping, no normalisation (idf comes next)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=TFIDF_FEATURES, alternate_sign=False, norm=None, stop_words="english"
    )


def tfidf_rows(texts: Sequence[str], idf: np.ndarray) -> Any:
    """L2-normalised TF-IDF rows (scipy CSR) of `texts`, as TfidfTransformer computes them."""
    from scipy.sparse import csr_matrix
    from sklearn.preprocessing import normalize

    texts = list(texts)
    if not texts:  # a chunk with nothing readable; scikit-learn refuses an empty batch
        return csr_matrix((0, TFIDF_FEATURES))
    counts = tfidf_vectorizer().transform(texts)
    return normalize(counts.multiply(idf).tocsr(), norm="l2")


def fit_tfidf(texts: Iterable[str]) -> tuple[np.ndarray, int]:
    """Document frequency of every hashed term over the corpus, and the corpus size."""
    vectorizer = tfidf_vectorizer()
    df = np.zeros(TFIDF_FEATURES, dtype=np.int64)
    n_docs = 0
    batch: list[str] = []
    for text in [*texts, None]:
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) == 4096):
            counts = vectorizer.transform(batch)
            df += np.bincount(counts.indices, minlength=TFIDF_FEATURES)
            n_docs += len(batch)
            batch = []
    return df, n_docs


def smooth_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """scikit-learn's default idf: ln((1 + N) / (1 + df)) + 1."""
    return np.log((1 + n_docs) / (1 + df.astype(np.float64))) + 1.0


class TfidfScorer(Scorer):
    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.n_adaptation = int(meta["n_adaptation"])
        self.idf = smooth_idf(arrays["df"], int(meta["n_docs"]))
        centroid = np.zeros(TFIDF_FEATURES)
        centroid[arrays["centroid_index"]] = arrays["centroid_value"]
        norm = np.linalg.norm(centroid)
        self.direction = centroid / norm if norm > 0 else centroid

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        values = tfidf_rows([text_of(s) for s in samples], self.idf) @ self.direction
        return [(float(v), None) for v in np.asarray(values).ravel()]


class Tfidf(TextMethod):
    name = "tfidf"

    def fit(self, texts: Iterable[str], queries: Sequence[str]) -> tuple[dict, dict]:
        df, n_docs = fit_tfidf(texts)
        centroid = np.asarray(tfidf_rows(queries, smooth_idf(df, n_docs)).mean(axis=0)).ravel()
        index = np.flatnonzero(centroid)
        arrays = {
            "df": df,
            "centroid_index": index.astype(np.int64),
            "centroid_value": centroid[index],
        }
        return arrays, {"n_docs": n_docs, "features": TFIDF_FEATURES}

    def scorer(self, arrays: dict, meta: dict) -> Scorer:
        return TfidfScorer(arrays, meta)


# ---------------------------------------------------------------------------------------- DSIR

DSIR_BUCKETS = 10000
DSIR_NGRAMS = 2
"""The data-selection package's defaults (unigrams and bigrams, 10,000 hash buckets)."""


def dsir_counts(text: str) -> np.ndarray:
    """The package's hashed n-gram counts of one text (wordpunct tokens, lower case)."""
    from data_selection.hashed_ngram_dsir import get_ngram_counts

    return get_ngram_counts(text, n=DSIR_NGRAMS, num_buckets=DSIR_BUCKETS)


def fit_dsir(texts: Iterable[str], targets: Sequence[str]) -> np.ndarray:
    """log p_target − log p_pool per bucket, as HashedNgramDSIR.fit_importance_estimator
    computes it (counts normalised to probabilities, 1e-8 added before the logs)."""
    raw = np.zeros(DSIR_BUCKETS, dtype=np.int64)
    for text in texts:
        raw += dsir_counts(text)
    target = np.zeros(DSIR_BUCKETS, dtype=np.int64)
    for text in targets:
        target += dsir_counts(text)
    raw_p = raw / max(1, raw.sum())
    target_p = target / max(1, target.sum())
    return np.log(target_p + 1e-8) - np.log(raw_p + 1e-8)


class DsirScorer(Scorer):
    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.n_adaptation = int(meta["n_adaptation"])
        self.log_diff = arrays["log_diff"]

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        return [(float(self.log_diff @ dsir_counts(text_of(s))), None) for s in samples]


class Dsir(TextMethod):
    name = "dsir"

    def fit(self, texts: Iterable[str], queries: Sequence[str]) -> tuple[dict, dict]:
        return {"log_diff": fit_dsir(texts, queries)}, {
            "buckets": DSIR_BUCKETS,
            "ngrams": DSIR_NGRAMS,
        }

    def scorer(self, arrays: dict, meta: dict) -> Scorer:
        return DsirScorer(arrays, meta)
