"""Hostile inputs: one test per numbered finding of issue 13.

Each test runs the CLI the way an adversary (or an unlucky user) would and asserts the exit
code, exactly one `error:` line (or none, for findings that must succeed), no traceback, and
that every input's bytes are unchanged afterwards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, write_jsonl
from .select_fixtures import make_score_dir, write_text_pool

FAST = ["--steps", "2", "--batch-size", "4", "--targets", "all-linear"]


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under each root (or of the root itself when it is a file)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_error(result, code: int) -> str:
    """Assert the exit code, one `error:` line and no traceback; return that line."""
    text = result.stderr
    assert result.exit_code == code, (result.exit_code, text, result.stdout)
    assert "Traceback" not in text and "Traceback" not in result.stdout, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("hostile-lm") / "tiny", seed=0)


@pytest.fixture
def domain(tmp_path):
    holder = tmp_path / "dataholder"
    holder.mkdir()
    return write_jsonl(holder / "domain.jsonl", color_records(8, seed=1))


@pytest.fixture(scope="module")
def surrogate(cli_module, lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-sur")
    data = write_jsonl(root / "domain.jsonl", color_records(8, seed=1))
    result = cli_module(
        "surrogate", "--model", lm, "--data", data, "--out", root / "sur", "--lr", "1e-2", *FAST
    )
    assert result.exit_code == 0, result.stderr
    return root / "sur", data


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from batctl.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], terminal_width=200)


# --------------------------------------------------------------------------- data loss (1-3)


def test_01_out_holding_the_data_is_refused_even_with_force(cli, lm, domain):
    holder = domain.parent
    before = tree_hashes(holder, lm)
    result = cli("train", "--model", lm, "--data", domain, "--out", holder, "--force", *FAST)
    line = one_error(result, 2)
    assert "holds the --data input" in line
    assert tree_hashes(holder, lm) == before


def test_02_out_equal_to_the_model_is_refused_even_with_force(cli, lm, tmp_path):
    copy = tmp_path / "mcopy"
    import shutil

    shutil.copytree(lm, copy)
    data = write_jsonl(tmp_path / "d.jsonl", color_records(8, seed=1))
    before = tree_hashes(copy, data)
    result = cli("train", "--model", copy, "--data", data, "--out", copy, "--force", *FAST)
    assert "is the --model input itself" in one_error(result, 2)
    # inside the model directory is refused too: it would change the model's fingerprint
    result = cli("train", "--model", copy, "--data", data, "--out", copy / "runs", *FAST)
    assert "lies inside the --model input" in one_error(result, 2)
    assert tree_hashes(copy, data) == before


def test_03_cwd_and_foreign_directories_are_never_removed(cli, tmp_path, monkeypatch):
    pool = write_text_pool(tmp_path)
    scores = make_score_dir(tmp_path / "scores", pool, n=4)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes\n")
    watched = (notes, scores, *pool)
    before = tree_hashes(*watched)
    monkeypatch.chdir(notes)
    args = ["select", "--scores", scores, "--gamma", "0.5", "--force"]
    assert "is or holds the current directory" in one_error(cli(*args, "--out", "."), 2)
    monkeypatch.chdir(tmp_path)
    # a directory with the user's files, not the cwd: still never removed by --force
    line = one_error(cli(*args, "--out", notes), 1)
    assert "not written by batctl" in line
    assert tree_hashes(*watched) == before
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    assert cli(*args, "--out", tmp_path / "empty").exit_code == 0
    assert tree_hashes(*watched) == before
