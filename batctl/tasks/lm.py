"""Causal language models (LLaMA style) with peft LoRA/DoRA adapters (DESIGN §4, LM).

Samples are `{"text"}` (loss on every token after BOS, and EOS) or Alpaca
`{"instruction", "input", "output"}` (the Stanford Alpaca prompt; prompt tokens masked with -100,
loss on the response and EOS). The per-sample loss is the mean token NLL over unmasked tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from batctl.data import Sample
from batctl.errors import BadSampleError, BatctlError, UsageError
from batctl.tasks.base import AdapterSettings, Role, Task, TaskSettings, pick_device, torch_dtype

log = logging.getLogger("batctl.tasks.lm")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100


def alpaca_prompt(record: dict[str, Any]) -> str:
    """The Stanford Alpaca prompt for a record, with or without its `input`."""
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(
            instruction=record["instruction"], input=record["input"]
        )
    return ALPACA_PROMPT.format(instruction=record["instruction"])


def fit_to_length(
    prompt: list[int], response: list[int], limit: int
) -> tuple[list[int], list[int]]:
    """Cut a (prompt, response) pair to at most `limit` tokens, keeping some response.

    The response keeps at least half the budget (or all of itself when shorter); the prompt
    loses tokens from its start, so the part next to the response survives.
    """
    if len(prompt) + len(response) <= limit:
        return prompt, response
    keep_response = min(len(response), max(limit // 2, limit - len(prompt)))
    keep_prompt = limit - keep_response
    return prompt[len(prompt) - keep_prompt :] if keep_prompt else [], response[:keep_response]


def quiet_libraries() -> None:
    """Keep stderr for batctl's own progress: no per-load bars or known-harmless deprecations."""
    import warnings

    from transformers.utils import logging as hf_logging

    from batctl.console import silence_unactionable_warnings

    silence_unactionable_warnings()
    hf_logging.disable_progress_bar()
    # peft 0.21 calls a transformers 5 API that is deprecated but still works.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


class LMTask(Task):
    """A causal LM from a local directory or hub id, frozen, with one peft adapter."""

    family = "lm"

    def __init__(self, settings: TaskSettings) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_libraries()
        self.settings = settings
        self.device = pick_device(settings.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                settings.model, trust_remote_code=settings.trust_remote_code
            )
            base = AutoModelForCausalLM.from_pretrained(
                settings.model,
                dtype=torch_dtype(settings, self.device),
                trust_remote_code=settings.trust_remote_code,
                use_safetensors=True,  # never torch.load a pickle
            )
        except (OSError, ValueError, KeyError) as exc:
            from batctl.tasks import library_error

            raise BatctlError(
                library_error(f"--model {settings.model}: cannot load a causal LM", exc)
            ) from None
        base.requires_grad_(False)
        base.eval()  # dropout off in the backbone; the adapter's own dropout follows train()/eval()
        self.base = base.to(self.device)
        self.model: torch.nn.Module = self.base
        self.truncated: set[tuple[int, str]] = set()  # samples, not encodings: epochs re-encode
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        self.eos = [self.tokenizer.eos_token_id]

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter: AdapterSettings, seed: int) -> None:
        from peft import get_peft_model

        if adapter.kind == "locon":
            raise UsageError(
                "--adapter locon adapts conv layers: it is for diffusion models; use lora or dora"
            )
        if adapter.text_encoder:
            raise UsageError(
                "--train-text-encoder adapts a diffusion model's text encoder; an LM has none"
            )
        targets: Any = list(adapter.targets) or None
        if targets == ["all-linear"]:
            targets = "all-linear"
        self.check_rank(adapter.rank, self.base)
        config = adapter.lora_config(targets, task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        try:
            self.model = get_peft_model(self.base, config)
        except ValueError as exc:
            if "not found in the base model" not in str(exc) and "Target module" not in str(exc):
                raise
            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in self.base.named_modules()
                    if isinstance(m, torch.nn.Linear)
                }
            )
            raise UsageError(
                f"--targets {' '.join(adapter.targets)}: no such module in {self.settings.model}; "
                f"linear modules are: {', '.join(linear)} (or all-linear)"
            ) from None
        self.model.to(self.device)

    def load_adapter(self, path: Path, trainable: bool = False) -> None:
        from peft import PeftModel

        from batctl.safeload import check_adapter_dir
        from batctl.tasks import library_error

        check_adapter_dir(path, "adapter")
        self.remove_adapter()  # a second adapter replaces the first instead of stacking on it
        try:
            self.model = PeftModel.from_pretrained(self.base, str(path), is_trainable=trainable)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BatctlError(
                library_error(f"{path}: cannot load this adapter onto {self.settings.model}", exc)
            ) from None
        self.model.to(self.device)

    def save_adapter(self, path: Path) -> None:
        self.model.save_pretrained(str(path))

    def counters(self) -> dict[str, int]:
        return {"truncated_samples": len(self.truncated)}

    def loss_settings(self) -> dict[str, str]:
        return {
            "family": "lm",
            "loss": "mean token NLL of response + EOS",
            "max_length": str(self.settings.max_length),
        }

    # ------------------------------------------------------------------ batches

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one sample, truncated to max_length."""
        record = sample.record
        tok = self.tokenizer
        # Truncation keeps the prompt's end and the response's start (fit_to_length), so only
        # those ends are tokenized: a huge text costs no more than a long one.
        cap = self.char_cap()
        if "instruction" in record and "output" in record:
            prompt_text, response_text = alpaca_prompt(record), str(record["output"])
            cut = len(prompt_text) > cap or len(response_text) > cap
            prompt = tok.encode(prompt_text[-cap:], add_special_tokens=False)
            response = tok.encode(response_text[:cap], add_special_tokens=False) + self.eos
        elif "text" in record:
            prompt = []
            cut = len(str(record["text"])) > cap
            response = tok.encode(str(record["text"])[:cap], add_special_tokens=False) + self.eos
        else:
            raise BadSampleError(
                f"data part {sample.part}",
                sample.key,
                "an LM sample needs 'text' or Alpaca 'instruction'/'output'",
                "give text or Alpaca records",
            )
        limit = self.settings.max_length - len(self.bos)  # BOS always survives truncation
        if cut or len(prompt) + len(response) > limit:
            if not self.truncated:
                log.warning(
                    "%s: %d tokens cut to --max-length %d (further cuts are counted in the summary)",
                    sample.key,
                    len(self.bos) + len(prompt) + len(response),
                    self.settings.max_length,
                )
            self.truncated.add((sample.part, sample.key))
            prompt, response = fit_to_length(prompt, response, limit)
        ids = self.bos + prompt + response
        # Labels are shifted inside per_sample_loss; the first token is never predicted.
        labels = [IGNORE] * (len(self.bos) + len(prompt)) + response
        return ids, labels

    def char_cap(self) -> int:
        """Characters of a text tokenized at most: far more than --max-length tokens need
        (64 characters a token, at least 4096), so the cut never shortens what is kept."""
        return max(4096, 64 * self.settings.max_length)

    def size_hint(self, sample: Sample) -> int:
        """Tokens after truncation (what the batch is padded to); 0 for a sample the LM cannot
        take, which collate then reports."""
        try:
            return len(self.encode(sample)[0])
        except BadSampleError:
            return 0

    def collate(self, samples: Sequence[Sample], role: Role) -> dict[str, Any]:
        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            attention[row, : len(ids)] = 1
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention.to(self.device),
            "labels": labels.to(self.device),
        }

    def token_nll(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL (nats) and number of predicted tokens per sample, each shape [B]."""
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        # At least float32 for the softmax; a float64 model (exactness tests) stays float64.
        logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        counts = (targets != IGNORE).sum(dim=1)
        return nll.sum(dim=1), counts

    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        total, counts = self.token_nll(batch)
        return total / counts.clamp(min=1)

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """The last hidden layer, averaged over each sample's tokens (padding excluded)."""
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    # ------------------------------------------------------------------ eval

    def family_metrics(
        self, heldout: Sequence[Sample], options: Any, out_dir: Path, label: str
    ) -> dict[str, float]:
        """Token-weighted NLL and perplexity on `heldout`; acc and acc_norm on --benchmark.

        Multiple choice is scored as lm-evaluation-harness does (see `batctl.metrics.lm`); the
        per-question log-likelihoods go to `benchmark-<label>.jsonl` in `out_dir`.
        """
        import json
        import re

        from batctl.metrics.lm import evaluate_multiple_choice, token_metrics
        from batctl.metrics.report import jsonable

        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(heldout), options.batch_size):
                nll, counts = self.token_nll(
                    self.collate(heldout[start : start + options.batch_size], "adaptation")
                )
                total += float(nll.double().sum())
                tokens += int(counts.sum())
        metrics = token_metrics(total, tokens)
        self.metric_notes = (
            ["per-question log-likelihoods: benchmark-<row>.jsonl"]
            if options.benchmark
            else ["multiple choice: no --benchmark given"]
        )
        if options.benchmark:
            result = evaluate_multiple_choice(
                self.model,
                self.tokenizer,
                options.benchmark,
                bos=self.bos,
                device=self.device,
                batch_size=options.batch_size,
                max_length=self.settings.max_length,
            )
            metrics.update(acc=result.acc, acc_norm=result.acc_norm)
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
            with (Path(out_dir) / f"benchmark-{safe}.jsonl").open("w", encoding="utf-8") as fh:
                for row in result.questions:
                    fh.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
        return metrics
