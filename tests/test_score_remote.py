"""Score stores on S3, against a real S3-compatible server (moto's server mode on 127.0.0.1, the
same HTTP API s3fs talks to AWS or MinIO): score into s3://, SIGKILL, resume; two shard
processes into one remote store; select and train from it; all identical to the local run."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import s3fs  # noqa: F401  in [dev]: a missing package is a broken environment, not a skip
import zarr

from batctl.scorestore import ScoreStore

from .test_score_stage import read_store, run_score, score_args, setup  # noqa: F401

BUCKET = "batctl-test"


@pytest.fixture(scope="module")
def s3(setup, tmp_path_factory):  # noqa: F811
    """A moto S3 server on 127.0.0.1 with the test pool uploaded; env set for every child."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "BATCTL_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for p in range(2):
        client.upload_file(str(setup["root"] / f"pool-{p}.jsonl"), BUCKET, f"pool/pool-{p}.jsonl")
    remote = {**setup, "pool": f"s3://{BUCKET}/pool/pool-{{0..1}}.jsonl"}
    reference = setup["root"] / "local-reference"
    proc = run_score(setup, reference)
    assert proc.wait() == 0, proc.stderr.read()
    yield remote, reference
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def read_remote(url):
    group = zarr.open_group(f"{url}/scores.zarr", mode="r")
    return {name: group[name][:] for name in ("score", "key", "part", "offset", "status", "done")}


def assert_same_store(local, url):
    a, b = read_store(local), read_remote(url)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_score_into_s3_sigkill_and_resume_gives_the_local_store(s3):
    remote, reference = s3
    url = f"s3://{BUCKET}/runs/resumed"
    proc = run_score(remote, url)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if ScoreStore.open(url).done().sum() >= 2:
                break
        except (FileNotFoundError, KeyError, ValueError):
            pass  # not laid out yet
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = int(ScoreStore.open(url).done().sum())
    assert 2 <= finished < 8
    from batctl.remote import exists

    assert not exists(f"{url}/manifest.json")
    rerun = run_score(remote, url)
    assert rerun.wait() == 0, rerun.stderr.read()
    assert f"{finished} already done and skipped" in " ".join(rerun.stderr.read().split())
    assert_same_store(reference, url)
    manifest = json.loads(__import__("fsspec").open(f"{url}/manifest.json").open().read())
    assert manifest["stage"] == "score" and manifest["inputs"]["pool"][0]["path"].startswith(
        "s3://"
    )
    again = run_score(remote, url)
    assert again.wait() == 0 and "up to date" in again.stderr.read()


def test_two_shards_into_one_remote_store_then_select_and_train(cli, s3, tmp_path):
    remote, reference = s3
    url = f"s3://{BUCKET}/runs/sharded"
    procs = [run_score(remote, url, "--shard", f"{i}/2") for i in range(2)]
    logs = [p.stderr.read() for p in procs]
    assert [p.wait() for p in procs] == [0, 0], logs
    assert_same_store(reference, url)

    selections = {}
    for name, scores in (("local", reference), ("remote", url)):
        out = tmp_path / f"select-{name}"
        result = cli("select", "--scores", scores, "--gamma", "0.5", "--out", out)
        assert result.exit_code == 0, result.stderr
        selections[name] = out / "gamma-0.5"
    chosen = [
        [k["key"] for k in json.loads((d / "selection.json").read_text())["chosen"]]
        for d in selections.values()
    ]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 10
    adapters = []
    for name, selection in selections.items():
        out = tmp_path / f"train-{name}"
        result = cli(
            "train", "--model", remote["lm"], "--data", remote["domain"], "--selection",
            selection, "--out", out, "--steps", "2", "--batch-size", "4", "--targets",
            "all-linear",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        adapters.append((out / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]


@pytest.mark.parametrize(
    ("command", "value", "needle"),
    [
        ("score", "memory://x", "unsupported URL"),
        ("score", "file:///tmp/x", "unsupported URL"),
        ("score", "ftp://host/x", "unsupported URL"),
        ("surrogate", "s3://bucket/x", "local paths only"),
        ("train", "s3://bucket/x", "local paths only"),
    ],
)
def test_unsupported_urls_are_one_line_and_write_nothing(
    cli, tmp_path, monkeypatch, command, value, needle
):
    monkeypatch.chdir(tmp_path)
    args = {"score": ["--surrogate", "s", "--pool", "p"], "surrogate": [], "train": []}[command]
    result = cli(command, "--model", "m", "--data", "d", "--out", value, *args)
    assert result.exit_code == 2
    assert needle in result.stderr and "--out" in result.stderr
    assert list(tmp_path.iterdir()) == []
