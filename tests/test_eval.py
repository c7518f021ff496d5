"""batctl eval end to end on a tiny LM: rows, report, plots, weight differences, up to date, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batctl.tiny import build_tiny_lm

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A photo of a dog, a photo of a cat.",
    "The capital of France is Paris.",
    "A spider has eight legs.",
]
QUESTIONS = [
    {"context": "The capital of France is", "choices": ["Paris.", "Berlin."], "label": 0},
    {"context": "A photo of a", "choices": ["dog", "cat", "house"], "label": 1},
]


def invoke(*args):
    from batctl.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
    }


def eval_args(runs, out, *extra, model=None, adapter=None) -> list:
    """`batctl eval` of `adapter` (default: the surrogate) on `model` (default: the tiny LM) and
    the held-out data into `out`, plus `extra` flags."""
    return [
        "eval",
        "--model",
        model or runs["model"],
        "--data",
        runs["data"],
        "--adapter",
        adapter or runs["surrogate"],
        "--out",
        out,
        *extra,
    ]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LM, held-out data, a benchmark and one surrogate adapter with two checkpoints."""
    root = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        model = build_tiny_lm(root / "model", seed=0)
        data = write_jsonl(root / "a.jsonl", [{"text": t} for t in TEXTS])
        surrogate = root / "surrogate"
        result = invoke(
            "surrogate",
            "--model",
            model,
            "--data",
            data,
            "--out",
            surrogate,
            "--steps",
            4,
            "--save-every",
            2,
            "--batch-size",
            2,
            "--lr",
            3e-3,
        )
        assert result.exit_code == 0, result.stderr
    return {
        "root": root,
        "model": model,
        "data": data,
        "surrogate": surrogate,
        "benchmark": write_jsonl(root / "mc.jsonl", QUESTIONS),
    }


def test_eval_end_to_end_then_up_to_date(runs, cli):
    out = runs["root"] / "eval"
    args = eval_args(
        runs,
        out,
        "--reference",
        runs["surrogate"],
        "--benchmark",
        runs["benchmark"],
        "--batch-size",
        3,
    )
    result = cli(*args)
    assert result.exit_code == 0, result.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert list(rows) == ["backbone", "surrogate"]
    for row in rows.values():
        for key in ("heldout_loss", "nll", "perplexity", "acc", "acc_norm"):
            assert isinstance(row[key], float)
    assert rows["backbone"]["weight_diff"] is None
    assert rows["surrogate"]["weight_diff"] == 0.0 and rows["surrogate"]["weight_diff_rel"] == 0.0
    curve = rows["surrogate"]["weight_diff_curve"]
    checkpoints = sorted(p.name for p in (runs["surrogate"] / "checkpoints").iterdir())
    assert checkpoints == ["step-2", "step-4"]
    assert [p["step"] for p in curve] == [2, 4]
    assert curve[-1]["weight_diff"] == 0.0 and curve[0]["weight_diff"] > 0.0

    report = (out / "report.md").read_text()
    assert (
        "| row | heldout_loss | nll | perplexity | acc | acc_norm | weight_diff | weight_diff_rel |"
        in report
    )
    assert "| backbone |" in report and "| surrogate |" in report
    for png in ("weight_diff.png", "heldout_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval"
    assert set(manifest["inputs"]) == {"model", "data", "adapter", "reference", "benchmark"}

    before = snapshot(out)
    again = cli(*args)
    assert again.exit_code == 0, again.stderr
    assert "up to date" in again.stderr
    assert snapshot(out) == before


def test_eval_without_reference_says_so(runs, cli):
    out = runs["root"] / "eval-noref"
    result = cli(*eval_args(runs, out))
    assert result.exit_code == 0, result.stderr
    assert "weight difference: no --reference given" in (out / "report.md").read_text()
    assert not (out / "weight_diff.png").exists() and (out / "heldout_loss.png").exists()
    assert "acc" not in json.loads((out / "metrics.json").read_text())["rows"]["surrogate"]


def test_backbone_row_is_the_same_before_and_after_adapters(runs):
    """Adapters are taken off again: they neither stack nor leave anything on the backbone."""
    from batctl.stages.eval import evaluate_row, load_adapter, unload_adapter

    from batctl.data import open_pool
    from batctl.metrics.options import EvalOptions
    from batctl.tasks import load_task
    from batctl.tasks.base import TaskSettings

    heldout = list(open_pool(str(runs["data"])))
    options = EvalOptions(batch_size=2)
    task = load_task(TaskSettings(model=str(runs["model"])))
    final, checkpoint = runs["surrogate"], runs["surrogate"] / "checkpoints" / "step-2"
    tmp = runs["root"] / "rows"
    tmp.mkdir()

    def row(path=None):
        if path is not None:
            load_adapter(task, path)
        values = evaluate_row(task, heldout, options, tmp, "x")
        if path is not None:
            unload_adapter(task, path)
        return values

    backbone_before = row()
    checkpoint_first = row(checkpoint)
    final_row = row(final)
    checkpoint_again = row(checkpoint)
    backbone_after = row()
    assert backbone_after == backbone_before
    assert checkpoint_again == checkpoint_first
    assert final_row != checkpoint_first != backbone_before
    assert not task.trainable_parameters()


def test_malformed_benchmark_line_is_one_error_naming_file_and_line(runs, cli):
    bad = runs["root"] / "bad.jsonl"
    bad.write_text(
        json.dumps(QUESTIONS[0]) + "\n" + '{"context": "x", "choices": ["a", "b"], "label": 7}\n'
    )
    out = runs["root"] / "eval-bad-benchmark"
    result = cli(*eval_args(runs, out, "--benchmark", bad))
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and f"{bad}:2:" in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_adapter_from_another_model_is_refused_naming_the_fix(runs, cli):
    other = build_tiny_lm(runs["root"] / "other-model", seed=1)
    out = runs["root"] / "eval-other"
    result = cli(*eval_args(runs, out, model=other))
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and "--adapter" in lines[0] and "pass the --model they used" in lines[0]
    assert not out.exists()


def test_adapter_that_is_not_an_adapter_output_is_refused(runs, cli):
    out = runs["root"] / "eval-not-adapter"
    result = cli(*eval_args(runs, out, adapter=runs["model"]))
    assert result.exit_code == 1
    assert "not a finished batctl surrogate or train output" in result.stderr


def test_diffusion_eval_flags_for_an_lm_are_one_line_naming_them(runs, cli):
    out = runs["root"] / "eval-foreign-flags"
    prompts = runs["root"] / "prompts.txt"
    prompts.write_text("a photo\n")
    result = cli(*eval_args(runs, out, "--prompts", prompts, "--clip", runs["root"]))
    assert result.exit_code == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and "--clip, --prompts: not read for an lm model" in lines[0], lines
    assert not out.exists()


def test_row_labels_are_unique_and_never_backbone():
    from batctl.stages.eval import row_labels

    assert row_labels([Path("/r/a/bat"), Path("/r/b/bat"), Path("/r/base")]) == [
        "a/bat",
        "b/bat",
        "base",
    ]
    assert row_labels([Path("/r/x"), Path("/r/x")]) == ["x", "x-2"]
    assert row_labels([Path("/r/backbone")]) == ["r/backbone"]
