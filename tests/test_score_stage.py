"""score end to end on a tiny LM: the store's tree and numbers, resume after SIGKILL, shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from batctl.scorestore import SCORED, UNREADABLE, ScoreStore
from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, write_jsonl, write_two_part_pool


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LM, a surrogate trained on the color domain, and a mixed pool in two parts."""
    from typer.testing import CliRunner

    from batctl.cli import app

    root = tmp_path_factory.mktemp("score")
    lm = build_tiny_lm(root / "lm", seed=0)
    domain = write_jsonl(root / "domain.jsonl", color_records(10, seed=1))
    pool = write_two_part_pool(root)
    result = CliRunner().invoke(
        app,
        [
            "surrogate",
            "--model",
            str(lm),
            "--data",
            str(domain),
            "--out",
            str(root / "sur"),
            "--steps",
            "8",
            "--lr",
            "1e-2",
            "--targets",
            "all-linear",
        ],
    )
    assert result.exit_code == 0, result.stderr
    return {
        "root": root,
        "lm": lm,
        "domain": domain,
        "sur": root / "sur",
        "pool": pool,
    }


def score_args(setup, out, *extra):
    return [
        "score",
        "--method",
        "influence",
        "--model",
        setup["lm"],
        "--surrogate",
        setup["sur"],
        "--data",
        setup["domain"],
        "--pool",
        setup["pool"],
        "--out",
        out,
        "--chunk-size",
        "8",
        "--batch-size",
        "4",
        *extra,
    ]


def read_store(path):
    group = zarr.open_group(str(path / "scores.zarr"), mode="r")
    return {name: group[name][:] for name in ("score", "key", "part", "offset", "status", "done")}


def test_score_writes_the_store_and_target_and_ranks_the_domain_first(cli, setup, tmp_path):
    out = tmp_path / "scores"
    result = cli(*score_args(setup, out, "--layer-scores"), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows"] == 61 and summary["status"]["unreadable"] == 1 and summary["published"]
    assert {p.name for p in out.iterdir()} == {"scores.zarr", "target.safetensors", "manifest.json"}
    store = read_store(out)
    assert list(store["part"]) == [0] * 30 + [1] * 31
    assert store["done"].all()
    bad = np.flatnonzero(store["status"] == UNREADABLE)
    assert list(store["key"][bad]) == ["pool-1:7"] and np.isnan(store["score"][bad]).all()
    good = store["status"] == SCORED
    assert good.sum() == 60 and np.isfinite(store["score"][good]).all()
    # Layer scores add up to the score.
    layers = zarr.open_group(str(out / "scores.zarr"))["layer_score"][:]
    np.testing.assert_allclose(layers[good].sum(axis=1), store["score"][good], rtol=1e-3, atol=1e-3)
    # The color-domain samples (every third line) rank above the random word lists.
    texts = [
        json.loads(line)
        for p in range(2)
        for line in (setup["root"] / f"pool-{p}.jsonl").read_text().splitlines()
        if line != "{not json"
    ]
    is_domain = np.array(["instruction" in t for t in texts])
    scores = store["score"][good]
    top = np.argsort(-scores)[: is_domain.sum()]
    assert is_domain[top].mean() >= 0.8
    # target.safetensors records r, v, λ and norms per layer, and its settings.
    from safetensors import safe_open

    with safe_open(out / "target.safetensors", "pt") as f:
        meta = f.metadata()
        assert meta["preconditioner"] == "woodbury" and meta["engine"] == "hooks"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "score" and "shard" not in manifest["params"]
    again = cli(*score_args(setup, out, "--layer-scores"))
    assert again.exit_code == 0 and "up to date" in again.stderr


SCORE_SCRIPT = (
    "import sys; from batctl.cli import main; sys.argv = ['batctl'] + sys.argv[1:]; main()"
)


def run_score(setup, out, *extra, env=None):
    args = [str(a) for a in score_args(setup, out, *extra)]
    return subprocess.Popen(
        [sys.executable, "-c", SCORE_SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_sigkill_midway_then_rerun_gives_the_uninterrupted_store(setup, tmp_path):
    reference = tmp_path / "reference"
    done = run_score(setup, reference)
    assert done.wait() == 0, done.stderr.read()

    out = tmp_path / "resumed"
    proc = run_score(setup, out)
    partial = tmp_path / ".resumed.partial" / "scores.zarr"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if ScoreStore.open(partial.parent).done().sum() >= 2:
                break
        except (FileNotFoundError, KeyError, ValueError):
            pass  # the store is still being laid out
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = int(ScoreStore.open(partial.parent).done().sum())
    assert 2 <= finished < 8 and not out.exists()
    from batctl.info import describe_path

    progress = describe_path(out)["progress"]
    assert describe_path(out)["state"] == "partial"
    assert progress["unit"] == "chunks" and progress["done"] == finished and progress["total"] == 8

    rerun = run_score(setup, out)
    assert rerun.wait() == 0
    log = rerun.stderr.read()
    assert f"{finished} already done and skipped" in " ".join(log.split())
    a, b = read_store(reference), read_store(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_two_shards_in_two_processes_give_the_single_process_store(setup, tmp_path):
    single = tmp_path / "single"
    assert run_score(setup, single).wait() == 0
    out = tmp_path / "sharded"
    procs = [run_score(setup, out, "--shard", f"{i}/2") for i in range(2)]
    logs = [p.stderr.read() for p in procs]
    assert [p.wait() for p in procs] == [0, 0], logs
    a, b = read_store(single), read_store(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    single_params, sharded_params = (
        json.loads((d / "manifest.json").read_text())["params"] for d in (single, out)
    )
    assert single_params.pop("out") != sharded_params.pop("out")
    assert single_params == sharded_params


def test_torchrun_rank_and_world_size_pick_the_shard(setup, tmp_path):
    out = tmp_path / "ranked"
    procs = [run_score(setup, out, env={"RANK": str(i), "WORLD_SIZE": "2"}) for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    assert ScoreStore.open(out).is_complete()


def test_a_copy_of_the_model_and_data_with_new_mtimes_is_the_same_run(cli, setup, tmp_path):
    """Each node of a sharded run holds its own copy of the inputs: mtimes must not matter."""
    out = tmp_path / "store"
    assert run_score(setup, out, "--shard", "0/2").wait() == 0  # half the store, unpublished
    later = time.time() + 100
    for path in [*setup["lm"].iterdir(), setup["domain"]]:
        os.utime(path, (later, later))
    assert run_score(setup, out, "--shard", "1/2").wait() == 0
    assert ScoreStore.open(out).is_complete()
    again = cli(*score_args(setup, out))
    assert again.exit_code == 0 and "up to date" in again.stderr


@pytest.mark.parametrize(
    "rank, world, problem",
    [("x", "2", "expected i/N"), ("3", "2", "need 0 <= i < N"), ("0", "0", "need 0 <= i < N")],
)
def test_a_bad_rank_or_world_size_is_one_line_naming_them(rank, world, problem):
    from batctl.stages.score import ScoreConfig

    from batctl.errors import UsageError

    with pytest.raises(UsageError, match=f"RANK='{rank}' WORLD_SIZE='{world}'.*{problem}"):
        ScoreConfig().shard_of({"RANK": rank, "WORLD_SIZE": world})


def test_a_surrogate_on_another_backbone_is_one_clear_line(cli, setup, tmp_path):
    other = build_tiny_lm(tmp_path / "other", seed=3)
    args = score_args(setup, tmp_path / "o")
    args[args.index("--model") + 1] = other
    result = cli(*args)
    assert result.exit_code == 1 and "was built on model" in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_an_empty_adaptation_set_is_one_clear_line(cli, setup, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = score_args(setup, tmp_path / "o")
    args[args.index("--data") + 1] = empty
    result = cli(*args)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--data" in errors[0] and "no usable samples" in errors[0]


def test_fd_engine_store_ranks_like_the_exact_engine(cli, setup, tmp_path):
    exact, fd = tmp_path / "hooks", tmp_path / "fd"
    assert cli(*score_args(setup, exact)).exit_code == 0
    result = cli(*score_args(setup, fd, "--engine", "fd"))
    assert result.exit_code == 0, result.stderr
    a, b = read_store(exact), read_store(fd)
    good = a["status"] == SCORED
    assert (b["status"] == a["status"]).all()
    ranks = [np.argsort(np.argsort(x[good])) for x in (a["score"], b["score"])]
    assert np.corrcoef(*ranks)[0, 1] > 0.99  # Spearman's rho
    from safetensors import safe_open

    with safe_open(fd / "target.safetensors", "pt") as f:
        assert float(f.metadata()["fd_eps"]) > 0


def test_an_empty_pool_is_one_clear_line_before_any_model_loads(cli, setup, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = score_args(setup, tmp_path / "o")
    args[args.index("--pool") + 1] = empty
    result = cli(*args)
    assert (
        result.exit_code == 1
        and "no samples to score" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_a_shard_that_finds_the_store_published_exits_cleanly(cli, setup, tmp_path):
    out = tmp_path / "s"
    assert cli(*score_args(setup, out, "--shard", "0/2")).exit_code == 0
    assert cli(*score_args(setup, out, "--shard", "1/2")).exit_code == 0  # publishes
    result = cli(*score_args(setup, out, "--shard", "0/2"))
    assert result.exit_code == 0 and "up to date" in result.stderr


def test_normalize_divides_each_score_by_the_sample_gradient_norm(cli, setup, tmp_path):
    plain, normed = tmp_path / "plain", tmp_path / "normed"
    assert cli(*score_args(setup, plain)).exit_code == 0
    result = cli(*score_args(setup, normed, "--normalize"))
    assert result.exit_code == 0, result.stderr
    a, b = read_store(plain), read_store(normed)
    good = a["status"] == SCORED
    assert (b["status"] == a["status"]).all()
    # The norms, from the per-sample gradient code (a separate path from the engine's hooks).
    from batctl.influence.grads import per_sample_grads
    from batctl.samples import load_samples
    from batctl.tasks.base import TaskSettings
    from batctl.tasks.lm import LMTask

    task = LMTask(TaskSettings(str(setup["lm"])))
    task.load_adapter(setup["sur"], trainable=True)
    samples = load_samples(setup["pool"], flag="--pool")
    grads = per_sample_grads(task, samples, batch_size=4, role="pool", verify=False)
    norms = torch.stack([g.square().sum(1) for g in grads.grads.values()]).sum(0).sqrt().numpy()
    assert [s.key for s in samples] == list(a["key"][good])
    np.testing.assert_allclose(b["score"][good], a["score"][good] / norms, rtol=2e-3, atol=1e-6)
    from safetensors import safe_open

    with safe_open(normed / "target.safetensors", "pt") as f:
        assert f.metadata()["normalize"] == "True"
    refused = cli(*score_args(setup, tmp_path / "fd", "--normalize", "--engine", "fd"))
    assert refused.exit_code == 2 and "--normalize needs --engine hooks" in refused.stderr


def test_samples_batched_by_size_keep_their_own_scores(cli, setup, tmp_path):
    from batctl.influence.engines import HooksEngine
    from batctl.influence.target import load_target
    from batctl.samples import load_samples
    from batctl.tasks.base import TaskSettings
    from batctl.tasks.lm import LMTask

    out = tmp_path / "s"
    assert cli(*score_args(setup, out)).exit_code == 0
    store = read_store(out)
    good = store["status"] == SCORED
    task = LMTask(TaskSettings(str(setup["lm"])))
    task.load_adapter(setup["sur"], trainable=True)
    samples = load_samples(setup["pool"], flag="--pool")
    sizes = [task.size_hint(s) for s in samples]
    assert sizes == [len(task.encode(s)[0]) for s in samples] and len(set(sizes)) > 3
    # the store batches each chunk by size; one sample at a time there is no batch at all
    engine = HooksEngine(task, load_target(out / "target.safetensors")[0])
    alone = [float(engine.score(task.collate([s], "pool")).scores[0]) for s in samples]
    np.testing.assert_allclose(store["score"][good], alone, rtol=1e-4, atol=1e-6)
