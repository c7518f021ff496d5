"""Per-sample gradients of the adapter at the surrogate, for the adaptation and target samples.

One batched forward and one backward per batch:

- hooked layers (LoRA Linear/Conv2d A and B): per-sample Σ δ ⊗ a from the captured input a and
  output gradient δ (``capture.py``, ``kernels.py``);
- generic layers (everything else, e.g. DoRA magnitudes): ``torch.autograd.grad`` of the loss
  vector with one-hot cotangents, vectorised over the batch (``is_grads_batched``, i.e. vmap over
  the backward of the same graph). If an op has no batching rule the same values come from one
  ``autograd.grad`` per sample on the same graph.

The model runs in eval mode (LoRA dropout off) so gradients are deterministic.

Non-finite samples: a sample whose loss, or whose gradient in any layer, is not finite is
dropped and its batch recomputed without it (a NaN in one row can reach other rows through the
batch-summed gradient of a generic parameter); its rows are NaN in the result and ``finite`` is
False for it. Targets and curvature use only finite samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batctl.data import Sample
from batctl.influence.capture import Capture, eval_mode, rows_per_sample
from batctl.influence.kernels import weight_and_bias_grads
from batctl.influence.layers import (
    HookedModule,
    InfluenceError,
    Layer,
    LayerSet,
    discover_layers,
)
from batctl.tasks.base import Role, Task

log = logging.getLogger("batctl.influence")


@dataclass
class PerSampleGrads:
    """Per-sample gradients of n samples, one matrix per layer."""

    keys: list[str]
    """Sample keys, in input order."""

    losses: torch.Tensor
    """[n] float64, the per-sample loss at the surrogate (NaN where not finite)."""

    finite: torch.Tensor
    """[n] bool: the sample's loss and every gradient entry are finite."""

    grads: dict[str, torch.Tensor]
    """layer name -> [n, D_l] in the requested dtype; rows of non-finite samples are NaN."""

    shapes: dict[str, tuple[int, ...]]
    """layer name -> the parameter's shape (a row of ``grads[name]`` reshaped to it)."""

    @property
    def layers(self) -> list[str]:
        return list(self.grads)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class BatchGrads:
    """``PerSampleGrads`` of one collated batch (what ``batch_grads`` returns)."""

    losses: torch.Tensor
    grads: dict[str, torch.Tensor] | None
    """None when some loss is not finite: then no backward was run."""


def batch_grads(
    task: Task,
    batch: dict[str, Any],
    layerset: LayerSet,
    dtype: torch.dtype = torch.float64,
    verify: bool = False,
) -> BatchGrads:
    """Per-sample gradients of every layer for one collated batch.

    Inputs: the task, a batch from ``task.collate``, the task's layers, the output dtype.
    Returns losses [B] (float64, on the task's device) and grads {layer: [B, D_l]} (``dtype``,
    task's device). With ``verify``, also checks the hooks against autograd (two extra
    backwards, see ``_verify``) and raises ``InfluenceError`` when they cannot be trusted.
    When a loss is not finite, returns the losses and ``grads=None`` without a backward
    (``iter_batch_grads`` then recomputes the batch without those samples).
    """
    hooked: dict[str, torch.Tensor] = {}

    def on_grad(entry: HookedModule, a: torch.Tensor, delta: torch.Tensor) -> None:
        gw, gb = weight_and_bias_grads(entry, a, delta, samples, dtype)
        for layer, g in ((entry.weight, gw), (entry.bias, gb)):
            if layer is not None and g is not None:
                # A module called twice (shared weights) adds its contributions.
                hooked[layer.name] = hooked[layer.name] + g if layer.name in hooked else g

    generic = layerset.generic
    with eval_mode(task.model), torch.enable_grad(), Capture(layerset, on_grad) as cap:
        cap.recording = True
        losses = task.per_sample_loss(batch)
        cap.recording = False
        samples = losses.shape[0]
        if not bool(torch.isfinite(losses).all()):
            return BatchGrads(losses.detach().double(), None)
        need_graph = bool(generic) or verify
        cap.backward(losses.sum(), retain_graph=need_graph)
        cap.active = False
        grads: dict[str, torch.Tensor] = {}
        of_generic = generic_grads(losses, generic) if generic else {}
        for layer in layerset.layers:
            if layer.kind == "generic":
                grads[layer.name] = of_generic[layer.name].to(dtype)
            elif layer.name in hooked:
                grads[layer.name] = hooked[layer.name]
            else:  # the module's output never reached the loss: a zero gradient, honestly
                grads[layer.name] = losses.new_zeros((samples, layer.numel), dtype=dtype)
        if verify:
            _verify(cap, losses, layerset, grads)
    return BatchGrads(losses.detach().double(), grads)


def generic_grads(losses: torch.Tensor, layers: list[Layer]) -> dict[str, torch.Tensor]:
    """Per-sample gradients of generic layers from the graph of ``losses``: {layer: [B, D_l]}.

    The graph is kept (the caller may verify afterwards; it goes when ``losses`` does).
    """
    params = [layer.param for layer in layers]
    samples = losses.shape[0]
    eye = torch.eye(samples, dtype=losses.dtype, device=losses.device)
    try:
        got = torch.autograd.grad(
            losses,
            params,
            grad_outputs=eye,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        rows = [None if g is None else g.reshape(samples, -1) for g in got]
    except RuntimeError as exc:  # an op without a batching rule: same numbers, one row at a time
        log.debug("batched generic gradients unavailable (%s); per-sample backward", exc)
        per_row = [
            torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            for i in range(samples)
        ]
        rows = [
            None if per_row[0][j] is None else torch.stack([r[j].reshape(-1) for r in per_row])
            for j in range(len(params))
        ]
    out = {}
    for layer, g in zip(layers, rows, strict=True):
        out[layer.name] = g if g is not None else losses.new_zeros((samples, layer.numel))
    return out


def _verify(
    cap: Capture, losses: torch.Tensor, layerset: LayerSet, grads: dict[str, torch.Tensor]
) -> None:
    """Can the hooks be trusted for this task? Two checks, both immune to rounding noise:

    - rows: the backward of sample 0's loss alone must leave the rows of every other sample
      exactly zero at every hooked module, or the task orders module rows differently from its
      losses (k draws interleaved, losses permuted) or mixes samples (batch statistics);
    - sums: Σ_i g_i must equal autograd's gradient of Σ_i L_i (the same backward, so equal up to
      summation order, measured against Σ_i ||g_i||), or a hooked parameter also reaches the
      loss outside its module's forward.
    """
    hooked = layerset.hooked
    samples = losses.shape[0]
    if not hooked:
        return
    if samples > 1:
        leaks: list[str] = []

        def rows(entry: HookedModule, a: torch.Tensor, delta: torch.Tensor) -> None:
            rows_per_sample(delta.shape[0], samples, entry)
            if bool(delta.reshape(samples, -1)[1:].ne(0).any()):
                leaks.append((entry.weight or entry.bias).name)

        cap.callback, cap.active = rows, True
        cap.backward(losses[0], retain_graph=True)
        cap.active = False
        if leaks:
            raise InfluenceError(
                f"layer {leaks[0]}: the loss of one sample reaches other samples' rows: the task "
                "mixes the samples of a batch, or orders a module's rows differently from its "
                "losses; per-sample gradients by hooks would be wrong"
            )
    ref = torch.autograd.grad(losses.sum(), [layer.param for layer in hooked], allow_unused=True)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(losses.dtype, 1e-2)
    for layer, expected in zip(hooked, ref, strict=True):
        g = grads[layer.name]
        mine = g.sum(0)
        expected = torch.zeros_like(mine) if expected is None else expected.reshape(-1).to(g.dtype)
        scale = float(g.norm(dim=1).sum())
        error = float((mine - expected).norm())
        if error > tol * scale:
            raise InfluenceError(
                f"layer {layer.name}: hooked per-sample gradients do not add up to autograd's "
                f"(relative error {error / scale:.1e}): the parameter reaches the loss outside "
                "its module's forward"
            )


def iter_batch_grads(
    task: Task,
    samples: Sequence[Sample],
    batch_size: int,
    role: Role,
    layerset: LayerSet,
    dtype: torch.dtype = torch.float64,
    verify: bool = True,
    out_device: str | torch.device = "cpu",
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Stream (keys, losses [b], finite [b], grads {layer: [b, D_l]}) batch by batch.

    Non-finite samples are taken out and their batch recomputed (see the module docstring);
    ``verify`` checks the hooks against autograd on the first batch.
    """
    first = True
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        keys = [s.key for s in chunk]
        n = len(chunk)
        losses = torch.full((n,), float("nan"), dtype=torch.float64)
        finite = torch.zeros(n, dtype=torch.bool)
        grads = {
            layer.name: torch.full((n, layer.numel), float("nan"), dtype=dtype, device=out_device)
            for layer in layerset.layers
        }
        keep = list(range(n))
        for _attempt in range(3):
            if not keep:
                break
            batch = task.collate([chunk[i] for i in keep], role)
            result = batch_grads(task, batch, layerset, dtype, verify=verify and first)
            rows_ok = torch.isfinite(result.losses).cpu()
            if result.grads is not None:
                for g in result.grads.values():
                    rows_ok &= torch.isfinite(g).all(1).cpu()
            if result.grads is None or not bool(rows_ok.all()):
                keep = [i for j, i in enumerate(keep) if bool(rows_ok[j])]
                continue
            first = False
            index = torch.tensor(keep, dtype=torch.long)
            losses[index] = result.losses.cpu()
            finite[index] = True
            for name, g in result.grads.items():
                grads[name][index.to(out_device)] = g.to(out_device)
            break
        if not bool(finite.all()):
            dropped = [k for k, ok in zip(keys, finite.tolist(), strict=True) if not ok]
            log.warning(
                "%d sample(s) with a non-finite loss or gradient left out: %s",
                len(dropped),
                ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""),
            )
        yield keys, losses, finite, grads


def per_sample_grads(
    task: Task,
    samples: Sequence[Sample],
    batch_size: int = 8,
    role: Role = "adaptation",
    dtype: torch.dtype = torch.float64,
    *,
    layerset: LayerSet | None = None,
    verify: bool = True,
    out_device: str | torch.device = "cpu",
) -> PerSampleGrads:
    """Per-sample gradients of every adapter layer for ``samples``, as one matrix per layer.

    Inputs: the task (adapter loaded trainable), the samples, how many per forward, their role
    for ``task.collate``, the output dtype (float64 by default: the preconditioners solve in
    float64), the layers (default ``discover_layers(task)``), whether to check the hooks against
    autograd on the first batch, and where the result lives.
    Returns ``PerSampleGrads``: keys, losses [n], finite [n], grads {layer: [n, D_l]}, shapes.
    Memory: n × Σ_l D_l × dtype size (8 bytes for float64) on ``out_device``.
    """
    if not samples:
        raise InfluenceError("no samples to take gradients of")
    layerset = layerset or discover_layers(task)
    n = len(samples)
    keys: list[str] = []
    losses = torch.empty(n, dtype=torch.float64)
    finite = torch.empty(n, dtype=torch.bool)
    # Filled block by block: peak memory is the result plus one batch, not twice the result.
    out = {
        layer.name: torch.empty((n, layer.numel), dtype=dtype, device=out_device)
        for layer in layerset.layers
    }
    start = 0
    for k, loss, ok, grads in iter_batch_grads(
        task, samples, batch_size, role, layerset, dtype, verify, out_device
    ):
        stop = start + len(k)
        keys += k
        losses[start:stop] = loss
        finite[start:stop] = ok
        for name, g in grads.items():
            out[name][start:stop] = g
        start = stop
    return PerSampleGrads(
        keys,
        losses,
        finite,
        out,
        {layer.name: layer.shape for layer in layerset.layers},
    )
