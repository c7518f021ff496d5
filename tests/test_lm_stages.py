"""surrogate and train on a tiny LM, end to end through the CLI, plus the adapter format contract."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from batctl.tasks.base import TaskSettings
from batctl.tasks.lm import LMTask
from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, make_selection, write_jsonl

FAST = ["--steps", "12", "--lr", "1e-2", "--batch-size", "4", "--targets", "all-linear"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", seed=0)


@pytest.fixture
def domain(tmp_path):
    return write_jsonl(tmp_path / "domain.jsonl", color_records(12, seed=1))


def test_surrogate_then_train_writes_the_adapter_tree_and_learns(cli, lm, domain, tmp_path):
    result = cli(
        "surrogate",
        "--model",
        lm,
        "--data",
        domain,
        "--out",
        tmp_path / "sur",
        "--save-every",
        "4",
        *FAST,
    )
    assert result.exit_code == 0, result.stderr
    sur = tmp_path / "sur"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "log.jsonl",
        "loss.png",
        "manifest.json",
    ):
        assert (sur / name).is_file()
    assert sorted(p.name for p in (sur / "checkpoints").iterdir()) == [
        "step-12",
        "step-4",
        "step-8",
    ]
    log = [json.loads(line) for line in (sur / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])
    manifest = json.loads((sur / "manifest.json").read_text())
    assert manifest["stage"] == "surrogate" and manifest["params"]["rank"] == 8
    assert manifest["inputs"]["data"][0]["path"] == str(domain.resolve())

    selection = make_selection(tmp_path / "sel", lm, color_records(6, seed=7))
    args = [
        "train",
        "--model",
        lm,
        "--data",
        domain,
        "--selection",
        selection,
        "--out",
        tmp_path / "bat",
        *FAST,
    ]
    result = cli(*args, "--mix", "interleave", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["backbone_samples"] == 6 and summary["adaptation_samples"] == 12
    assert summary["last_loss"] < summary["first_loss"]

    # eval: the trained adapter fits its own domain better than the backbone on held-out samples.
    heldout = write_jsonl(tmp_path / "heldout.jsonl", color_records(8, seed=99))
    eval_args = [
        "eval",
        "--model",
        lm,
        "--data",
        heldout,
        "--adapter",
        tmp_path / "bat",
        "--out",
        tmp_path / "eval",
    ]
    result = cli(*eval_args, "--reference", tmp_path / "sur")
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in (tmp_path / "eval").iterdir()} >= {
        "metrics.json",
        "report.md",
        "heldout_loss.png",
        "manifest.json",
    }
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["rows"]
    assert rows["bat"]["nll"] < rows["backbone"]["nll"]
    assert rows["bat"]["perplexity"] < rows["backbone"]["perplexity"]
    assert rows["bat"]["weight_diff"] > 0
    assert "| bat |" in (tmp_path / "eval" / "report.md").read_text()

    # Twice the same: up to date, nothing rewritten.
    for out, again in (
        ("bat", [*args, "--mix", "interleave"]),
        ("eval", [*eval_args, "--reference", tmp_path / "sur"]),
    ):
        before = (tmp_path / out / "manifest.json").read_bytes()
        result = cli(*again)
        assert result.exit_code == 0 and "up to date" in result.stderr
        assert (tmp_path / out / "manifest.json").read_bytes() == before


def test_train_from_the_surrogate_starts_at_its_weights(cli, lm, domain, tmp_path):
    assert (
        cli(
            "surrogate", "--model", lm, "--data", domain, "--out", tmp_path / "sur", *FAST
        ).exit_code
        == 0
    )
    result = cli(
        "train",
        "--model",
        lm,
        "--data",
        domain,
        "--out",
        tmp_path / "ft",
        "--init",
        "surrogate",
        "--surrogate",
        tmp_path / "sur",
        "--steps",
        "1",
        "--lr",
        "1e-9",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    start = load_file(tmp_path / "sur" / "adapter_model.safetensors")
    after = load_file(tmp_path / "ft" / "adapter_model.safetensors")
    assert start.keys() == after.keys()
    assert max((start[k] - after[k]).abs().max().item() for k in start) < 1e-6


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_saved_adapter_loads_in_peft_with_the_same_logits(cli, lm, domain, tmp_path, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / adapter
    result = cli(
        "surrogate", "--model", lm, "--data", domain, "--out", out, "--adapter", adapter, *FAST
    )
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == (adapter == "dora")

    ours = LMTask(TaskSettings(str(lm)))
    ours.load_adapter(out)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm), out).eval()
    ids = AutoTokenizer.from_pretrained(lm)(
        "What color is item 5? Item 5 is red.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        a = ours.model(input_ids=ids).logits
        b = theirs(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(lm)(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5
    assert (a - base).abs().max().item() > 1e-3  # the adapter really changed the model


def test_same_seed_same_bits_other_seed_other_adapter(cli, lm, domain, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = cli(
            "surrogate",
            "--model",
            lm,
            "--data",
            domain,
            "--out",
            tmp_path / name,
            "--seed",
            str(seed),
            "--dropout",
            "0.1",
            *FAST,
        )
        assert result.exit_code == 0, result.stderr
    a, b, c = ((tmp_path / n / "adapter_model.safetensors").read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_a_data_file_without_usable_samples_is_one_clear_line(cli, lm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no known fields"}\nnot json at all\n')
    result = cli("surrogate", "--model", lm, "--data", bad, "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no usable samples" in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_targets_matching_no_module_is_a_usage_error(cli, lm, domain, tmp_path):
    result = cli(
        "surrogate",
        "--model",
        lm,
        "--data",
        domain,
        "--out",
        tmp_path / "o",
        "--targets",
        "attn_qkv",
    )
    assert result.exit_code == 2
    assert "--targets attn_qkv: no such module" in result.stderr and "q_proj" in result.stderr


def test_a_selection_from_another_model_is_refused_before_training(cli, lm, domain, tmp_path):
    other = build_tiny_lm(tmp_path / "other", seed=5)
    selection = make_selection(tmp_path / "sel", other, color_records(3, seed=2))
    result = cli(
        "train",
        "--model",
        lm,
        "--data",
        domain,
        "--selection",
        selection,
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert result.exit_code == 1
    assert "was built on model" in result.stderr and "--model" in result.stderr
    assert not (tmp_path / "o").exists()
