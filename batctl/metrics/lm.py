"""Causal-LM metrics: token-weighted NLL and perplexity, multiple-choice accuracy.

Multiple choice is scored as lm-evaluation-harness scores `output_type: multiple_choice`:

- each choice c of a question becomes a log-likelihood request (context, " " + c);
- trailing whitespace of the context moves to the front of the continuation; the continuation's
  tokens are the tokens of (context + continuation) minus the tokens of the context alone
  (`_encode_pair`), both encoded without special tokens;
- the request is scored conditioned on BOS + context tokens (EOS when the tokenizer has no BOS
  and the context is empty); the sequence is cut from the left to `max_length` + 1 tokens;
- `acc`: argmax over choices of the summed continuation log-likelihood;
  `acc_norm`: argmax of that log-likelihood divided by the choice's length in characters
  (`len(choice)`, without the delimiter space, as the harness's `completion_len`).

Ties go to the lowest index (numpy's argmax).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batctl.metrics.benchmark import Question

log = logging.getLogger("batctl.metrics.lm")

DELIMITER = " "
"""lm-evaluation-harness's default target_delimiter between context and choice."""


def token_metrics(total_nll: float, total_tokens: int) -> dict[str, float]:
    """Token-weighted mean NLL (nats per predicted token) and its perplexity."""
    if total_tokens <= 0:
        return {}
    nll = total_nll / total_tokens
    try:
        perplexity = math.exp(nll)
    except OverflowError:
        perplexity = math.inf
    return {"nll": nll, "perplexity": perplexity}


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) the way lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


@dataclass(frozen=True)
class Request:
    """One log-likelihood request: score `continuation` given `prefix` (both token ids)."""

    prefix: list[int]
    continuation: list[int]


def build_requests(
    tokenizer: Any, questions: Sequence[Question], bos: Sequence[int], fallback: Sequence[int]
) -> list[Request]:
    """One request per (question, choice), question-major: BOS + context | " " + choice."""
    requests = []
    for q in questions:
        for choice in q.choices:
            context_ids, continuation_ids = encode_pair(tokenizer, q.context, DELIMITER + choice)
            prefix = list(bos) + context_ids
            requests.append(Request(prefix or list(fallback), continuation_ids))
    return requests


def continuation_loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[Request],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[float]:
    """Summed log-probability of each request's continuation tokens, one float per request.

    Requests are batched (longest first, right-padded, with an attention mask) and scored in one
    forward each; log-softmax in float32. With `max_length`, input + continuation are cut from
    the left to `max_length` + 1 tokens, as the harness does.
    """
    out = [0.0] * len(requests)
    order = sorted(
        range(len(requests)),
        key=lambda i: -(len(requests[i].prefix) + len(requests[i].continuation)),
    )
    truncated = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs, spans = [], []
        for index in chunk:
            request = requests[index]
            n = len(request.continuation)
            if n == 0:
                raise ValueError(f"request {index}: empty continuation")
            if not request.prefix:
                raise ValueError(f"request {index}: empty prefix (nothing to condition on)")
            full = request.prefix + request.continuation
            if max_length is not None and len(full) > max_length + 1:
                truncated += 1
                full = full[-(max_length + 1) :]
                if n >= len(full):
                    raise ValueError(
                        f"request {index}: continuation longer than max_length {max_length}"
                    )
            inputs.append(full[:-1])
            spans.append((len(full) - 1 - n, full[-n:]))
        width = max(len(ids) for ids in inputs)
        input_ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        with torch.no_grad():
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device)
            ).logits
        for row, (index, (first, targets)) in enumerate(zip(chunk, spans, strict=True)):
            logprobs = torch.log_softmax(logits[row, first : first + len(targets)].float(), dim=-1)
            picked = logprobs.gather(
                -1, torch.tensor(targets, device=logprobs.device).unsqueeze(-1)
            )
            out[index] = float(picked.sum())
    if truncated:
        log.warning(
            "%d benchmark request(s) cut from the left to --max-length %s", truncated, max_length
        )
    return out


@dataclass(frozen=True)
class MultipleChoiceResult:
    """acc and acc_norm over a benchmark, with the per-question details."""

    acc: float
    acc_norm: float
    questions: list[dict[str, Any]]
    """Per question: line, label, loglikelihoods (one per choice), pred, pred_norm."""


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_multiple_choice(
    questions: Sequence[Question], loglikelihoods: Sequence[float]
) -> MultipleChoiceResult:
    """acc / acc_norm from the question-major list of per-choice log-likelihoods."""
    expected = sum(len(q.choices) for q in questions)
    if len(loglikelihoods) != expected:
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {expected} choices")
    details, position, hits, hits_norm = [], 0, 0, 0
    for q in questions:
        lls = list(loglikelihoods[position : position + len(q.choices)])
        position += len(q.choices)
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, q.choices, strict=True)])
        hits += pred == q.label
        hits_norm += pred_norm == q.label
        details.append(
            {
                "line": q.line,
                "label": q.label,
                "loglikelihoods": lls,
                "pred": pred,
                "pred_norm": pred_norm,
            }
        )
    n = max(1, len(questions))
    return MultipleChoiceResult(acc=hits / n, acc_norm=hits_norm / n, questions=details)


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    bos: Sequence[int],
    device: torch.device,
    batch_size: int = 8,
    max_length: int | None = None,
) -> MultipleChoiceResult:
    """Score `questions` with `model` (see the module docstring for the exact recipe)."""
    fallback = [
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ]
    requests = build_requests(tokenizer, questions, bos, fallback)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lls = continuation_loglikelihoods(
        model, requests, pad_id=pad, device=device, batch_size=batch_size, max_length=max_length
    )
    return score_multiple_choice(questions, lls)
