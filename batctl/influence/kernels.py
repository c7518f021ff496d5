"""Per-sample gradient and score kernels of hooked Linear / Conv2d layers, from (a, δ).

For a Linear weight W (out × in), one call with input a (N, ..., in) and output gradient
δ (N, ..., out): the gradient of sample i is Σ_positions δ ⊗ a over the rows of sample i, and its
dot product with a direction R (out × in) is Σ_positions δᵀ R a = Σ (F.linear(a, R) ⊙ δ). For a
Conv2d weight (out, in, kh, kw) the same holds with a unfolded into patches (gradients), or with
a convolved by R (scores: ⟨δ, conv2d(a, R)⟩, no unfold needed). A bias gets Σ_positions δ.

The score kernels never form a per-sample gradient: their cost is one extra forward of the
(small, rank-r) LoRA module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batctl.influence.capture import rows_per_sample
from batctl.influence.layers import HookedModule


def _conv_args(module: torch.nn.Conv2d) -> dict:
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}


def weight_and_bias_grads(
    entry: HookedModule, a: torch.Tensor, delta: torch.Tensor, samples: int, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample gradients of the entry's weight and bias: ([B, D_w], [B, D_b]) in ``dtype``.

    Either is None when that parameter is not a layer (frozen or absent).
    """
    rows = a.shape[0]
    k = rows_per_sample(rows, samples, entry)
    a = a.to(dtype)
    delta = delta.to(dtype)
    if entry.kind == "linear":
        a2 = a.reshape(samples, -1, a.shape[-1])  # k*positions rows per sample, sample-major
        d2 = delta.reshape(samples, -1, delta.shape[-1])
        gw = torch.bmm(d2.transpose(1, 2), a2).reshape(samples, -1) if entry.weight else None
        gb = d2.sum(1) if entry.bias else None
        return gw, gb
    module = entry.module
    assert isinstance(module, torch.nn.Conv2d)
    if entry.weight is not None:
        patches = F.unfold(a, module.kernel_size, **_conv_args(module))  # [N, in*kh*kw, P]
        d3 = delta.reshape(rows, delta.shape[1], -1)  # [N, out, P]
        gw = torch.bmm(d3, patches.transpose(1, 2))  # [N, out, in*kh*kw]
        gw = gw.reshape(samples, k, -1).sum(1)
    else:
        gw = None
    gb = delta.sum((2, 3)).reshape(samples, k, -1).sum(1) if entry.bias else None
    return gw, gb


def weight_and_bias_scores(
    entry: HookedModule,
    a: torch.Tensor,
    delta: torch.Tensor,
    samples: int,
    r_weight: torch.Tensor | None,
    r_bias: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample r_w · ∇_w L_i and r_b · ∇_b L_i, each [B] float64, without forming ∇L_i.

    ``r_weight`` / ``r_bias`` are parameter-shaped, in the activations' dtype and device.
    Products are taken in the activations' dtype; sums over positions run in float64.
    """
    rows = a.shape[0]
    k = rows_per_sample(rows, samples, entry)
    sw = sb = None
    if entry.kind == "linear":
        if r_weight is not None:
            prod = F.linear(a.to(r_weight.dtype), r_weight) * delta
            sw = prod.reshape(samples, -1).sum(1, dtype=torch.float64)
        if r_bias is not None:
            summed = delta.reshape(samples, -1, delta.shape[-1]).sum(1, dtype=torch.float64)
            sb = summed @ r_bias.double()
        return sw, sb
    module = entry.module
    assert isinstance(module, torch.nn.Conv2d)
    if r_weight is not None:
        prod = F.conv2d(a.to(r_weight.dtype), r_weight, None, **_conv_args(module)) * delta
        sw = prod.reshape(samples, -1).sum(1, dtype=torch.float64)
    if r_bias is not None:
        summed = delta.sum((2, 3), dtype=torch.float64).reshape(samples, k, -1).sum(1)
        sb = summed @ r_bias.double()
    return sw, sb
