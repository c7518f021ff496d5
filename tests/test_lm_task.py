"""The LM task: Alpaca/text collation, masking, truncation and per-sample losses."""

from __future__ import annotations

import json

import pytest
import torch

from batctl.data import open_pool
from batctl.tasks import detect_family, load_task
from batctl.tasks.base import AdapterSettings, TaskSettings
from batctl.tasks.lm import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE,
    LMTask,
    alpaca_prompt,
    fit_to_length,
)
from batctl.tiny import build_tiny_lm


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", seed=0)


def samples_of(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return list(open_pool([str(path)]))


def test_family_is_detected_from_the_directory(lm_dir, tmp_path):
    assert detect_family(str(lm_dir)) == "lm"
    (tmp_path / "model_index.json").write_text("{}")
    assert detect_family(str(tmp_path)) == "diffusion"


def test_alpaca_template_matches_stanford_alpaca():
    assert alpaca_prompt(
        {"instruction": "Add.", "input": "1 2", "output": "3"}
    ) == ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="1 2")
    assert alpaca_prompt({"instruction": "Hi.", "input": "", "output": "x"}).endswith(
        "### Instruction:\nHi.\n\n### Response:\n"
    )
    assert ALPACA_PROMPT.startswith(
        "Below is an instruction that describes a task. Write a response"
    )


def test_alpaca_prompt_tokens_are_masked_and_response_and_eos_are_learned(lm_dir, tmp_path):
    task = load_task(TaskSettings(str(lm_dir)))
    (alpaca, text) = samples_of(
        tmp_path,
        [{"instruction": "Name a color.", "input": "", "output": "Blue."}, {"text": "plain words"}],
    )
    tok = task.tokenizer
    prompt_ids = [tok.bos_token_id] + tok.encode(
        alpaca_prompt(alpaca.record), add_special_tokens=False
    )
    response_ids = tok.encode("Blue.", add_special_tokens=False) + [tok.eos_token_id]
    batch = task.collate([alpaca, text], "adaptation")
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    n = len(prompt_ids) + len(response_ids)
    assert ids[:n].tolist() == prompt_ids + response_ids
    assert labels[: len(prompt_ids)].eq(IGNORE).all()
    assert labels[len(prompt_ids) : n].tolist() == response_ids
    assert mask[:n].all() and not mask[n:].any() and labels[n:].eq(IGNORE).all()
    text_ids = tok.encode("plain words", add_special_tokens=False) + [tok.eos_token_id]
    assert batch["labels"][1][1 : 1 + len(text_ids)].tolist() == text_ids


def test_per_sample_loss_is_the_mean_token_nll_of_each_sample_alone(lm_dir, tmp_path):
    task = load_task(TaskSettings(str(lm_dir)))
    samples = samples_of(
        tmp_path,
        [
            {"instruction": "Say hi.", "input": "politely", "output": "Hello there, friend."},
            {"text": "short"},
            {"text": "a much longer line of text that pads the others in the batch"},
        ],
    )
    with torch.no_grad():
        together = task.per_sample_loss(task.collate(samples, "pool"))
        for i, sample in enumerate(samples):
            batch = task.collate([sample], "pool")
            logits = task.model(input_ids=batch["input_ids"]).logits[0, :-1]
            targets = batch["labels"][0, 1:]
            keep = targets != IGNORE
            manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
            torch.testing.assert_close(together[i], manual, rtol=1e-5, atol=1e-5)


def test_truncation_keeps_response_tokens_and_is_counted(lm_dir, tmp_path):
    task = LMTask(TaskSettings(str(lm_dir), max_length=16))
    (long,) = samples_of(tmp_path, [{"instruction": "x " * 50, "input": "", "output": "y " * 50}])
    batch = task.collate([long], "adaptation")
    assert batch["input_ids"].shape[1] == 16
    assert batch["input_ids"][0, 0] == task.tokenizer.bos_token_id  # BOS survives the cut
    assert (batch["labels"][0] != IGNORE).sum() == 7  # half of the 15 tokens after BOS
    task.collate([long], "adaptation")  # a second epoch re-encodes the same sample
    assert task.counters() == {"truncated_samples": 1}


@pytest.mark.parametrize(
    ("prompt", "response", "limit"), [(10, 3, 8), (3, 10, 8), (2, 2, 8), (0, 20, 5), (20, 1, 4)]
)
def test_fit_to_length_keeps_the_end_of_the_prompt_and_the_start_of_the_response(
    prompt, response, limit
):
    p, r = list(range(prompt)), list(range(100, 100 + response))
    fp, fr = fit_to_length(p, r, limit)
    assert len(fp) + len(fr) == min(limit, prompt + response)
    assert fr == r[: len(fr)] and fp == p[len(p) - len(fp) :]
    assert len(fr) >= min(response, limit // 2)


def test_unknown_targets_name_the_flag_and_list_the_modules(lm_dir):
    from batctl.errors import UsageError

    task = load_task(TaskSettings(str(lm_dir)))
    with pytest.raises(UsageError, match=r"--targets nope: no such module.*q_proj"):
        task.add_adapter(AdapterSettings(targets=("nope",)), seed=0)


def test_locon_is_refused_for_language_models(lm_dir):
    from batctl.errors import UsageError

    task = load_task(TaskSettings(str(lm_dir)))
    with pytest.raises(UsageError, match="locon"):
        task.add_adapter(AdapterSettings(kind="locon"), seed=0)


def test_text_encoder_adapter_is_refused_for_language_models(lm_dir):
    from batctl.errors import UsageError

    task = load_task(TaskSettings(str(lm_dir)))
    with pytest.raises(UsageError, match="--train-text-encoder"):
        task.add_adapter(AdapterSettings(text_encoder=True), seed=0)
