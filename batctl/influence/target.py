"""The preconditioned target r_l = H_l⁻¹ v_l of every layer, and ``target.safetensors``.

``prepare_target`` is what ``score`` calls once before streaming the pool:

    target = prepare_target(task, adaptation_samples, target_samples or None,
                            preconditioner="auto", damping=0.1, batch_size=8)
    save_target(out / "target.safetensors", target, {"engine": "hooks", ...})

- v_l: mean gradient of the target loss over the target set (D_A itself by default);
- G_l: per-sample gradients of the adaptation samples (the curvature's data), n × D_l;
- λ_l = c · mean_i ||g_i,l||² / D_l and r_l by the chosen preconditioner (``precondition.py``);
- the degenerate-target check: ||v|| / mean_i ||g_i|| over the target set (norms over all
  layers); below ``DEGENERATE_RATIO`` a warning on ``batctl.influence`` says the scores will be
  noise (a surrogate trained to convergence on D_A has v ≈ 0).

Samples with a non-finite loss or gradient are left out of v and of the curvature (warned).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from batctl.data import Sample
from batctl.influence.grads import PerSampleGrads, iter_batch_grads, per_sample_grads
from batctl.influence.layers import InfluenceError, LayerSet, discover_layers
from batctl.influence.precondition import DEFAULT_DAMPING, precondition, resolve
from batctl.tasks.base import Role, Task

log = logging.getLogger("batctl.influence")

DEGENERATE_RATIO = 0.01
"""Warn when ||v|| < DEGENERATE_RATIO · mean_i ||g_i||. Independent random gradient directions
give about 1/√n, so a healthy target of up to ~10⁴ samples stays above it; a converged surrogate
(v ≈ 0) falls far below. The ratio is scale-free, so it cannot see a target set of one sample
(ratio 1 whatever the gradient)."""

DEAD_LAYER_RMS = 1e-6
"""A layer whose RMS adaptation gradient is at most this fraction of the largest layer's gets
r = 0. Its gradient is zero (LoRA A while B = 0) or rounding noise (a conv bias right before a
GroupNorm of one channel per group: measured ~1e-19 against ~1e-3): λ_l scales with that noise,
so H⁻¹v would blow the noise up to O(1) scores (r ~ 1e18 was seen on the tiny UNet)."""

FORMAT = "batctl.target/1"
_PREFIX = "influence."


@dataclass
class Target:
    """Everything the engines need per layer, plus what target.safetensors records."""

    layers: list[str]
    """Layer (trainable parameter) names, in ``task.trainable_parameters()`` order."""

    v: dict[str, torch.Tensor]
    """Target gradient per layer, float64, parameter-shaped."""

    r: dict[str, torch.Tensor]
    """Preconditioned target H⁻¹v per layer, float64, parameter-shaped."""

    damping: dict[str, float]
    """λ_l per layer."""

    grad_norms: dict[str, torch.Tensor]
    """||g_i,l|| of each adaptation sample per layer, [n] float64 (NaN: non-finite sample)."""

    keys: list[str]
    """Adaptation sample keys, the rows of ``grad_norms``."""

    preconditioner: str
    """The preconditioner used (``auto`` resolved: woodbury, datainf or identity)."""

    c: float
    """The damping factor c."""

    n_adaptation: int
    """Finite adaptation samples behind the curvature."""

    n_target: int
    """Finite target samples behind v."""

    ratio: float
    """||v|| / mean_i ||g_i|| over the target set (the degenerate-target check)."""

    loss: float
    """Mean loss of the target set at the surrogate (sets the fd engine's step)."""


def build_target(
    adaptation: PerSampleGrads,
    target: PerSampleGrads | None = None,
    preconditioner: str = "auto",
    c: float = DEFAULT_DAMPING,
    warn_below: float = DEGENERATE_RATIO,
) -> Target:
    """Preconditioned target from per-sample gradients of the adaptation (and target) samples.

    ``target`` None means the target set is the adaptation set (DESIGN §5). Non-finite rows
    are left out. Raises ``InfluenceError`` when no adaptation or target sample is finite.
    """
    mean = _mean_gradient(adaptation if target is None else target)
    return _finish(adaptation, mean, preconditioner, c, warn_below)


@dataclass
class _Mean:
    v: dict[str, torch.Tensor]  # per layer [D_l] float64
    ratio: float  # ||v|| / mean_i ||g_i||
    n: int  # finite samples
    loss: float  # their mean loss


def _mean_gradient(grads: PerSampleGrads) -> _Mean:
    ok = grads.finite
    n = int(ok.sum())
    if n == 0:
        raise InfluenceError("no target sample has a finite loss and gradient")
    v = {name: g[ok.to(g.device)].double().mean(0) for name, g in grads.grads.items()}
    sq = sum(g[ok.to(g.device)].double().pow(2).sum(1).cpu() for g in grads.grads.values())
    return _Mean(v, _ratio(v, float(sq.sqrt().mean())), n, float(grads.losses[ok].mean()))


def _ratio(v: dict[str, torch.Tensor], mean_norm: float) -> float:
    v_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v.values()))
    return v_norm / mean_norm if mean_norm > 0 else math.inf if v_norm > 0 else 0.0


def _finish(
    adaptation: PerSampleGrads,
    mean: _Mean,
    preconditioner: str,
    c: float,
    warn_below: float,
) -> Target:
    ok = adaptation.finite
    n = int(ok.sum())
    if n == 0:
        raise InfluenceError("no adaptation sample has a finite loss and gradient")
    method = resolve(preconditioner, n)
    r, lams, norms, rms = {}, {}, {}, {}
    for name, G in adaptation.grads.items():
        G_ok = G[ok.to(G.device)]
        r_l, lam = precondition(G_ok, mean.v[name].to(G.device), method, c)
        r[name] = r_l.reshape(adaptation.shapes[name]).cpu()
        lams[name] = lam
        norms[name] = G.double().norm(dim=1).cpu()
        rms[name] = math.sqrt(lam / c) if c > 0 else float(G_ok.double().pow(2).mean().sqrt())
    top = max(rms.values())
    dead = [name for name, x in rms.items() if x <= DEAD_LAYER_RMS * top]
    for name in dead:
        r[name] = torch.zeros_like(r[name])
    if dead:
        log.info(
            "%d of %d layers have zero or rounding-level gradients (e.g. %s); their r is 0",
            len(dead),
            len(rms),
            dead[0],
        )
    ratio = mean.ratio
    if ratio < warn_below:
        log.warning(
            "degenerate target: ||v|| / mean ||g_i|| = %.2e (< %.0e): the target gradient is tiny "
            "against the per-sample gradients, as for a surrogate trained to convergence on the "
            "target set, so scores would be noise; give a held-out --target set or an earlier "
            "surrogate checkpoint",
            ratio,
            warn_below,
        )
    return Target(
        layers=list(adaptation.grads),
        v={name: t.reshape(adaptation.shapes[name]).cpu() for name, t in mean.v.items()},
        r=r,
        damping=lams,
        grad_norms=norms,
        keys=list(adaptation.keys),
        preconditioner=method,
        c=c,
        n_adaptation=n,
        n_target=mean.n,
        ratio=ratio,
        loss=mean.loss,
    )


def prepare_target(
    task: Task,
    adaptation: Sequence[Sample],
    target: Sequence[Sample] | None = None,
    *,
    preconditioner: str = "auto",
    damping: float = DEFAULT_DAMPING,
    batch_size: int = 8,
    role: Role = "adaptation",
    dtype: torch.dtype = torch.float64,
    layerset: LayerSet | None = None,
    out_device: str | torch.device = "cpu",
    warn_below: float = DEGENERATE_RATIO,
) -> Target:
    """Per-sample gradients of D_A (and the mean gradient of the target set), then r per layer.

    Inputs: the task with the surrogate adapter loaded trainable, the adaptation samples, the
    optional target (validation) samples (None: D_A), the preconditioner and damping c, the
    batch size for the gradient passes, the samples' role for ``task.collate``.
    Returns a ``Target``. The target set is streamed (its gradients are averaged batch by batch);
    the adaptation gradients are held: n × Σ_l D_l × 8 bytes.
    """
    if not adaptation:
        raise InfluenceError("the adaptation set is empty")
    layerset = layerset or discover_layers(task)
    grads = per_sample_grads(
        task, adaptation, batch_size, role, dtype, layerset=layerset, out_device=out_device
    )
    if target is None:
        mean = _mean_gradient(grads)
    else:
        if not target:
            raise InfluenceError("the target set is empty")
        mean = _streamed_mean(task, target, batch_size, role, layerset, dtype, out_device)
    return _finish(grads, mean, preconditioner, damping, warn_below)


def _streamed_mean(
    task: Task,
    samples: Sequence[Sample],
    batch_size: int,
    role: Role,
    layerset: LayerSet,
    dtype: torch.dtype,
    out_device: str | torch.device,
) -> _Mean:
    total = {layer.name: torch.zeros(layer.numel, dtype=torch.float64) for layer in layerset.layers}
    norm_sum, loss_sum, n = 0.0, 0.0, 0
    for _keys, losses, ok, grads in iter_batch_grads(
        task, samples, batch_size, role, layerset, dtype, verify=False, out_device=out_device
    ):
        sq = torch.zeros(int(ok.sum()), dtype=torch.float64)
        for name, g in grads.items():
            g_ok = g[ok.to(g.device)].double().cpu()
            total[name] += g_ok.sum(0)
            sq += g_ok.pow(2).sum(1)
        norm_sum += float(sq.sqrt().sum())
        loss_sum += float(losses[ok].sum())
        n += int(ok.sum())
    if n == 0:
        raise InfluenceError("no target sample has a finite loss and gradient")
    v = {name: t / n for name, t in total.items()}
    return _Mean(v, _ratio(v, norm_sum / n), n, loss_sum / n)


# ------------------------------------------------------------------------------ safetensors


def save_target(path: str | Path, target: Target, metadata: dict[str, str]) -> None:
    """Write ``target.safetensors``: per layer ``v/NAME``, ``r/NAME`` (parameter-shaped float64),
    ``lambda/NAME`` ([1] float64) and ``grad_norm/NAME`` ([n] float64, adaptation samples).

    ``metadata`` (the caller's: preconditioner flag, damping, engine, loss settings...) is stored
    as given; batctl adds its own keys under ``influence.`` (format, layer order, resolved
    preconditioner, c, n_adaptation, n_target, ratio, adaptation keys).
    """
    from safetensors.torch import save_file

    clash = [k for k in metadata if k.startswith(_PREFIX)]
    if clash:
        raise ValueError(f"metadata keys starting with {_PREFIX!r} are reserved: {clash}")
    tensors: dict[str, torch.Tensor] = {}
    for name in target.layers:
        tensors[f"v/{name}"] = target.v[name].double().contiguous()
        tensors[f"r/{name}"] = target.r[name].double().contiguous()
        tensors[f"lambda/{name}"] = torch.tensor([target.damping[name]], dtype=torch.float64)
        tensors[f"grad_norm/{name}"] = target.grad_norms[name].double().contiguous()
    ours = {
        "format": FORMAT,
        "layers": json.dumps(target.layers),
        "preconditioner": target.preconditioner,
        "damping": repr(target.c),
        "n_adaptation": str(target.n_adaptation),
        "n_target": str(target.n_target),
        "ratio": repr(target.ratio),
        "loss": repr(target.loss),
        "keys": json.dumps(target.keys),
    }
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update({_PREFIX + k: v for k, v in ours.items()})
    save_file(tensors, str(path), metadata=meta)


def load_target(path: str | Path) -> tuple[Target, dict[str, str]]:
    """Read ``target.safetensors`` back: (Target, the caller's metadata as it was given)."""
    from safetensors import safe_open

    from batctl.safeload import check_safetensors

    check_safetensors(Path(path))  # a damaged file is one line naming it, not a SafetensorError
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        if meta.get(_PREFIX + "format") != FORMAT:
            raise InfluenceError(f"{path}: not a batctl target file ({FORMAT})")
        layers = json.loads(meta[_PREFIX + "layers"])
        get = fh.get_tensor
        target = Target(
            layers=layers,
            v={n: get(f"v/{n}") for n in layers},
            r={n: get(f"r/{n}") for n in layers},
            damping={n: float(get(f"lambda/{n}")[0]) for n in layers},
            grad_norms={n: get(f"grad_norm/{n}") for n in layers},
            keys=json.loads(meta[_PREFIX + "keys"]),
            preconditioner=meta[_PREFIX + "preconditioner"],
            c=float(meta[_PREFIX + "damping"]),
            n_adaptation=int(meta[_PREFIX + "n_adaptation"]),
            n_target=int(meta[_PREFIX + "n_target"]),
            ratio=float(meta[_PREFIX + "ratio"]),
            loss=float(meta[_PREFIX + "loss"]),
        )
    return target, {k: v for k, v in meta.items() if not k.startswith(_PREFIX)}
