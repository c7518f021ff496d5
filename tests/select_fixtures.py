"""Hand-made score directories for the select tests: a real pool, a real zarr store laid out from
it (as `score` does), chosen scores and statuses, target.safetensors and a manifest.

No model is involved: `select`'s default path reads only these files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from batctl.artifacts import describe_model, open_output
from batctl.data import open_pool
from batctl.samples import describe_data
from batctl.scorestore import SCORED, ScoreStore

WORDS = "alpha beta gamma delta river stone cloud music paper light".split()


def write_text_pool(root: Path, parts: int = 2, per_part: int = 20, seed: int = 0) -> list[Path]:
    """JSONL parts of short texts and Alpaca records; some lines repeat others' content."""
    rng = np.random.default_rng(seed)
    paths = []
    for p in range(parts):
        lines = []
        for i in range(per_part):
            if i % 4 == 0:
                record = {
                    "instruction": f"What color is item {p * 100 + i}?",
                    "input": "",
                    "output": "Item is red.",
                }
            else:
                record = {"text": " ".join(rng.choice(WORDS, 6))}
            lines.append(json.dumps(record))
        path = root / f"pool-{p}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def write_target(path: Path, n: int) -> None:
    """A target.safetensors whose metadata says n finite adaptation samples (all select reads)."""
    save_file(
        {"lambda/x": np.zeros(1)},
        str(path),
        metadata={"influence.format": "batctl.target/1", "influence.n_adaptation": str(n)},
    )


def make_score_dir(
    out: Path,
    pool: Sequence[Path],
    n: int,
    scores: np.ndarray | None = None,
    status: np.ndarray | None = None,
    chunk_size: int = 8,
    done: np.ndarray | None = None,
    model: Path | None = None,
    seed: int = 0,
    publish: bool = True,
) -> Path:
    """A score output over `pool` (laid out by a decode=False scan, like `score`), with the given
    scores and statuses (default: random scores, all scored). `done` marks finished chunks (default
    all); `publish=False` leaves the store as a `.NAME.partial` work dir with no manifest."""
    specs = [str(p) for p in pool]
    data = open_pool(specs, decode=False)
    layout = [(r.key, r.part, r.offset) for r in data.iter_rows()]
    rows = len(layout)
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(rows).astype(np.float32) if scores is None else scores
    status = np.full(rows, SCORED, np.uint8) if status is None else status
    model = model or out.parent / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"architectures": ["TinyForCausalLM"]}')
    inputs = {"model": describe_model(model), "pool": describe_data(specs)}
    params = {"paragraphs": False, "chunk_size": chunk_size}

    def fill(work: Path) -> None:
        store = ScoreStore.create(
            work, iter(layout), rows, chunk_size, attrs={"pool": [str(p) for p in pool]}
        )
        flags = np.ones(store.n_chunks, bool) if done is None else done
        for c in range(store.n_chunks):
            if flags[c]:
                span = store.chunk_rows(c)
                store.write_chunk(c, scores[span.start : span.stop], status[span.start : span.stop])
        write_target(work / "target.safetensors", n)

    if publish:
        with open_output(out, stage="score", params=params, inputs=inputs) as output:
            fill(output.work)
    else:
        from batctl.artifacts import open_partial, run_identity

        work, _ = open_partial(out, run_identity("score", params, inputs), force=False)
        fill(work)
    return out


def columns_of(scores, status=None, keys=None, done=None):
    """batctl.selection.Columns from plain arrays (defaults: all scored, keys k0.., all done)."""
    from batctl.selection import Columns

    scores = np.asarray(scores, dtype=np.float32)
    rows = len(scores)
    return Columns(
        score=scores,
        status=np.full(rows, SCORED, np.uint8) if status is None else np.asarray(status, np.uint8),
        key=np.array([f"k{i}" for i in range(rows)] if keys is None else keys, dtype=str),
        done=np.ones(rows, bool) if done is None else np.asarray(done, bool),
    )
