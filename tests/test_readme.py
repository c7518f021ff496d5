"""Every `sh` block of README.md runs as written, from a clone's root, on shipped data.

The blocks run in order in one scratch directory that sees the repository's `examples/` (so
`runs/` lands there, not in the clone), with the installed `batctl` on PATH, under
`bash -euo pipefail`: a command that fails fails the test, naming the block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)

NOT_RUN = {
    "make demo": "installs the project and runs the demo (tests/test_demo_lm.py runs the demo)",
}
"""Blocks the test does not run, by their first command, and why: only the install block."""

SLOW = ("batctl tiny diffusion",)
"""Blocks marked slow (tiny Stable Diffusion on CPU: minutes), by their first command."""


def readme_blocks() -> list[str]:
    return [m.group(1) for m in FENCE.finditer(README.read_text(encoding="utf-8"))]


def _first_command(block: str) -> str:
    return next(line for line in block.splitlines() if line.strip()).split("#")[0].strip()


def _params() -> list:
    params = []
    for i, block in enumerate(readme_blocks()):
        first = _first_command(block)
        if first in NOT_RUN:
            continue
        marks = [pytest.mark.slow] if first.startswith(SLOW) else []
        params.append(
            pytest.param(i, block, id=f"block{i}-" + "-".join(first.split()[1:3]), marks=marks)
        )
    return params


def test_the_readme_blocks_are_the_ones_this_test_knows() -> None:
    firsts = [_first_command(b) for b in readme_blocks()]
    assert set(NOT_RUN) <= set(firsts), "a block NOT_RUN names is gone: update NOT_RUN"
    assert sum(f.startswith(SLOW) for f in firsts) == len(SLOW)
    assert len(firsts) >= 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    (root / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    return root


def _run_block(block: str, workdir: Path) -> subprocess.CompletedProcess:
    """One README block under bash -euo pipefail, with this environment's batctl first on PATH."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize(("index", "block"), _params())
def test_readme_block_runs_as_written(index: int, block: str, workdir: Path) -> None:
    proc = _run_block(block, workdir)
    assert proc.returncode == 0, f"README block {index} failed:\n{block}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr
    for out in re.findall(r"--out (\S+)", block):
        assert (workdir / out / "manifest.json").is_file(), out
    if "runs/eval" in block:
        metrics = json.loads((workdir / "runs/eval/metrics.json").read_text())
        assert metrics  # the eval row of every adapter, against the oracle
        # and everything is up to date the second time, without loading a model
        again = _run_block(block, workdir)
        assert again.returncode == 0
        outputs = len(re.findall(r"--out ", block)) + len(re.findall(r"^batctl tiny ", block, re.M))
        assert again.stderr.count("is up to date") == outputs, again.stderr


def test_the_readme_pipeline_toml_parses_for_every_stage(tmp_path: Path) -> None:
    from batctl.cli import build_config

    text = README.read_text(encoding="utf-8")
    (toml,) = re.findall(r"^ *```toml\n(.*?)^ *```", text, re.S | re.M)
    path = tmp_path / "pipeline.toml"
    path.write_text("\n".join(line.strip() for line in toml.splitlines()) + "\n")
    for stage in ("surrogate", "score", "select", "train", "eval"):
        config = build_config(stage, {}, path)
        assert config.out is not None
    assert build_config("eval", {}, path).data.endswith("heldout.jsonl")
    assert not build_config("select", {}, path).loads_model


def test_the_readme_pipeline_toml_loads_for_every_stage(monkeypatch, tmp_path) -> None:
    """The README's pipeline file (a `toml` block) is valid for each of the five stages."""
    from batctl.cli import build_config

    blocks = re.findall(
        r"^( *)```toml\n(.*?)^\1```", README.read_text(encoding="utf-8"), re.S | re.M
    )
    assert len(blocks) == 1, "the README's pipeline.toml block is gone or doubled"
    indent, body = blocks[0]
    text = "\n".join(line[len(indent) :] for line in body.splitlines())
    monkeypatch.chdir(REPO)  # its paths are a clone's (examples/...)
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    for stage in ("surrogate", "score", "select", "train", "eval"):
        config = build_config(stage, {}, path)
        assert config.out is not None, stage
