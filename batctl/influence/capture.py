"""Module hooks that hand each hooked layer's input a and output gradient δ to a callback.

One batched forward + one backward serves every hooked layer at once:

- a forward hook on each hooked ``nn.Linear`` / ``nn.Conv2d`` keeps its input a (the tensor
  autograd saves anyway to form the weight gradient, so this costs no memory) and passes the
  output through ``_Tap``, an identity autograd Function;
- in the backward, ``_Tap`` receives δ = ∂(Σ_i L_i)/∂output, calls the callback with (a, δ) while
  both are alive, and passes δ on unchanged, so nothing per layer outlives its own backward step.

The backward is driven by ``torch.autograd.grad(Σ_i L_i, capture.anchor)``: every ``_Tap`` takes
the scalar ``anchor`` as an input, so autograd walks the whole network down to the first tap,
yet computes no weight gradients (the LoRA parameters are not asked for).

A module may run several times in one forward (DoRA computes its weight norm by calling
``lora_B(lora_A(eye))`` on an identity matrix, detached); each call is tapped separately and a
call whose output gets no gradient simply never reaches the callback.

Rows: the callback sees a and δ with the module's own leading dimension N. The sample a row
belongs to is ``row // (N / B)`` (B = number of samples): a task may run a module on its B
samples, or on k consecutive rows per sample (k noise draws per image, say), never interleaved;
``grads.per_sample_grads`` checks this against autograd on its first batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from batctl.influence.layers import HookedModule, InfluenceError, LayerSet


class _Call:
    """One forward call of a hooked module: its input, waiting for the output's gradient."""

    __slots__ = ("capture", "entry", "a")

    def __init__(self, capture: Capture, entry: HookedModule, a: torch.Tensor) -> None:
        self.capture = capture
        self.entry = entry
        self.a: torch.Tensor | None = a


class _Tap(torch.autograd.Function):
    """Identity on the module output; its backward gives (a, δ) to the capture's callback."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, anchor: torch.Tensor, call: _Call) -> torch.Tensor:
        ctx.call = call
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        call: _Call = ctx.call
        if call.capture.active and call.a is not None:
            call.capture.callback(call.entry, call.a, grad)
        return grad, None, None


class Capture:
    """Hooks on every hooked module of a ``LayerSet`` for the duration of a ``with`` block.

    ``callback(entry, a, delta)`` is called in the backward for every tapped call, while
    ``active`` is True (set it False for a second, unrelated backward through the same graph).
    ``recording`` gates the forward hooks: only forwards run while it is True are tapped.
    """

    def __init__(
        self,
        layerset: LayerSet,
        callback: Callable[[HookedModule, torch.Tensor, torch.Tensor], None],
    ) -> None:
        self.layerset = layerset
        self.callback = callback
        self.active = True
        self.recording = False
        # On the model's device, so the backward never has to cross devices to reach it.
        first = next((e.module.weight for e in layerset.modules if e.weight is not None), None)
        device = first.device if first is not None else None
        self.anchor = torch.zeros((), requires_grad=True, device=device)
        self.calls: dict[int, int] = {}
        """id(entry) -> how many of its forward calls were tapped (a shared module: several)."""
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        for entry in self.layerset.modules:
            self._handles.append(entry.module.register_forward_hook(self._hook(entry)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, entry: HookedModule) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            if not self.recording or not torch.is_grad_enabled() or not output.requires_grad:
                return None
            self.calls[id(entry)] = self.calls.get(id(entry), 0) + 1
            return _Tap.apply(output, self.anchor, _Call(self, entry, args[0].detach()))

        return hook

    def backward(self, total: torch.Tensor, retain_graph: bool = False) -> None:
        """Run the backward of the scalar ``total`` through every tap (no weight gradients)."""
        if total.requires_grad:
            torch.autograd.grad(total, [self.anchor], retain_graph=retain_graph, allow_unused=True)


def rows_per_sample(rows: int, samples: int, entry: HookedModule) -> int:
    """k such that the module's ``rows`` leading rows are k consecutive rows per sample."""
    if samples > 0 and rows % samples == 0:
        return rows // samples
    raise InfluenceError(
        f"{type(entry.module).__name__} of a hooked layer saw {rows} rows for {samples} samples: "
        "a task must keep the sample index in the leading dimension (k rows per sample at most)"
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside (LoRA dropout off: deterministic gradients), restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """Force the math SDPA backend: fused CPU/GPU kernels have no forward-AD or double-backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
