"""`--help` reads the same for every flag, and the fast paths import neither torch nor
transformers (`batctl --help`, `info`, an up-to-date `select`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batctl.cli import STAGES, app

from .select_fixtures import make_score_dir, write_text_pool

COMMANDS = [*STAGES, "info", "tiny"]
HEAVY = ("torch", "transformers", "diffusers", "peft", "accelerate", "pydantic")
PROBE = """
import json, sys
from batctl.cli import main
sys.argv = ["batctl", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open({out!r}, "w") as f:
    json.dump({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}, f)
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_one_way_and_no_python_reprs(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "[default:" not in text  # typer's own style; ours is "(default: ...)"
    assert not re.search(r"\('|\(\"|\[\'", text), text  # tuple or list reprs
    assert not re.search(r"\{\w+\}|<(path|int|str|text|float)>", text), text
    if command in ("surrogate", "train"):
        for flag, default in (("--seed", "0"), ("--dropout", "0.0"), ("--warmup-steps", "0")):
            flat = " ".join(text.split())
            assert re.search(rf"{flag} [A-Z]+ [^()]*\(default: {default}\)", flat), flat


def _probe(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "probe.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", PROBE.format(out=str(out), heavy=HEAVY), *args],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return json.loads(out.read_text())


def test_help_and_up_to_date_select_and_info_import_no_torch(tmp_path: Path) -> None:
    assert _probe(tmp_path, "--help") == {"code": 0, "heavy": []}
    pool = write_text_pool(tmp_path)
    scores = make_score_dir(tmp_path / "scores", pool, n=8)
    args = ["select", "--scores", str(scores), "--gamma", "0.5", "--out", str(tmp_path / "sel")]
    first = _probe(tmp_path, *args)
    assert first["code"] == 0
    again = _probe(tmp_path, *args)  # up to date
    assert again == {"code": 0, "heavy": []}
    assert _probe(tmp_path, "info", str(scores)) == {"code": 0, "heavy": []}
    assert _probe(tmp_path, "info", str(tmp_path / "sel")) == {"code": 0, "heavy": []}
