"""One pipeline TOML serves all five stages: shared top-level keys, one table per command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batctl.cli import build_config
from batctl.errors import UsageError
from batctl.tiny import write_tiny

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "tiny-lm" / "data"

PIPELINE = """\
# shared: these mean the same thing in every command that has them
model = "{root}/model"
data = "{data}/domain.jsonl"
steps = 6
batch-size = 4
lr = 1e-2

[surrogate]
out = "{root}/surrogate"

[score]
method = "influence"  # the default, mmr, reads no surrogate
surrogate = "{root}/surrogate"  # a top-level key cannot share a table's name
pool = ["{data}/pool-{{000..001}}.jsonl"]
out = "{root}/scores"
chunk-size = 64

[select]
scores = "{root}/scores"
gamma = "0.5,0.75"
out = "{root}/select"

[train]
selection = "{root}/select/gamma-0.75"
out = "{root}/bat"

[eval]
data = "{data}/heldout.jsonl"
adapter = ["{root}/bat"]
reference = "{root}/surrogate"
out = "{root}/eval"
"""


def test_one_toml_runs_all_five_stages(cli, tmp_path: Path) -> None:
    write_tiny("lm", tmp_path / "model")
    toml = tmp_path / "pipeline.toml"
    toml.write_text(PIPELINE.format(root=tmp_path.as_posix(), data=DATA.as_posix()))
    for stage in ("surrogate", "score", "select", "train", "eval"):
        result = cli(stage, "--config", toml)
        assert result.exit_code == 0, (stage, result.stderr)
        # run twice: every stage is up to date from the same file
        again = cli(stage, "--config", toml)
        assert again.exit_code == 0 and "up to date" in again.stderr, (stage, again.stderr)
    # the shared model did not turn on select's Proposition 2 report
    summary = json.loads((tmp_path / "select" / "selection.json").read_text())
    assert all("holds" not in entry for entry in summary["selections"].values())
    manifest = json.loads((tmp_path / "select" / "manifest.json").read_text())
    assert "model" not in manifest["params"] and "model" not in manifest["inputs"]
    # eval's --data is the held-out set from [eval], not the shared D_A; batch-size stays eval's
    eval_params = json.loads((tmp_path / "eval" / "manifest.json").read_text())["params"]
    assert eval_params["data"].endswith("heldout.jsonl")
    train_params = json.loads((tmp_path / "bat" / "manifest.json").read_text())["params"]
    assert train_params["steps"] == 6 and train_params["data"].endswith("domain.jsonl")
    assert (tmp_path / "eval" / "report.md").is_file()


def test_prop2_is_asked_for_explicitly(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('model = "m"\n[select]\nscores = "s"\ngamma = "0.5"\nout = "o"\n')
    assert not build_config("select", {}, toml).loads_model
    toml.write_text('model = "m"\n[select]\nscores = "s"\ngamma = "0.5"\nout = "o"\nprop2 = true\n')
    with pytest.raises(UsageError) as info:
        build_config("select", {}, toml)
    message = str(info.value)
    assert "--prop2 needs" in message and "--surrogate" in message and str(toml) in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[scoree]\nbatch_size = 3\n", "unknown table [scoree]"),
        ("[score]\nbatchsize = 3\n", "[score] batchsize: score has no flag --batchsize"),
        ("modle = 'm'\n[score]\n", "unknown key 'modle'"),
        ("out = 'runs/x'\n[score]\n", "out at top level would apply to no command"),
    ],
)
def test_unknown_tables_and_keys_are_usage_errors_naming_the_file(tmp_path, text, expected):
    toml = tmp_path / "pipeline.toml"
    toml.write_text(text)
    with pytest.raises(UsageError) as info:
        build_config("select", {}, toml)
    assert expected in str(info.value) and str(toml) in str(info.value)


def test_config_errors_exit_2_and_name_the_file(cli, tmp_path: Path) -> None:
    assert cli("select", "--config", tmp_path).exit_code == 2  # a directory
    assert cli("select", "--config", tmp_path / "missing.toml").exit_code == 2
    toml = tmp_path / "pipeline.toml"
    toml.write_text('model = "m"\ndata = "nowhere.jsonl"\nsteps = 3\nout = "o"\n')
    result = cli("surrogate", "--config", toml)
    assert result.exit_code == 2
    assert "nowhere.jsonl" in result.stderr and f"--data, set in {toml}" in result.stderr
    # the same value typed on the command line: the flag is named, no file
    result = cli("surrogate", "--model", "m", "--data", "nowhere.jsonl", "--out", tmp_path / "o")
    assert "(--data)" in result.stderr and "set in" not in result.stderr
