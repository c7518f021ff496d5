"""Progress on stderr: plain unwrapped lines at an interval in a pipe, a live bar on a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batctl.tiny import write_tiny

REPO = Path(__file__).resolve().parents[1]
DOMAIN = REPO / "examples" / "tiny-lm" / "data" / "domain.jsonl"
LINE = re.compile(
    r"^train: (\d+)/(\d+) steps \(\d+%\) loss=\S+ lr=\S+ \S+ steps/s elapsed \S+( eta \S+)?$"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("progress") / "model"
    write_tiny("lm", path)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("COLUMNS", None)
    return env


def test_train_in_a_pipe_prints_one_plain_line_per_interval(model: Path, tmp_path: Path) -> None:
    # A deep output path makes the log lines longer than rich's 80 columns for a non-terminal.
    out = tmp_path / ("a-long-directory-name-" * 4) / "bat"
    interval = 0.25
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "batctl", "train", "--model", str(model), "--data", str(DOMAIN)]
        + ["--out", str(out), "--steps", "200", "--batch-size", "2"],
        capture_output=True,
        text=True,
        env=_env(BATCTL_PROGRESS_INTERVAL=str(interval)),
        timeout=300,
    )
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    progress = [line for line in lines if line.startswith("train:")]
    assert all(LINE.match(line) for line in progress), progress
    done = [int(LINE.match(line).group(1)) for line in progress]
    assert done == sorted(done) and done[-1] == 200  # the last line is the finished loop
    # one line per interval while the loop runs (and one at the end): never more
    assert 2 <= len(progress) <= wall / interval + 2
    # every other stderr line is a whole event too: a level word or "error:" first, nothing
    # wrapped onto a continuation line
    for line in lines:
        if not line.startswith("train:"):
            assert re.match(r"^(INFO|WARNING|ERROR|DEBUG) \S", line), line
    # no ANSI escapes, no carriage returns: greppable
    assert "\x1b[" not in proc.stderr and "\r" not in proc.stderr


def test_train_on_a_terminal_shows_the_live_bar(model: Path, tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batctl", "train", "--model", str(model), "--data", str(DOMAIN)]
        + ["--out", str(tmp_path / "bat"), "--steps", "60", "--batch-size", "2"],
        stdout=subprocess.DEVNULL,
        stderr=secondary,
        env=_env(TERM="xterm-256color", COLUMNS="150"),
    )
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(primary)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen
    assert "━" in screen  # rich's bar
    assert "60/60" in screen and "steps/s" in screen and "loss=" in screen
    assert "\x1b[" in screen  # a live display redraws with escape codes
