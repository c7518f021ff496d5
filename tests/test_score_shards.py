"""score sharded by rows: torchrun on a one-file pool, the shard count as part of the store's
identity, pool parts known by content and normalised path, resuming with another batch size."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from batctl.scorestore import ScoreStore

from .test_score_stage import read_store, run_score, score_args, setup  # noqa: F401


@pytest.fixture(scope="module")
def one_file(setup):  # noqa: F811
    """The two pool parts concatenated into one file (the Alpaca case), and its reference store."""
    root = setup["root"]
    merged = root / "one" / "pool.jsonl"
    merged.parent.mkdir()
    merged.write_text("".join((root / f"pool-{p}.jsonl").read_text() for p in range(2)))
    one = {**setup, "pool": str(merged)}
    reference = root / "one-reference"
    proc = run_score(one, reference)
    assert proc.wait() == 0, proc.stderr.read()
    return one, reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_on_a_one_file_pool_gives_both_ranks_work_and_the_same_store(one_file, tmp_path):
    one, reference = one_file
    out = tmp_path / "ranked"
    args = [str(a) for a in score_args(one, out)]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "--tee=3",
            "-m",
            "batctl",
            *args[0:],
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = " ".join((proc.stdout + proc.stderr).split())
    # 61 rows in chunks of 8: 8 chunks, 4 each, though the pool is one file.
    for rank in range(2):
        found = re.search(rf"shard {rank}/2: (\d+) chunks", log)
        assert found and int(found.group(1)) == 4, log[-2000:]
    a, b = read_store(reference), read_store(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_shard_count_mismatch_is_refused_without_suggesting_force(
    cli, one_file, tmp_path, monkeypatch
):
    one, reference = one_file
    out = tmp_path / "scores"
    first = cli(*score_args(one, out, "--shard", "0/2"))
    assert first.exit_code == 0, first.stderr
    assert not out.exists() and ScoreStore.open(tmp_path / ".scores.partial").done().sum() == 4

    other = cli(*score_args(one, out, "--shard", "1/4"))
    assert other.exit_code == 1
    message = " ".join(other.stderr.split())
    assert "2 shard(s), not 4" in message and "--shard i/2" in message
    assert "--force" not in message

    # Another flag that changes the scores: refused, naming the flag, keeping the finished chunks.
    changed = cli(*score_args(one, out, "--shard", "1/2", "--damping", "0.5"))
    assert changed.exit_code == 1
    message = " ".join(changed.stderr.split())
    assert "damping" in message and "4 finished chunks" in message and "--force" not in message

    # A second node's own copy of the pool: same bytes, a new mtime, a relative spelling of its
    # path, and another --batch-size: the same run, resumed.
    pool = one["pool"]
    copy = tmp_path / "copy.jsonl"
    shutil.copy(pool, copy)
    os.replace(copy, pool)  # same content, new inode and mtime
    monkeypatch.chdir(os.path.dirname(pool))
    relative = {**one, "pool": os.path.basename(pool)}
    last = cli(*score_args(relative, out, "--shard", "1/2", "--batch-size", "3"), "--json")
    assert last.exit_code == 0, last.stderr
    assert '"published": true' in last.stdout
    a, b = read_store(reference), read_store(out)
    for name in a:
        if name == "score":  # padding to another batch width moves the last float bits only
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
