"""batctl.metrics: multiple choice against a hand computation, weight differences, benchmark files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from batctl.errors import BatctlError
from batctl.metrics.benchmark import read_benchmark
from batctl.metrics.lm import encode_pair, evaluate_multiple_choice, token_metrics
from batctl.metrics.options import EvalOptions
from batctl.metrics.weights import adapter_checkpoints, weight_difference
from batctl.tiny import build_tiny_lm

QUESTIONS = [
    # a context with a trailing space: the harness moves it into the continuation
    {
        "context": "The capital of France is ",
        "choices": ["Paris.", "Berlin, of course.", "a dog"],
        "label": 0,
    },
    {"context": "A photo of a", "choices": ["dog", "cat"], "label": 1},
    {
        "context": "Question: How many legs does a spider have? Answer:",
        "choices": ["eight", "six legs", "none"],
        "label": 2,
    },
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("m") / "lm", seed=0)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def hand_loglikelihood(model, tok, context: str, choice: str) -> float:
    """BOS + context, then " " + choice; one unbatched forward, log_softmax, manual token split."""
    continuation = " " + choice
    if context.endswith(" "):  # lm-evaluation-harness's _encode_pair, written out
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        context = stripped
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx) :]
    assert cont and whole[: len(ctx)] == ctx
    ids = [tok.bos_token_id] + ctx + cont
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    first = len(ids) - len(cont)  # position of the first continuation token
    return sum(float(logprobs[first - 1 + j, token]) for j, token in enumerate(cont))


def test_multiple_choice_matches_a_hand_computation(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    hand = [
        [hand_loglikelihood(model, tok, q["context"], c) for c in q["choices"]] for q in QUESTIONS
    ]
    preds = [int(np.argmax(lls)) for lls in hand]
    preds_norm = [
        int(np.argmax(np.array(lls) / [len(c) for c in q["choices"]]))
        for lls, q in zip(hand, QUESTIONS, strict=True)
    ]
    # labels chosen so acc is 2/3: right on the first two questions, wrong on the third
    records = [dict(q) for q in QUESTIONS]
    records[0]["label"], records[1]["label"] = preds[0], preds[1]
    records[2]["label"] = (preds[2] + 1) % len(records[2]["choices"])
    questions = read_benchmark(write_jsonl(tmp_path / "mc.jsonl", records))

    result = evaluate_multiple_choice(
        model, tok, questions, bos=[tok.bos_token_id], device=torch.device("cpu"), batch_size=3
    )

    for got, want in zip(result.questions, hand, strict=True):
        assert got["loglikelihoods"] == pytest.approx(want, abs=1e-5)
    assert [q["pred"] for q in result.questions] == preds
    assert [q["pred_norm"] for q in result.questions] == preds_norm
    labels = [r["label"] for r in records]
    assert result.acc == pytest.approx(2 / 3)
    assert result.acc_norm == pytest.approx(
        np.mean([p == lab for p, lab in zip(preds_norm, labels, strict=True)])
    )


def test_lm_task_family_metrics_token_weighted_nll_and_benchmark(tiny_lm, tmp_path):
    from batctl.data import open_pool
    from batctl.tasks import load_task
    from batctl.tasks.base import TaskSettings

    data = write_jsonl(
        tmp_path / "h.jsonl",
        [{"text": "The quick brown fox."}, {"text": "A photo of a cat on a table, a dog."}],
    )
    heldout = list(open_pool(str(data)))
    questions = read_benchmark(write_jsonl(tmp_path / "mc.jsonl", QUESTIONS))
    task = load_task(TaskSettings(model=str(tiny_lm)))
    metrics = task.family_metrics(
        heldout, EvalOptions(batch_size=2, benchmark=questions), tmp_path, "back/bone"
    )

    total, count = 0.0, 0
    for sample in heldout:  # one sample per forward: no padding involved
        with torch.no_grad():
            nll, n = task.token_nll(task.collate([sample], "adaptation"))
        total, count = total + float(nll), count + int(n)
    assert metrics["nll"] == pytest.approx(total / count, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    direct = evaluate_multiple_choice(
        task.model, task.tokenizer, questions, bos=task.bos, device=task.device
    )
    assert (metrics["acc"], metrics["acc_norm"]) == (direct.acc, direct.acc_norm)
    logged = [
        json.loads(line)
        for line in (tmp_path / "benchmark-back_bone.jsonl").read_text().splitlines()
    ]
    assert [q["line"] for q in logged] == [1, 2, 3]


def test_encode_pair_moves_trailing_space_into_the_continuation(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    ctx, cont = encode_pair(tok, "A photo of a ", " dog")
    assert tok.decode(ctx) == "A photo of a" and tok.decode(cont) == "  dog"


def test_token_metrics():
    assert token_metrics(6.0, 3) == {"nll": 2.0, "perplexity": pytest.approx(math.exp(2.0))}
    assert token_metrics(0.0, 0) == {}


def test_weight_difference_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    names = ["b.lora_A.weight", "a.lora_B.weight", "c.magnitude"]
    shapes = [(4, 16), (16, 4), (16,)]
    theta = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes, strict=True)}
    star = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes, strict=True)}

    diff = weight_difference(theta, star)

    flat = lambda d: torch.cat([d[n].flatten() for n in names])  # noqa: E731
    want = torch.linalg.norm(flat(theta) - flat(star))
    assert diff.absolute == pytest.approx(float(want), rel=1e-6)
    assert diff.relative == pytest.approx(float(want / torch.linalg.norm(flat(star))), rel=1e-6)
    assert weight_difference(star, star).absolute == 0.0


def test_weight_difference_refuses_other_names_or_shapes():
    star = {"x.lora_A.weight": torch.ones(2, 3)}
    with pytest.raises(BatctlError, match="different adapter parameters"):
        weight_difference({"y.lora_A.weight": torch.ones(2, 3)}, star, "--adapter a")
    with pytest.raises(
        BatctlError, match=r"differ in shape at x.lora_A.weight: \(4, 3\) vs \(2, 3\)"
    ):
        weight_difference({"x.lora_A.weight": torch.ones(4, 3)}, star, "--adapter a")


def test_adapter_checkpoints_sorted_by_step(tmp_path):
    for step in (10, 2, 30):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step}" / "adapter_config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-x").mkdir()
    (tmp_path / "checkpoints" / "step-40").mkdir()  # no adapter inside: not a checkpoint
    assert [s for s, _ in adapter_checkpoints(tmp_path)] == [2, 10, 30]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"context": "a", "choices": ["x", "y"]', "not valid JSON"),
        ('["a"]', "not an object"),
        ('{"context": "a", "choices": ["x", "y"]}', "missing label"),
        ('{"context": "a", "choices": ["x"], "label": 0}', "at least 2"),
        ('{"context": "a", "choices": ["x", ""], "label": 0}', "non-empty"),
        ('{"context": "a", "choices": ["x", "y"], "label": 2}', "label must be an integer index"),
        ('{"context": 3, "choices": ["x", "y"], "label": 0}', "context must be a string"),
    ],
)
def test_bad_benchmark_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(QUESTIONS[1]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(BatctlError) as info:
        read_benchmark(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and problem in message and "\n" not in message


def test_empty_benchmark_is_an_error(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(BatctlError, match="no questions"):
        read_benchmark(path)
