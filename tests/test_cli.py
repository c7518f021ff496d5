"""The CLI parses, exits with the documented codes, and keeps stdout for results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from batctl import __version__
from batctl.cli import STAGES
from batctl.config import field_specs, flag_name

COMMANDS = sorted(STAGES) + ["info", "tiny"]


def test_top_level_help_lists_every_command(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", sorted(STAGES))
def test_stage_help_lists_every_flag_with_its_docstring(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for spec in field_specs(STAGES[command][0]):
        assert flag_name(spec.name) in text
        assert " ".join(spec.doc.split())[:30] in text
    for common in ("--config", "--json", "--debug"):
        assert common in text


@pytest.mark.parametrize("command", ["info", "tiny"])
def test_other_commands_have_help(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"batctl {__version__}"


def test_missing_and_bad_flags_exit_2_listing_every_problem_without_traceback(cli):
    result = cli("score", "--batch-size", "0", "--engine", "fast")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    for expected in ("--engine", "--batch-size", "--model is required", "--pool is required"):
        assert expected in result.stderr
    assert result.stdout == ""


def test_demo_flags_are_checked_before_anything_runs(cli, tmp_path):
    result = cli("demo", "--out", tmp_path / "demo", "--gamma", "1.5", "--preconditioner", "magic")
    assert result.exit_code == 2
    assert "--gamma" in result.stderr and "--preconditioner magic" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_gamma_outside_unit_interval_is_a_usage_error(cli, tmp_path):
    result = cli("select", "--scores", tmp_path, "--out", tmp_path / "o", "--gamma", "1.5")
    assert result.exit_code == 2 and "outside (0, 1)" in result.stderr


def test_info_json_goes_to_stdout_only(cli, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    result = cli("info", tmp_path, "--json")
    assert result.exit_code == 0
    described = json.loads(result.stdout)
    assert described["state"] == "input" and described["samples"] == 2


def test_info_describes_pool_data_as_a_pool(cli, tmp_path):
    for i in range(3):
        lines = "".join(f'{{"text": "part {i} row {j}"}}\n' for j in range(i + 1))
        (tmp_path / f"pool-{i:03d}.jsonl").write_text(lines)
    for spec in (tmp_path, f"{tmp_path}/pool-{{000..002}}.jsonl", f"{tmp_path}/pool-*.jsonl"):
        result = cli("info", spec, "--json")
        assert result.exit_code == 0, result.stderr
        described = json.loads(result.stdout)
        assert (described["kind"], described["format"]) == ("data", "jsonl")
        assert (described["parts"], described["samples"]) == (3, 6)
    result = cli("info", tmp_path)
    assert result.exit_code == 0 and "samples" in result.stdout and "parts" in result.stdout
    # one part of a brace range missing: one line naming it, no table
    result = cli("info", f"{tmp_path}/pool-{{000..003}}.jsonl")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "pool-003.jsonl' does not exist" in result.stderr


def test_info_refuses_what_is_neither_artifact_nor_data(cli, tmp_path):
    (tmp_path / "notes.md").write_text("hello\n")
    for path in (tmp_path / "notes.md", tmp_path):
        result = cli("info", path)
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and "not a batctl output" in result.stderr


def test_info_on_nothing_fails_with_one_line(cli, tmp_path):
    result = cli("info", tmp_path / "nope")
    assert result.exit_code == 1
    assert "nothing there" in result.stderr


def test_python_dash_m_and_console_script_agree():
    out = subprocess.run(
        [sys.executable, "-m", "batctl", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"batctl {__version__}"


def test_help_does_not_import_torch():
    # `batctl --help` and `select` must start fast: heavy imports belong inside the task modules.
    code = (
        "import sys; from batctl.cli import app; import batctl.info; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_batctl_tiny_builds_loadable_backbones_and_is_up_to_date_the_second_time(tmp_path):
    lm, diffusion = tmp_path / "t", tmp_path / "d"
    for family, path in (("lm", lm), ("diffusion", diffusion)):
        done = subprocess.run(
            ["batctl", "tiny", family, str(path), "--json"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["bytes"] < 5_000_000
        again = subprocess.run(
            ["batctl", "tiny", family, str(path)], capture_output=True, text=True
        )
        assert again.returncode == 0 and "up to date" in again.stderr
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from diffusers import StableDiffusionPipeline
tok = AutoTokenizer.from_pretrained({str(lm)!r}); model = AutoModelForCausalLM.from_pretrained({str(lm)!r})
ids = tok("hello world", return_tensors="pt").input_ids
assert model(ids).logits.shape[:2] == ids.shape
pipe = StableDiffusionPipeline.from_pretrained({str(diffusion)!r})
image = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
image.save({str(tmp_path / "image.png")!r})
print(image.size)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().endswith("(32, 32)")
    info = subprocess.run(
        ["batctl", "info", str(diffusion), "--json"], capture_output=True, text=True
    )
    described = json.loads(info.stdout)
    assert described["stage"] == "tiny" and described["family"] == "diffusion"


def test_batctl_tiny_refuses_a_directory_it_did_not_write(cli, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    result = cli("tiny", "lm", tmp_path / "mine")
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (tmp_path / "mine" / "keep.txt").exists()


def test_info_counts_the_samples_of_a_data_file(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    result = cli("info", data, "--json")
    assert result.exit_code == 0
    described = json.loads(result.stdout)
    assert described["format"] == "jsonl" and described["samples"] == 3


def test_an_os_error_is_one_line_not_a_traceback(cli, tmp_path):
    result = cli(
        "select",
        "--config",
        tmp_path,
        "--scores",
        tmp_path,
        "--out",
        tmp_path / "o",
        "--gamma",
        "0.5",
    )
    assert result.exit_code in (1, 2)
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
