"""Config dataclasses: docstrings become help, TOML merges under the command line, all problems at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from batctl.stages.score import ScoreConfig
from batctl.stages.select import SelectConfig, parse_gammas
from hypothesis import given
from hypothesis import strategies as st

from batctl.cli import STAGES, build_config
from batctl.config import field_docs, field_specs, flag_name, parse_shard
from batctl.errors import UsageError


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_field_of_every_stage_config_is_documented_and_frozen(name):
    cls = STAGES[name][0]
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} lacks a docstring"
    assert cls.__dataclass_params__.frozen
    field_specs(cls)  # every annotation is one the CLI can turn into a flag


def test_flag_names_are_kebab_case():
    assert flag_name("batch_size") == "--batch-size"


def test_toml_supplies_flags_and_command_line_wins(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'model = "m"\nsurrogate = "s"\ndata = "a.json"\npool = ["p-{0..1}.tar"]\n'
        'out = "o"\nbatch-size = 8\ndamping = 0.5\n'
    )
    config = build_config("score", {"batch_size": 16, "engine": None}, toml)
    assert isinstance(config, ScoreConfig)
    assert config.batch_size == 16  # command line wins
    assert config.damping == 0.5  # from the file
    assert config.pool == ("p-{0..1}.tar",)
    assert config.surrogate == Path("s")


def test_toml_tables_per_command_serve_a_whole_pipeline(tmp_path):
    toml = tmp_path / "pipeline.toml"
    toml.write_text(
        '[select]\nscores = "runs/scores"\ngamma = "0.5,0.75"\nout = "runs/sel"\n[score]\nbatch_size = 3\n'
    )
    config = build_config("select", {}, toml)
    assert config.gamma == ("0.5,0.75",)
    assert config.out == Path("runs/sel")


def test_every_problem_is_reported_at_once_naming_its_flag(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('batch_size = "many"\nnot_a_flag = 1\nengine = "magic"\n')
    with pytest.raises(UsageError) as info:
        build_config("score", {"damping": -1.0, "shard": "9/2"}, toml)
    message = str(info.value)
    for expected in (
        "--batch-size",
        "not_a_flag",
        "--engine",
        "--damping",
        "--shard",
        "--model is required",
    ):
        assert expected in message
    assert len(message.splitlines()) >= 6


def test_unreadable_toml_is_a_usage_error(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        build_config("score", {}, bad)
    with pytest.raises(UsageError, match="does not exist"):
        build_config("score", {}, tmp_path / "missing.toml")


def test_params_leave_out_operational_fields():
    config = SelectConfig(scores=Path("s"), gamma=("0.5",), out=Path("o"), force=True)
    params = config.params()
    assert "force" not in params and params["strict_fingerprints"] is False
    assert params["scores"] == "s" and params["gamma"] == ["0.5"]


def test_gamma_parsing():
    assert parse_gammas(("0.9,0.5", "0.75")) == ([0.5, 0.75, 0.9], False, [])
    gammas, auto, problems = parse_gammas(("auto", "1.5", "x"))
    assert auto and gammas == [] and len(problems) == 2


@given(st.integers(0, 50), st.integers(1, 50))
def test_shard_parsing_accepts_exactly_valid_pairs(i, n):
    if i < n:
        assert parse_shard(f"{i}/{n}") == (i, n)
    else:
        with pytest.raises(ValueError):
            parse_shard(f"{i}/{n}")


@given(st.text(max_size=8))
def test_shard_parsing_never_crashes_on_garbage(text):
    try:
        i, n = parse_shard(text)
    except ValueError:
        return
    assert 0 <= i < n
