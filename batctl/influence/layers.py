"""Which adapter parameters are "layers", and how each one's per-sample gradient is obtained.

DESIGN §5: every trainable parameter is its own layer l with D_l = numel (a LoRA A matrix and
its B matrix are two layers). A layer is either

- **hooked**: the weight (or bias) of a peft LoRA sub-module ``lora_A[name]`` / ``lora_B[name]``
  that is a plain ``nn.Linear`` or ``nn.Conv2d``. Its gradient is a contraction of the module's
  input a and output gradient δ (per sample: Σ_positions δ ⊗ a), so it can be obtained for a
  whole batch from one backward, and the engines can contract it with r_l without ever forming
  the gradient;
- **generic**: any other trainable parameter (DoRA's ``lora_magnitude_vector``, embedding LoRA,
  ``modules_to_save`` copies, Conv1d/Conv3d LoRA, grouped or padded-by-string convolutions...).
  These go through exact batched autograd paths (``grads.py``, ``engines.py``); none is dropped:
  hooked + generic == ``task.trainable_parameters()``, always.

Hooks assume the parameter reaches the loss only through its module's forward. That holds for
peft's LoRA (DoRA's weight norm uses A and B too, but detached, as the DoRA paper prescribes);
``grads.per_sample_grads`` verifies it on the first batch against autograd and stops otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from batctl.errors import BatctlError
from batctl.tasks.base import Task

Kind = Literal["linear", "conv2d", "generic"]


class InfluenceError(BatctlError):
    """The adapter or the task cannot be scored as asked (printed as one line by the CLI)."""


@dataclass(frozen=True)
class Layer:
    """One trainable parameter seen as an influence layer."""

    name: str
    """The parameter's name in ``task.trainable_parameters()`` (and in target.safetensors)."""

    index: int
    """Position in ``LayerSet.layers`` (the column of per-layer scores)."""

    param: nn.Parameter = field(repr=False, compare=False)
    """The live parameter."""

    kind: Kind
    """How its per-sample gradient is computed: by hooks (linear, conv2d) or generically."""

    module: nn.Module | None = field(default=None, repr=False, compare=False)
    """The hooked ``nn.Linear`` / ``nn.Conv2d`` that owns it; None for generic layers."""

    role: Literal["weight", "bias", "other"] = "other"
    """Which of the module's parameters it is."""

    @property
    def numel(self) -> int:
        """D_l, the number of scalars in the layer."""
        return self.param.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


@dataclass
class HookedModule:
    """A module whose weight (and bias) per-sample gradients come from hooks."""

    module: nn.Module
    kind: Kind
    weight: Layer | None
    bias: Layer | None


@dataclass
class LayerSet:
    """All layers of a task's adapter, in ``trainable_parameters()`` order."""

    layers: list[Layer]
    modules: list[HookedModule]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def hooked(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind != "generic"]

    @property
    def generic(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind == "generic"]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def _plain_linear(m: nn.Module) -> bool:
    # A subclass that overrides forward may use its weight differently: leave it to the generic path.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _plain_conv2d(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and type(m).forward is nn.Conv2d.forward
        and type(m)._conv_forward is nn.Conv2d._conv_forward
        and m.groups == 1  # unfold-based per-sample grads assume a dense kernel
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)  # 'same'/'valid' would need unfold's explicit padding
    )


def _lora_submodules(model: nn.Module) -> list[nn.Module]:
    """The ``lora_A[name]`` / ``lora_B[name]`` sub-modules of every peft LoRA layer."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        for attr in ("lora_A", "lora_B"):
            holder = getattr(module, attr, None)
            if isinstance(holder, nn.ModuleDict):
                for sub in holder.values():
                    if id(sub) not in seen:
                        seen.add(id(sub))
                        found.append(sub)
    return found


def discover_layers(task: Task) -> LayerSet:
    """Split the task's trainable parameters into hooked and generic layers.

    Input: a task with its adapter loaded trainable. Output: a ``LayerSet`` whose ``layers``
    are exactly ``task.trainable_parameters()`` (same names, same order). Raises
    ``InfluenceError`` when there is nothing trainable (an adapter loaded with
    ``trainable=False`` has no trainable parameters).
    """
    params = task.trainable_parameters()
    if not params:
        raise InfluenceError(
            "the adapter has no trainable parameters: load the surrogate with trainable=True"
        )
    by_id = {id(p): name for name, p in params.items()}
    owner: dict[str, tuple[nn.Module, Kind, Literal["weight", "bias"]]] = {}
    for sub in _lora_submodules(task.model):
        if _plain_linear(sub):
            kind: Kind = "linear"
        elif _plain_conv2d(sub):
            kind = "conv2d"
        else:
            continue
        for role in ("weight", "bias"):
            p = getattr(sub, role, None)
            if isinstance(p, nn.Parameter) and p.requires_grad and id(p) in by_id:
                owner[by_id[id(p)]] = (sub, kind, role)

    layers: list[Layer] = []
    for index, (name, p) in enumerate(params.items()):
        if name in owner:
            module, kind, role = owner[name]
            layers.append(Layer(name, index, p, kind, module, role))
        else:
            layers.append(Layer(name, index, p, "generic"))

    modules: dict[int, HookedModule] = {}
    for layer in layers:
        if layer.module is None:
            continue
        entry = modules.setdefault(
            id(layer.module), HookedModule(layer.module, layer.kind, None, None)
        )
        if layer.role == "weight":
            entry.weight = layer
        else:
            entry.bias = layer
    return LayerSet(layers, list(modules.values()))


def dora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's DoRA sub-layers (``lora_magnitude_vector[name]``) in the model, if any."""
    found = []
    for module in model.modules():
        holder = getattr(module, "lora_magnitude_vector", None)
        if isinstance(holder, nn.ModuleDict):
            found.extend(holder.values())
    return found


@contextlib.contextmanager
def frozen_dora_norms(model: nn.Module) -> Iterator[bool]:
    """Inside, DoRA's column norm ||W + sBA|| stays at the value the first eval forward computes.

    DoRA's gradient treats that norm as a constant (DoRA §4.3; peft detaches it), so a finite
    difference must hold it fixed too, or it measures a different derivative. peft's own
    inference cache (``ENABLE_DORA_CACHING``, eval mode only) does exactly that; it is switched
    on inside and restored after. Yields whether every DoRA layer already holds a cached norm
    (False: the next eval forward must run at the unperturbed adapter to fill it).
    """
    layers = dora_layers(model)
    if not layers:
        yield True
        return
    from peft.tuners.lora import dora

    before = dora.ENABLE_DORA_CACHING
    dora.ENABLE_DORA_CACHING = True
    try:
        yield all(
            any(str(k).startswith("weight-norm") for k in getattr(m, "_dora_cache", {}))
            for m in layers
        )
    finally:
        dora.ENABLE_DORA_CACHING = before


def clear_dora_norms(model: nn.Module) -> None:
    """Forget cached DoRA norms (the adapter is about to be taken as the new reference)."""
    for m in dora_layers(model):
        clear = getattr(m, "_cache_clear", None)
        if clear is not None:
            clear()
