"""The model-family protocol (DESIGN §4): everything a stage may ask of a backbone.

A family (LM, diffusion) implements `Task`. Stages, the training loop and the scoring engines
are family-blind: they see samples, batches, per-sample losses and the adapter's trainable
parameters, nothing else. If a stage needs an `if family == ...`, a method is missing here.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from batctl.data import Sample

if TYPE_CHECKING:
    from batctl.metrics.options import EvalOptions

Role = Literal["adaptation", "pool"]
"""Adaptation samples may be rendered differently from pool samples (DreamBooth's instance prompt)."""


@dataclass(frozen=True)
class TaskSettings:
    """How to load the backbone and turn samples into model inputs."""

    model: str
    """Local directory or hub id."""

    dtype: str = "fp32"
    """auto, fp32, bf16 or fp16: the frozen backbone's precision (adapters stay fp32); auto is
    bf16 on a GPU that supports it, else fp32 (batctl.devices)."""

    trust_remote_code: bool = False
    """Passed to from_pretrained; only ever True when the user asked for it."""

    max_length: int = 512
    """LM: tokens per sample after truncation."""

    instance_prompt: str | None = None
    """Diffusion: prompt for adaptation images."""

    resolution: int | None = None
    """Diffusion: image side in pixels; None: the model's native size."""

    flip: bool = False
    """Diffusion: mirror half the images, chosen by key (deterministic augmentation)."""

    loss_draws: int = 4
    """Diffusion: (timestep, noise) draws averaged per sample."""

    device: str | None = None
    """cpu, cuda, cuda:N or mps; None: this rank's own GPU when there is one (batctl.devices)."""


@dataclass(frozen=True)
class AdapterSettings:
    """Which adapter to add to the backbone."""

    kind: str = "lora"
    """lora, dora or locon."""

    rank: int = 8
    """LoRA rank r."""

    alpha: float | None = None
    """LoRA alpha; None means alpha = rank (scale 1)."""

    dropout: float = 0.0
    """Dropout on the LoRA input."""

    targets: tuple[str, ...] = ()
    """Module names to adapt; empty means the family's default."""

    text_encoder: bool = False
    """Diffusion: also adapt the text encoder (same kind, rank and alpha)."""

    def lora_config(self, targets: Any, **extra: Any) -> Any:
        """peft's LoraConfig for these settings on ``targets`` (module names, or "all-linear");
        alpha defaults to the rank; ``extra`` goes to LoraConfig as is (e.g. task_type)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            target_modules=targets,
            use_dora=self.kind == "dora",
            **extra,
        )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str | None) -> torch.device:
    """The requested device, else this rank's own GPU when there is one, else cpu."""
    from batctl.devices import this_machine_device

    return this_machine_device(requested)


def torch_dtype(settings: TaskSettings, device: torch.device) -> torch.dtype:
    """The backbone's torch dtype for these settings on `device` (resolving "auto")."""
    from batctl.devices import this_machine_dtype

    return DTYPES[this_machine_dtype(settings.dtype, device)]


class Task(abc.ABC):
    """One model family: a frozen backbone with one trainable adapter on top."""

    family: ClassVar[str]
    """"lm" or "diffusion"."""

    model: torch.nn.Module
    """The backbone with its adapter (a peft model once an adapter is added or loaded)."""

    device: torch.device
    """Where batches and the model live."""

    metric_notes: list[str] = []  # noqa: RUF012 - replaced per instance, never mutated in place
    """What `family_metrics` left out and why, for the eval report (set by family_metrics)."""

    @abc.abstractmethod
    def add_adapter(self, adapter: AdapterSettings, seed: int) -> None:
        """Add a fresh adapter, initialised from `seed`; only its parameters are trainable."""

    @abc.abstractmethod
    def load_adapter(self, path: Path, trainable: bool = False) -> None:
        """Load a saved adapter directory (as written by `save_adapter`)."""

    @abc.abstractmethod
    def save_adapter(self, path: Path) -> None:
        """Write the adapter in peft format (and the family's native format, if it has one)."""

    @abc.abstractmethod
    def collate(self, samples: Sequence[Sample], role: Role) -> dict[str, Any]:
        """Turn samples into one batch of model inputs on `self.device`."""

    @abc.abstractmethod
    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of each sample in `batch`, shape [B], float32, differentiable w.r.t. the adapter."""

    def forward_modules(self) -> dict[str, torch.nn.Module]:
        """The modules `per_sample_loss` calls, by attribute path on the task: what data-parallel
        training wraps (DDP, autocast) so their adapters' gradients are averaged over ranks."""
        return {"model": self.model}

    def size_hint(self, sample: Sample) -> int:
        """A sample's compute cost in the family's own unit (LM: tokens), so `score` can batch
        samples of a similar size together and pad less; 0 when every sample costs the same."""
        return 0

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """One vector per sample of `batch` from the model as loaded now, shape [B, H], float32:
        what the `embed` selection method compares by cosine. Families without one say so."""
        from batctl.errors import UsageError

        raise UsageError(
            f"--method embed: the {self.family} family has no backbone embedding; use another --method"
        )

    def remove_adapter(self) -> None:
        """Take the adapter off without merging it, leaving the bare frozen backbone."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model = self.model.unload()
        self.model.eval()

    def loss_settings(self) -> dict[str, str]:
        """What defines the per-sample loss, for target.safetensors' metadata."""
        return {"family": self.family}

    def counters(self) -> dict[str, int]:
        """Family-specific counts for the run summary (e.g. LM samples cut to --max-length)."""
        return {}

    def check_rank(self, rank: int, *parts: torch.nn.Module) -> None:
        """UsageError when `rank` exceeds the width min(in, out) of every Linear/Conv2d layer of
        `parts`: such a rank adds no capacity and, when absurd, only an allocator failure."""
        widths = [
            min(m.in_features, m.out_features)
            if isinstance(m, torch.nn.Linear)
            else min(m.in_channels, m.out_channels)
            for part in parts
            for m in part.modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        ]
        if widths and rank > max(widths):
            from batctl.errors import UsageError

            raise UsageError(
                f"--rank {rank} is wider than every adaptable layer of {self.settings.model} "
                f"(the widest has min(in, out) = {max(widths)}); pass --rank {max(widths)} or less"
            )

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The adapter's parameters by name, in a stable order."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A detached fp32 copy of the adapter's parameters (for weight differences)."""
        return {n: p.detach().float().cpu().clone() for n, p in self.trainable_parameters().items()}

    def family_metrics(
        self, heldout: Sequence[Sample], options: EvalOptions, out_dir: Path, label: str
    ) -> dict[str, float]:
        """Metrics only this family can compute, for the adapter loaded now (or the bare backbone).

        `eval` calls it once per row, with the model in eval mode, after it has measured the
        family-blind held-out loss itself. `heldout`: the --data samples (role "adaptation");
        `options`: the eval flags, already read and checked (batch size, --benchmark questions,
        --prompts, --dino, --clip). A family may write files for the row (image grids,
        per-question logs) under `out_dir`, with `label` (the row's name: "backbone" or the
        adapter's) in their names. Returns metric name -> value; the default has none.
        """
        return {}
