"""Small LM data sets and hand-made upstream artifacts shared by the LM stage tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import webdataset as wds

from batctl.artifacts import describe_input, describe_model, open_output

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def color_records(n: int, seed: int) -> list[dict]:
    """Alpaca records of one small domain: "What color is item N?" -> "Item N is C."."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        number, color = rng.randint(1, 99), rng.choice(COLORS)
        out.append(
            {
                "instruction": f"What color is item {number}?",
                "input": "",
                "output": f"Item {number} is {color}.",
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_selection(root: Path, model: Path, records: list[dict]) -> Path:
    """A select-stage output whose samples.tar holds `records`, upstream of a score store on `model`.

    The score and select stages are built in later issues; train only reads the selection's
    manifest lineage and its samples.tar, both written here with the real artifact code and a
    real webdataset.TarWriter.
    """
    scores = root / "scores"
    with open_output(scores, stage="score", params={}, inputs={"model": describe_model(model)}):
        pass
    selection = root / "selection"
    with open_output(
        selection, stage="select", params={"gamma": 0.5}, inputs={"scores": describe_input(scores)}
    ) as out:
        with wds.TarWriter(str(out.work / "samples.tar")) as sink:
            for i, record in enumerate(records):
                sink.write({"__key__": f"pool-{i:04d}", "json": json.dumps(record).encode()})
    return selection


WORDS = "alpha beta gamma delta river stone cloud music paper light".split()


def mixed_pool_lines(n: int, seed: int, rng, words_per_line: int = 10) -> list[str]:
    """JSONL lines of a pool where every third record is from the color domain, the rest word salad."""
    return [
        json.dumps(r if i % 3 == 0 else {"text": " ".join(rng.choice(WORDS, words_per_line))})
        for i, r in enumerate(color_records(n, seed=seed))
    ]


def write_two_part_pool(root: Path) -> str:
    """Two mixed pool parts of 30 records under `root` (the second with one bad line at row 7),
    as score's tests use them; returns their brace spec."""
    import numpy as np

    rng = np.random.default_rng(0)
    for p in range(2):
        lines = mixed_pool_lines(30, 10 + p, rng)
        if p == 1:
            lines.insert(7, "{not json")
        (root / f"pool-{p}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "pool-{0..1}.jsonl")


def lexical_by_hand(texts: list[str], queries: list[str]):
    """bm25 (each query summed) and tfidf (cosine to the query centroid) of every text, from the
    formulas' building blocks rather than the methods' scorers; also the idf vector."""
    import numpy as np

    from batctl.methods.lexical import (
        bm25_scores,
        bm25_tokens,
        fit_bm25,
        fit_tfidf,
        smooth_idf,
        tfidf_rows,
    )

    meta = fit_bm25(texts, queries)
    bm25 = bm25_scores(bm25_tokens(texts), meta["query_weights"], meta["idf"], meta["avgdl"])
    df, n_docs = fit_tfidf(iter(texts))
    idf = smooth_idf(df, n_docs)
    centroid = np.asarray(tfidf_rows(queries, idf).mean(axis=0)).ravel()
    tfidf = np.asarray(tfidf_rows(texts, idf) @ (centroid / np.linalg.norm(centroid))).ravel()
    return bm25, tfidf, idf
