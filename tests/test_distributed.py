"""Data-parallel train and surrogate on CPU (gloo, 2 processes): torchrun and accelerate launch
give the single-process adapter with the same global batch and seed, and only rank 0 writes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from batctl.distributed import World, share_of, world_from_env
from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, make_selection, write_jsonl


def test_each_rank_takes_its_slice_and_the_shares_add_up_to_the_global_mean():
    batch = list(range(7))
    slices = [share_of(batch, World(r, 3)) for r in range(3)]
    assert sorted(x for mine, _ in slices for x in mine) == batch
    # DDP averages the ranks' gradients: mean_r(share_r * mean(slice_r)) == mean(batch)
    total = sum(share * sum(mine) / len(mine) for mine, share in slices) / 3
    assert total == pytest.approx(sum(batch) / len(batch))


def test_world_from_the_launchers_environment():
    assert world_from_env({}) == World(0, 1, 0)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    assert world_from_env({"RANK": "0", "WORLD_SIZE": "1"}).main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    lm = build_tiny_lm(root / "lm", seed=0)
    domain = write_jsonl(root / "domain.jsonl", color_records(12, seed=1))
    selection = make_selection(root, lm, color_records(6, seed=7))
    return {"root": root, "lm": lm, "domain": domain, "selection": selection}


def train_args(setup, out, stage="train"):
    args = [
        stage,
        "--model",
        setup["lm"],
        "--data",
        setup["domain"],
        "--out",
        out,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--targets",
        "all-linear",
    ]
    if stage == "train":
        args += ["--selection", setup["selection"], "--backbone-weight", "0.5"]
    return [str(a) for a in args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, args):
    port = str(free_port())
    if launcher == "torchrun":
        head = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    else:  # accelerate's own multi-process launcher (its --cpu flag starts a single process)
        head = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
        head += [f"--main_process_port={port}", "--num_machines=1", "--mixed_precision=no"]
        head += ["--dynamo_backend=no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, *head, "-m", "batctl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a hung rank is killed with its launcher
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def max_difference(a_dir, b_dir):
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_the_single_process_adapter(cli, setup, tmp_path, launcher):
    single = setup["root"] / "single-train"
    if not single.exists():
        result = cli(*train_args(setup, single))
        assert result.exit_code == 0, result.stderr
    out = tmp_path / "ddp"
    launch(launcher, train_args(setup, out))
    assert max_difference(single, out) < 1e-5
    start = load_file(out / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for t in start.values())
    # Only rank 0 wrote: one output, nothing else (no second temporary dir; the lock file is
    # removed when the run ends).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert (out / "manifest.json").is_file()
    logged = (out / "log.jsonl").read_text().splitlines()
    assert logged == (single / "log.jsonl").read_text().splitlines() or len(logged) == 4
    if launcher == "torchrun":  # the same command again: up to date on every rank
        again = launch(launcher, train_args(setup, out))
        assert "up to date" in again.stderr


@pytest.mark.slow
def test_torchrun_surrogate_matches_one_process(cli, setup, tmp_path):
    single = tmp_path / "single"
    assert cli(*train_args(setup, single, "surrogate")).exit_code == 0
    out = tmp_path / "ddp"
    launch("torchrun", train_args(setup, out, "surrogate"))
    assert max_difference(single, out) < 1e-5
