"""Output directories: atomic, up to date when nothing changed, locked, never overwritten silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from batctl import artifacts
from batctl.artifacts import describe, describe_input, fingerprint_file, open_output
from batctl.errors import BatctlError, UpToDate

PARAMS = {"rank": 8, "steps": 10}


def write(path: Path, text: str, **kwargs):
    with open_output(
        path,
        stage="demo",
        params=kwargs.pop("params", PARAMS),
        inputs=kwargs.pop("inputs", {}),
        **kwargs,
    ) as out:
        (out.work / "result.txt").write_text(text)
        assert not path.joinpath("manifest.json").exists() or kwargs.get("force")
    return path


def test_manifest_is_written_with_the_contract_fields(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hi"}\n')
    out = write(tmp_path / "out", "x", inputs={"data": describe_input(data)})
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("stage", "version", "params", "inputs", "outputs", "started", "finished", "host"):
        assert key in manifest
    assert manifest["params"] == PARAMS
    assert manifest["outputs"] == {"result.txt": 1}
    assert manifest["inputs"]["data"]["fingerprint"] == fingerprint_file(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out"]


def test_same_run_twice_is_up_to_date_and_touches_nothing(tmp_path):
    out = write(tmp_path / "out", "first")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(UpToDate):
        write(out, "second")
    assert (out / "result.txt").read_text() == "first"
    assert (out / "manifest.json").read_bytes() == before


def test_changed_params_or_inputs_are_refused_without_force(tmp_path):
    out = write(tmp_path / "out", "first")
    with pytest.raises(BatctlError, match=r"rank: 8 -> 16.*--force"):
        write(out, "second", params={"rank": 16, "steps": 10})
    data = tmp_path / "d.txt"
    data.write_text("a\n")
    with pytest.raises(BatctlError, match="input data changed"):
        write(out, "second", inputs={"data": describe_input(data)})
    write(out, "second", params={"rank": 16, "steps": 10}, force=True)
    assert (out / "result.txt").read_text() == "second"
    assert json.loads((out / "manifest.json").read_text())["params"]["rank"] == 16


def test_changed_input_file_makes_the_output_stale(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("a\n")
    out = write(tmp_path / "out", "x", inputs={"data": describe_input(data)})
    with pytest.raises(UpToDate):
        write(out, "x", inputs={"data": describe_input(data)})
    data.write_text("b\nc\n")
    with pytest.raises(BatctlError, match="input data changed"):
        write(out, "x", inputs={"data": describe_input(data)})


def test_a_directory_batctl_did_not_write_is_never_overwritten_even_with_force(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(BatctlError, match="not written by batctl"):
            write(mine, "x", force=force)
    assert (mine / "notes.txt").read_text() == "precious"
    assert not (mine / "manifest.json").exists()


def test_force_replaces_only_an_output_of_the_same_stage(tmp_path):
    out = write(tmp_path / "out", "first")
    with pytest.raises(BatctlError, match="--force replaces only an output of the same stage"):
        with open_output(out, stage="train", params={}, inputs={}, force=True):
            pass
    assert (out / "result.txt").read_text() == "first"


def test_an_empty_directory_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    write(tmp_path / "out", "x")
    assert artifacts.is_complete(tmp_path / "out")


def test_a_failing_stage_leaves_no_output_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with open_output(tmp_path / "out", stage="demo", params=PARAMS, inputs={}) as out:
            (out.work / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_fingerprint_sees_size_and_both_ends_of_big_files(tmp_path):
    big = tmp_path / "big.bin"
    payload = bytearray(os.urandom(3 * artifacts.MIB))
    big.write_bytes(payload)
    stat = big.stat()
    first = fingerprint_file(big)
    payload[-1] ^= 1
    big.write_bytes(payload)
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint_file(big) != first
    payload[-1] ^= 1
    payload[artifacts.MIB + 5] ^= 1  # the middle: only the strict fingerprint sees it
    big.write_bytes(payload)
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint_file(big) == first
    assert fingerprint_file(big, strict=True) != first


def test_artifact_inputs_are_fingerprinted_by_their_manifest(tmp_path):
    out = write(tmp_path / "out", "x")
    described = describe_input(out)
    assert described["kind"] == "artifact"
    assert describe_input("someone/model-on-hub") == {
        "path": "someone/model-on-hub",
        "kind": "hub",
        "fingerprint": "hub:someone/model-on-hub",
    }


# ------------------------------------------------------------------ other processes

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from batctl.artifacts import open_output
    out_path, mode = Path(sys.argv[1]), sys.argv[2]
    with open_output(out_path, stage="demo", params={"n": 1}, inputs={}, resumable=(mode == "resume")) as out:
        for i in range(1000):
            (out.work / f"part-{i}.bin").write_bytes(b"x" * 4096)
            out.progress(i + 1, 1000, "parts")
            if i == 20:
                print("WRITING", flush=True)
            if mode in ("slow", "resume"):
                time.sleep(0.01)
    print("DONE", flush=True)
    """
)


def start_writer(out: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "WRITING"
    return proc


def test_sigkill_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    proc = start_writer(out, "slow")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not any((p / "manifest.json").exists() for p in tmp_path.iterdir() if p.is_dir())
    assert describe(out)["state"] == "partial"
    # The next run cleans the killed run's temporary sibling and completes.
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(out), "fast"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert artifacts.is_complete(out)
    assert len(json.loads((out / "manifest.json").read_text())["outputs"]) == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigkill_while_replacing_keeps_the_previous_complete_output(tmp_path):
    out = tmp_path / "out"
    write(out, "old", params={"n": 0})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER.replace("resumable=", "force=True, resumable="),
            str(out),
            "slow",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "result.txt").read_text() == "old"
    assert artifacts.is_complete(out)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    proc = start_writer(out, "slow")
    try:
        with pytest.raises(BatctlError, match=rf"another batctl process \(pid {proc.pid}\)"):
            write(out, "x", params={"n": 1})
        assert describe(out)["state"] == "running"
    finally:
        proc.kill()
        proc.wait()
    # The kernel drops a dead process's lock: the output is writable again.
    write(out, "x", params={"n": 1})


def test_resumable_work_survives_a_kill_and_resumes_only_with_the_same_run(tmp_path):
    out = tmp_path / "out"
    proc = start_writer(out, "resume")
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = artifacts.partial_dir(out)
    assert partial.is_dir() and not out.exists()
    info = describe(out)
    assert info["state"] == "partial" and info["progress"]["unit"] == "parts"
    assert 20 < info["progress"]["done"] < 1000
    with pytest.raises(BatctlError, match="unfinished work from a run with other inputs or params"):
        with open_output(out, stage="demo", params={"n": 2}, inputs={}, resumable=True):
            pass
    with open_output(out, stage="demo", params={"n": 1}, inputs={}, resumable=True) as again:
        assert again.resumed
        assert (again.work / "part-0.bin").exists()
    assert artifacts.is_complete(out) and not partial.exists()
