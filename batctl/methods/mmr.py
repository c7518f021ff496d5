"""Relevance with diversity: maximal marginal relevance over the fused score (DESIGN §5b),
one method, `--method mmr`.

Ranking the pool by relevance alone (bm25, fusion) fills the top with near-copies of one
another and of the adaptation set: on the demo worlds bm25's top 32 held four paraphrases of
one docstring, and k random target-domain paragraphs beat them by far on held-out loss. What a
few-shot adapter lacks is the target domain's text it has *not* seen. MMR (Carbonell &
Goldstein 1998) picks greedily

    x_t = argmax_x (1 − λ) · rel(x) − λ · max_{s ∈ D_A ∪ {x_1 … x_{t−1}}} cos(x, s)

over the `--candidates` rows of highest relevance, where rel is the `--fuse` z-score sum (the
fusion method) rescaled to [0, 1] over the candidates, cos is the TF-IDF cosine (the tfidf
method's vectors) and λ is `--diversity`. The adaptation set counts as already picked, so a
paraphrase of a D_A sample ranks low. When `--fuse` names embed and neither bm25 nor tfidf
(CLIP retrieval's relevance with `--clip`), cos is the embedding cosine instead: a DreamBooth set's images have no words,
and near-copies of its images are what an image pool's top holds.

Each row's stored score keeps the order `select` must take:

- candidates: 2 + (M − t) / M ∈ (2, 3] for the t-th MMR pick (t = 0 first);
- every other row: 1 / (1 + e^−rel), rel its fused z-score, so past the candidates `select`
  continues in relevance order.

`prepare` does the work (one relevance pass over the pool, then the greedy picks, a few
seconds for M = 256) and saves every row's score (`mmr.safetensors`, 4 bytes a row): every
shard and every resumed run reads the same ranking, and the scoring pass only looks it up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batctl.data import Sample
from batctl.methods.base import Method, Result, Scorer

log = logging.getLogger("batctl.score")

STATE = "mmr.safetensors"


def mmr_order(
    relevance: np.ndarray, similarity: np.ndarray, seen: np.ndarray, diversity: float
) -> np.ndarray:
    """The greedy MMR order of the candidates.

    relevance: f64[M] in [0, 1]; similarity: f64[M, M] pairwise cosines of the candidates;
    seen: f64[M], each candidate's highest cosine to the adaptation set; diversity: λ in [0, 1).
    Returns i64[M], the candidate indices in pick order (ties: the lower index first).
    """
    count = len(relevance)
    redundancy = seen.astype(np.float64).copy()
    taken = np.zeros(count, dtype=bool)
    order = np.empty(count, dtype=np.int64)
    for t in range(count):
        value = (1.0 - diversity) * relevance - diversity * redundancy
        value[taken] = -np.inf
        pick = int(np.argmax(value))
        order[t] = pick
        taken[pick] = True
        redundancy = np.maximum(redundancy, similarity[:, pick])
    return order


def rescale(values: np.ndarray) -> np.ndarray:
    """values mapped linearly onto [0, 1] (all 1 when they do not spread)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.ones_like(values, dtype=np.float64)
    return (values - low) / (high - low)


LEXICAL_PARTS = ("bm25", "tfidf")
"""--fuse parts that compare words: with one of them in the relevance, redundancy is TF-IDF's."""


def similarity_space(parts: Sequence[str]) -> str:
    """Where mmr measures redundancy for relevance `parts` (--fuse): "embed" (the embed
    method's vectors: CLIP's with --clip, else the backbone's) when embed is a part and no
    lexical part is, else "tfidf". An image pool's captions say nothing about what a
    DreamBooth set shows, so image redundancy must be measured on the images."""
    if "embed" in parts and not set(parts) & set(LEXICAL_PARTS):
        return "embed"
    return "tfidf"


def rows_samples(pool: Any, rows: set[int]) -> dict[int, Sample]:
    """The decoded samples of the pool rows in `rows` (store row numbers), read in one pass;
    unreadable rows are left out."""
    from batctl.data import BadSample

    out: dict[int, Sample] = {}
    for index, row in enumerate(pool.iter_rows()):
        if index not in rows or type(row) is BadSample:
            continue
        sample = pool.decoded(row) if not row.record else row
        if type(sample) is not BadSample:
            out[index] = sample
    return out


def tfidf_vectors(pool: Any, rows: np.ndarray, idf: np.ndarray, config: Any) -> tuple[Any, Any]:
    """(candidates, adaptation): L2-normalised TF-IDF rows (scipy sparse, the pool's `idf`) of
    the candidate `rows`' texts and of the adaptation set's."""
    from batctl.methods.base import text_of
    from batctl.methods.lexical import adaptation_texts, tfidf_rows

    samples = rows_samples(pool, set(int(r) for r in rows))
    texts = [text_of(samples[int(r)]) for r in rows]
    return tfidf_rows(texts, idf), tfidf_rows(adaptation_texts(config), idf)


def embed_vectors(
    pool: Any, rows: np.ndarray, encode: Any, config: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, adaptation): unit embeddings (f64[M, H], f64[n, H]) of the candidate
    `rows` and of the adaptation set, by `encode` (the embed method's encoder)."""
    from batctl.methods.base import target_samples
    from batctl.methods.embed import unit_rows

    samples = rows_samples(pool, set(int(r) for r in rows))
    candidates = unit_rows(encode([samples[int(r)] for r in rows], "pool"))
    return candidates, unit_rows(encode(target_samples(config), "adaptation"))


def diverse_order(
    candidates: Any, adaptation: Any, relevance: np.ndarray, diversity: float
) -> np.ndarray:
    """The MMR pick order of the candidates given their unit vectors (`candidates`, M rows),
    the adaptation set's (`adaptation`) and their `relevance` (f64[M]): cosines, then
    `mmr_order` with λ = `diversity`. Dense or scipy sparse rows. Returns i64[M]."""
    count = candidates.shape[0]
    if not count:
        return np.zeros(0, dtype=np.int64)

    def dense(m: Any) -> np.ndarray:
        return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)

    similarity = dense(candidates @ candidates.T)
    seen = np.zeros(count)
    if adaptation.shape[0]:
        seen = dense(candidates @ adaptation.T).max(axis=1)
    return mmr_order(rescale(relevance), similarity, seen, diversity)


class MmrScorer(Scorer):
    def __init__(self, scores: np.ndarray, n_adaptation: int, attrs: dict[str, Any]) -> None:
        self.scores = scores
        self.n_adaptation = n_adaptation
        self._attrs = attrs

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        values = [float(self.scores[int(r)]) for r in rows]
        return [None if np.isnan(v) else (v, None) for v in values]

    def attrs(self) -> dict[str, Any]:
        return self._attrs


class Mmr(Method):
    name = "mmr"

    def prepare(self, work: Path, pool: Any, config: Any) -> Scorer:
        from batctl.methods import make_method
        from batctl.methods.fusion import Fusion
        from batctl.methods.hybrid import prefilter_all, top_rows
        from batctl.methods.lexical import load_state, save_state

        relevance_scorer = Fusion().prepare(work, pool, config)
        space = config.similarity
        if space == "tfidf":
            folder = work / "tfidf"  # fusion's own tfidf state when --fuse names it
            folder.mkdir(exist_ok=True)
            idf = make_method("tfidf").prepare(folder, pool, config).idf
        path = work / STATE
        if not path.is_file():
            relevance = prefilter_all(pool, relevance_scorer)
            readable = np.isfinite(relevance)
            rows = top_rows(
                np.where(readable, relevance, -np.inf),
                min(config.candidate_count, int(readable.sum())),
            )
            if space == "tfidf":
                vectors = tfidf_vectors(pool, rows, idf, config)
            else:
                encode = relevance_scorer.scorers["embed"].encode
                vectors = embed_vectors(pool, rows, encode, config)
            order = rows[diverse_order(*vectors, relevance[rows], config.diversity)]
            scores = np.where(
                readable, 1.0 / (1.0 + np.exp(-np.where(readable, relevance, 0.0))), np.nan
            )
            count = len(rows)
            scores[order] = 2.0 + (count - np.arange(count)) / max(1, count)
            save_state(
                path,
                {"score": scores.astype(np.float32), "order": order.astype(np.int64)},
                {
                    "candidates": count,
                    "diversity": config.diversity,
                    "fuse": list(config.fuse_parts),
                    "similarity": space,
                },
            )
            log.info(
                "mmr: %d candidates of %d rows re-ranked for diversity (λ = %g, %s cosine)",
                count, len(relevance), config.diversity, space,
            )  # fmt: skip
        arrays, meta = load_state(path)
        return MmrScorer(
            arrays["score"].astype(np.float64),
            relevance_scorer.n_adaptation,
            {
                **relevance_scorer.attrs(),
                "candidates": meta["candidates"],
                "diversity": meta["diversity"],
                "similarity": meta.get("similarity", "tfidf"),
            },
        )
