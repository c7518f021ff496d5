"""`batctl score --method`: every method writes the same store, `select` reads each unchanged,
and a killed baseline run resumes to the uninterrupted store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from batctl.scorestore import SCORED, UNREADABLE, ScoreStore
from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, mixed_pool_lines, write_jsonl, write_two_part_pool

BASELINES = ("bm25", "tfidf", "dsir", "embed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LM, the color domain as D_A, and a mixed pool (a third color records) in two parts."""
    root = tmp_path_factory.mktemp("methods")
    lm = build_tiny_lm(root / "lm", seed=0)
    domain = write_jsonl(root / "domain.jsonl", color_records(10, seed=1))
    return {"root": root, "lm": lm, "domain": domain, "pool": write_two_part_pool(root)}


def score_args(setup, out, method, *extra, pool=None):
    return [
        "score", "--model", setup["lm"], "--data", setup["domain"], "--pool", pool or setup["pool"],
        "--out", out, "--method", method, "--chunk-size", "8", *extra,
    ]  # fmt: skip


def read_store(path):
    group = zarr.open_group(str(path / "scores.zarr"), mode="r")
    return {name: group[name][:] for name in ("score", "key", "part", "offset", "status", "done")}


@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_writes_the_store_select_reads(cli, setup, tmp_path, method):
    out = tmp_path / "scores"
    result = cli(*score_args(setup, out, method), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows"] == 61 and summary["status"]["unreadable"] == 1 and summary["published"]
    assert {p.name for p in out.iterdir()} == {"scores.zarr", "method.safetensors", "manifest.json"}
    store = read_store(out)
    assert list(store["part"]) == [0] * 30 + [1] * 31 and store["done"].all()
    bad = np.flatnonzero(store["status"] == UNREADABLE)
    assert list(store["key"][bad]) == ["pool-1:7"]
    good = store["status"] == SCORED
    assert good.sum() == 60 and np.isfinite(store["score"][good]).all()
    attrs = ScoreStore.open(out).group.attrs
    assert attrs["method"] == method and attrs["n_adaptation"] == 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["method"] == method and "surrogate" not in manifest["inputs"]
    # The color records (every third line) rank first for the text methods: they share words.
    texts = [
        json.loads(line)
        for p in range(2)
        for line in (setup["root"] / f"pool-{p}.jsonl").read_text().splitlines()
        if line != "{not json"
    ]
    is_domain = np.array(["instruction" in t for t in texts])
    top = np.argsort(-store["score"][good], kind="stable")[: is_domain.sum()]
    if method != "embed":  # a random tiny backbone's embeddings know no domains
        assert is_domain[top].mean() == 1.0
    # select takes the store as it takes an influence store: n from the store, top by score.
    picked = cli("select", "--scores", out, "--gamma", "0.5", "--out", tmp_path / "sel", "--json")
    assert picked.exit_code == 0, picked.stderr
    chosen = json.loads((tmp_path / "sel" / "gamma-0.5" / "selection.json").read_text())["chosen"]
    assert len(chosen) == 10
    order = np.argsort(-store["score"][good], kind="stable")[:10]
    assert [c["key"] for c in chosen] == list(store["key"][good][order])
    again = cli(*score_args(setup, out, method))
    assert again.exit_code == 0 and "up to date" in again.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["bm25"],
        ["tfidf"],
        ["dsir"],
        ["embed"],
        ["mmr"],
        ["fusion", "--fuse", "bm25", "--fuse", "tfidf"],
    ],
)
def test_a_pool_with_nothing_readable_is_one_error_line_for_every_text_method(
    cli, setup, tmp_path, flags
):
    """A chunk whose rows are all unreadable reaches the scorer as an empty batch (scikit-learn
    refuses one); the run must end in score's own refusal, not a traceback."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"label": 1}\n{"label": 2}\n')
    result = cli(*score_args(setup, tmp_path / "s", *flags, pool=pool))
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no sample got a finite score (2 unreadable)" in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_baseline_ignores_a_surrogate_and_influence_without_one_is_a_usage_error(
    cli, setup, tmp_path
):
    ignored = cli(*score_args(setup, tmp_path / "a", "bm25"), "--surrogate", tmp_path)
    assert ignored.exit_code == 0, ignored.stderr
    assert "--method bm25 does not read --surrogate" in ignored.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "surrogate" not in manifest["inputs"] and "surrogate" not in manifest["params"]
    missing = cli(*score_args(setup, tmp_path / "b", "influence"))
    assert (
        missing.exit_code == 2
        and "--surrogate is required with --method influence" in missing.stderr
    )


SCORE_SCRIPT = (
    "import sys; from batctl.cli import main; sys.argv = ['batctl'] + sys.argv[1:]; main()"
)


def run_score(args):
    return subprocess.Popen(
        [sys.executable, "-c", SCORE_SCRIPT, *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )


def test_a_killed_bm25_run_resumes_to_the_uninterrupted_store(setup, tmp_path):
    # One-row chunks over 600 lines: each chunk is its own zarr write, so the run is long
    # enough to be killed midway whatever the machine's speed.
    rng = np.random.default_rng(1)
    pool = tmp_path / "big.jsonl"
    pool.write_text("\n".join(mixed_pool_lines(600, 3, rng)) + "\n")
    args = ["--chunk-size", "1"]
    reference = tmp_path / "reference"
    done = run_score(score_args(setup, reference, "bm25", *args, pool=str(pool)))
    assert done.wait() == 0, done.stderr.read()

    out = tmp_path / "resumed"
    proc = run_score(score_args(setup, out, "bm25", *args, pool=str(pool)))
    work = tmp_path / ".resumed.partial"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if ScoreStore.open(work).done().sum() >= 20:
                break
        except (FileNotFoundError, KeyError, ValueError):
            pass  # still being laid out
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = int(ScoreStore.open(work).done().sum())
    assert 20 <= finished < 600 and not out.exists()

    rerun = run_score(score_args(setup, out, "bm25", *args, pool=str(pool)))
    assert rerun.wait() == 0
    assert f"{finished} already done and skipped" in " ".join(rerun.stderr.read().split())
    a, b = read_store(reference), read_store(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert (out / "method.safetensors").read_bytes() == (
        reference / "method.safetensors"
    ).read_bytes()


def test_embed_skips_a_sample_the_task_cannot_take_with_its_reason_and_strict_stops(caplog):
    """A sample the family's collate refuses: skipped with the reason, fatal under --strict."""
    from batctl.data import Sample
    from batctl.errors import BadSampleError
    from batctl.methods.embed import EmbedScorer

    def encode(samples, role):
        if any(s.key == "bad" for s in samples):
            raise BadSampleError("pool.jsonl", "bad", "no text", "give it a text field")
        return np.ones((len(samples), 2))

    samples = [
        Sample(key=k, part=0, offset=i, raw={}, record={}) for i, k in enumerate(("a", "bad", "c"))
    ]
    direction = np.array([1.0, 0.0])
    results = EmbedScorer(encode, direction, 4, "lm").score(samples, [0, 1, 2])
    assert results[1] is None and results[0] is not None and results[2] is not None
    assert "skipped bad" in caplog.text and "no text (give it a text field)" in caplog.text
    with pytest.raises(BadSampleError, match="no text"):
        EmbedScorer(encode, direction, 4, "lm", strict=True).score(samples, [0, 1, 2])
