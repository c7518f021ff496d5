"""Score engines: s(x) = Σ_l r_l · ∇_l L(x) for every sample x of a pool batch (DESIGN §5).

Higher s means a gradient step on x lowers the target loss (to first order, through H⁻¹): more
beneficial. The influence of up-weighting x on the target loss, as Koh & Liang and DataInf
define it, is −s(x).

``HooksEngine`` (exact)
    One batched forward and one backward of Σ_i L_i(x). At each hooked layer the captured input
    a and output gradient δ are contracted with r_l directly (Linear: Σ_t δ_tᵀ R a_t; Conv2d:
    ⟨δ, conv2d(a, R)⟩), so no per-sample gradient of a pool sample is ever formed and no weight
    gradient is computed. Generic layers (DoRA magnitudes, ...) add one forward-mode pass: the
    Jacobian-vector product of the loss vector along r restricted to them (exact, batched), or,
    where an op has no forward-AD formula, a double backward through per-sample loss weights.
    Both run with the math attention kernel (fused SDPA kernels support neither).
    Per-layer scores [B, L]: free for hooked layers; each generic layer then costs its own
    forward-mode pass.
    With ``normalize``, each sample's scores are divided by its gradient norm ||∇L(x)|| (all
    adapter layers): the cosine-style score LESS uses. The norm needs the per-sample gradient
    of each layer, formed in the hook (B × D_l, small for adapters) and dropped once the
    module's last tapped call has reported; generic layers take theirs from the same graph
    (``grads.generic_grads``), where a NaN sample would reach every row, so such a batch raises
    ``NonFiniteInBatch`` and is scored one sample at a time by the caller.
``FDEngine`` (approximate, cheap)
    The central difference (L(θ + εr) − L(θ − εr)) / 2ε: two forward passes under no_grad with
    the adapter moved in place (and restored bit-exactly from a copy). No per-layer scores.
    DoRA's column norms ||W + sBA|| are held at θ (peft's own eval-mode cache), because DoRA's
    gradient treats them as constants; without that fd measured another derivative (~30% off).
    The step ε is calibrated once (``FD_LADDER``).

Measured on this CPU (2 threads), tiny LLaMA hidden 256 x 4 layers, LoRA r=8 on q,v, batch 32 x
128 tokens: forward 101 samples/s, training step without optimizer 47, hooks 48, fd 54, a batch-1
per-sample backward loop 29. DoRA: hooks 19 (its forward-mode pass alone runs at 33), fd 53.

Both stream: nothing is kept between batches but r (and, for fd, θ and θ ± εr). A sample whose
loss or score is not finite gets NaN (the score stage's status 3); other samples of its batch are
unaffected, because no computation mixes rows of different samples (checked by a test).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batctl.data import Sample
from batctl.influence.capture import Capture, eval_mode, math_attention
from batctl.influence.grads import generic_grads
from batctl.influence.kernels import weight_and_bias_grads, weight_and_bias_scores
from batctl.influence.layers import (
    HookedModule,
    InfluenceError,
    Layer,
    LayerSet,
    clear_dora_norms,
    discover_layers,
    frozen_dora_norms,
)
from batctl.influence.target import Target
from batctl.tasks.base import Role, Task

log = logging.getLogger("batctl.influence")

ENGINES = ("hooks", "fd")

FD_REL_STEP = 1e-2
"""Default fd step without calibration: ε = FD_REL_STEP · ||θ|| / ||r||, so the adapter moves by
1% of its own norm (θ: all trainable parameters; floored at 1e-3 for an all-zero adapter)."""

FD_LADDER = tuple(0.25 * 4.0**-k for k in range(8))
"""Relative steps ||εr|| / ||θ|| tried by ``FDEngine.calibrate``: 0.25 down to 1.5e-5.

Central differences trade truncation, O(ε²), against the float32 rounding noise of the losses,
O(noise / ε), and where the balance lies depends on the model and on r (measured on the tiny
models: a near-uniform random LM needed 0.25, trained LoRA/DoRA LMs and a LoCon UNet 1e-2, a
DoRA UNet whose r sits on a few magnitude vectors ~4e-3; no fixed rule of ||θ||, ||r|| or the
loss fitted all). So the step is measured, once, on a calibration batch: the fd scores D_k at
each step of the ladder, and ε is the larger step of the adjacent pair whose scores agree best
(smallest max_i |D_k − D_k+1| / max_i |D_k+1|): there both errors are smallest. 16 forwards
on one batch, once; the score stage records ε so a resumed run reuses it."""


@dataclass
class Scores:
    """Scores of one pool batch."""

    scores: torch.Tensor
    """[B] float64 on the CPU: s(x) = Σ_l r_l · ∇_l L(x); NaN where the loss or score is not finite."""

    losses: torch.Tensor
    """[B] float64 on the CPU: L(x) at the surrogate (fd: the mean of L(θ ± εr))."""

    layer_scores: torch.Tensor | None = None
    """[B, L] float64 on the CPU, columns in ``Target.layers`` order, when asked for (hooks only)."""

    @property
    def finite(self) -> torch.Tensor:
        """[B] bool: the sample got a score (False: status 3, non-finite loss or gradient)."""
        return torch.isfinite(self.scores)


class NonFiniteInBatch(InfluenceError):
    """A batch that must be scored one sample at a time (``HooksEngine`` with ``normalize`` and
    generic layers, when some sample's loss is not finite)."""


def _bind(task: Task, target: Target, layerset: LayerSet | None) -> LayerSet:
    """The task's layers, checked against the target's (same names, same shapes)."""
    layerset = layerset or discover_layers(task)
    mine, theirs = set(layerset.names), set(target.layers)
    if mine != theirs:
        missing, extra = sorted(theirs - mine), sorted(mine - theirs)
        raise InfluenceError(
            "the target does not match the adapter: "
            + (
                f"{len(missing)} target layers not in the adapter (e.g. {missing[0]})"
                if missing
                else ""
            )
            + ("; " if missing and extra else "")
            + (f"{len(extra)} adapter layers not in the target (e.g. {extra[0]})" if extra else "")
        )
    for layer in layerset.layers:
        if tuple(target.r[layer.name].shape) != layer.shape:
            raise InfluenceError(
                f"layer {layer.name}: target shape {tuple(target.r[layer.name].shape)} "
                f"!= adapter shape {layer.shape}"
            )
    return layerset


class _LossOf(nn.Module):
    """``task.per_sample_loss`` as a module of ``task.model``, for ``torch.func.functional_call``."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.model = task.model
        self._task = task

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._task.per_sample_loss(batch)


class HooksEngine:
    """Exact scores from one batched forward + backward (see the module docstring).

    ``HooksEngine(task, target)`` once, then ``score(batch)`` per pool batch
    (``batch = task.collate(samples, "pool")``). ``generic`` chooses the exact method for
    generic layers: ``"jvp"`` (forward mode), ``"double_backward"``, or ``"auto"`` (jvp, and
    double backward if forward mode is not implemented for some op). ``normalize`` divides
    each sample's scores by its gradient norm (see the module docstring).
    """

    name = "hooks"

    def __init__(
        self,
        task: Task,
        target: Target,
        layerset: LayerSet | None = None,
        generic: str = "auto",
        normalize: bool = False,
    ) -> None:
        if generic not in ("auto", "jvp", "double_backward"):
            raise ValueError(f"generic must be auto, jvp or double_backward, not {generic!r}")
        self.task = task
        self.normalize = normalize
        self.layerset = _bind(task, target, layerset)
        self.generic_method = generic
        self.r = {
            layer.name: target.r[layer.name].to(layer.param.device, layer.param.dtype)
            for layer in self.layerset.layers
        }
        self._loss_module = _LossOf(task)
        names = {id(p): n for n, p in task.model.named_parameters(remove_duplicate=False)}
        self._generic_names = {}
        for layer in self.layerset.generic:
            if id(layer.param) not in names:
                raise InfluenceError(f"layer {layer.name}: not a parameter of task.model")
            self._generic_names[layer.name] = names[id(layer.param)]

    # ---------------------------------------------------------------- hooked layers

    def score(self, batch: dict[str, Any], layer_scores: bool = False) -> Scores:
        """Scores of one collated pool batch; per-layer scores [B, L] when ``layer_scores``."""
        layerset = self.layerset
        columns: dict[int, torch.Tensor] = {}
        # --normalize: Σ_l ||g_l(x)||² per sample; a module's per-sample gradient is kept only
        # until its last tapped call has reported (a shared module's calls add up first).
        norm_sq: list[torch.Tensor] = []
        partial: dict[str, torch.Tensor] = {}
        waiting: dict[int, int] = {}
        samples = 0

        def on_grad(entry: HookedModule, a: torch.Tensor, delta: torch.Tensor) -> None:
            rw = self.r[entry.weight.name] if entry.weight is not None else None
            rb = self.r[entry.bias.name] if entry.bias is not None else None
            sw, sb = weight_and_bias_scores(entry, a, delta, samples, rw, rb)
            for layer, s in ((entry.weight, sw), (entry.bias, sb)):
                if layer is not None and s is not None:
                    columns[layer.index] = columns[layer.index] + s if layer.index in columns else s
            if self.normalize:
                gw, gb = weight_and_bias_grads(entry, a, delta, samples, torch.float64)
                for layer, g in ((entry.weight, gw), (entry.bias, gb)):
                    if layer is not None and g is not None:
                        partial[layer.name] = (
                            partial[layer.name] + g if layer.name in partial else g
                        )
                key = id(entry)
                waiting[key] = waiting.get(key, cap.calls.get(key, 1)) - 1
                if waiting[key] <= 0:
                    for layer in (entry.weight, entry.bias):
                        if layer is not None and layer.name in partial:
                            norm_sq[0] += partial.pop(layer.name).square().sum(1)

        keep_graph = self.normalize and bool(layerset.generic)
        with eval_mode(self.task.model), torch.enable_grad(), Capture(layerset, on_grad) as cap:
            cap.recording = True
            losses = self.task.per_sample_loss(batch)
            cap.recording = False
            samples = losses.shape[0]
            finite = torch.isfinite(losses.detach())
            if keep_graph and samples > 1 and not bool(finite.all()):
                # The generic layers' per-sample gradients come from one batched backward, in
                # which a non-finite sample's NaN activations reach every row (0 · NaN).
                raise NonFiniteInBatch(
                    "a non-finite sample in the batch would spoil the other samples' gradient "
                    "norms; score its samples one at a time"
                )
            norm_sq.append(torch.zeros(samples, dtype=torch.float64, device=losses.device))
            # A non-finite loss must not turn the sum (and every δ) into NaN: mask it out; its
            # own rows may still go NaN in the backward, but no other sample's do.
            masked = torch.where(finite, losses, torch.zeros_like(losses))
            cap.backward(masked.sum(), retain_graph=keep_graph)
            if keep_graph:
                cap.active = False
                for g in generic_grads(masked, layerset.generic).values():
                    norm_sq[0] += g.to(torch.float64).square().sum(1)
            losses = losses.detach()  # lets the kept graph go before the generic layers' pass
            del masked
        norms = None
        if self.normalize:
            for g in partial.values():  # calls whose backward never came: what they had
                norm_sq[0] += g.square().sum(1)
            partial.clear()
            norms = norm_sq[0].sqrt()
        generic = self._generic_columns(batch, per_layer=layer_scores) if layerset.generic else {}
        summed_generic = generic.pop(-1, None)
        columns.update(generic)

        device = losses.device
        per_layer = torch.zeros(samples, len(layerset), dtype=torch.float64, device=device)
        for index, s in columns.items():
            per_layer[:, index] = s.to(device, torch.float64)
        total = per_layer.sum(1)
        if summed_generic is not None:
            total = total + summed_generic.to(device, torch.float64)
        if norms is not None:
            # A zero gradient (nothing to learn from x) scores 0; a non-finite norm, NaN.
            scale = torch.where(norms == 0, torch.zeros_like(norms), 1.0 / norms)
            total, per_layer = total * scale, per_layer * scale[:, None]
        bad = ~finite | ~torch.isfinite(total)
        total = total.masked_fill(bad, math.nan).cpu()
        out_layers = per_layer.masked_fill(bad[:, None], math.nan).cpu() if layer_scores else None
        return Scores(total, losses.double().cpu(), out_layers)

    # ---------------------------------------------------------------- generic layers

    def _generic_columns(self, batch: dict[str, Any], per_layer: bool) -> dict[int, torch.Tensor]:
        """{layer index: [B]} for each generic layer, or {-1: [B]} for all of them summed."""
        groups = (
            [[layer] for layer in self.layerset.generic] if per_layer else [self.layerset.generic]
        )
        method = self.generic_method
        if method in ("auto", "jvp"):
            try:
                values = [self._jvp(batch, group) for group in groups]
            except (NotImplementedError, RuntimeError) as exc:
                if method == "jvp":
                    raise
                log.info("forward-mode AD unavailable (%s); generic layers by double backward", exc)
                self.generic_method = "double_backward"
                values = self._double_backward(batch, groups)
        else:
            values = self._double_backward(batch, groups)
        if per_layer:
            return {group[0].index: v for group, v in zip(groups, values, strict=True)}
        return {-1: values[0]}

    def _jvp(self, batch: dict[str, Any], layers: list[Layer]) -> torch.Tensor:
        """Σ_{l in layers} r_l · ∇_l L_i for each sample: one forward-mode pass, [B] float64."""
        import torch.autograd.forward_ad as fwAD
        from torch.func import functional_call

        with (
            warnings.catch_warnings(),
            eval_mode(self.task.model),
            torch.no_grad(),
            math_attention(),
        ):
            # On first use torch scripts its forward-AD decompositions and warns that
            # torch.jit.script is deprecated: torch's own business, not the user's.
            warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
            with fwAD.dual_level():
                duals = {
                    "model." + self._generic_names[layer.name]: fwAD.make_dual(
                        layer.param.detach(), self.r[layer.name]
                    )
                    for layer in layers
                }
                out = functional_call(self._loss_module, duals, (batch,), strict=False)
                tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:  # these layers do not reach the loss
            return torch.zeros(out.shape[0], dtype=torch.float64)
        return tangent.double()

    def _double_backward(
        self, batch: dict[str, Any], groups: list[list[Layer]]
    ) -> list[torch.Tensor]:
        """The same as ``_jvp`` by reverse-over-reverse: ∂/∂w_i of r · ∇_θ Σ_j w_j L_j, w = 1."""
        with eval_mode(self.task.model), torch.enable_grad(), math_attention():
            losses = self.task.per_sample_loss(batch)
            w = torch.ones_like(losses, requires_grad=True)
            finite = torch.isfinite(losses.detach())
            total = torch.where(finite, w * losses, torch.zeros_like(losses)).sum()
            out = []
            for group in groups:
                params = [layer.param for layer in group]
                g = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
                dot = sum(
                    (gi * self.r[layer.name]).sum()
                    for gi, layer in zip(g, group, strict=True)
                    if gi is not None
                )
                if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                    out.append(torch.zeros(losses.shape[0], dtype=torch.float64))
                    continue
                (s,) = torch.autograd.grad(dot, [w], retain_graph=True)
                out.append(s.double())
        return out


class FDEngine:
    """Central-difference scores in two no-grad forward passes (see the module docstring).

    The step ε (a multiple of r): ``eps`` when given (e.g. read back from a previous run),
    else measured on ``calibration`` (a collated batch, e.g. of adaptation samples; see
    ``FD_LADDER``), else ``FD_REL_STEP`` · ||θ|| / ||r||. ``self.eps`` is the step used.
    The model's own dtype is used: run it in float32 (a bf16/fp16 backbone makes fd noise).
    DoRA's column norms are held at their value at θ, as DoRA's gradient does.
    """

    name = "fd"

    def __init__(
        self,
        task: Task,
        target: Target,
        layerset: LayerSet | None = None,
        eps: float | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.layerset = _bind(task, target, layerset)
        self.params = [layer.param for layer in self.layerset.layers]
        clear_dora_norms(task.model)  # norms cached before now may belong to other weights
        self.theta = [p.detach().clone() for p in self.params]
        self._r = [
            target.r[layer.name].to(p.device, torch.float64)
            for layer, p in zip(self.layerset.layers, self.params, strict=True)
        ]
        self.r_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in self._r))
        self.theta_norm = max(
            math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.theta)), 1e-3
        )
        self.calibration: list[tuple[float, float]] = []
        """(relative step, disagreement with the next smaller step) per ladder rung, if any."""
        if eps is None:
            eps = (
                self.calibrate(calibration)
                if calibration is not None
                else self._eps_of(FD_REL_STEP)
            )
        self.eps = float(eps)
        self._points = self._make_points(self.eps)
        floats = {p.dtype for p in task.model.parameters() if p.is_floating_point()}
        if floats & {torch.float16, torch.bfloat16}:
            log.warning(
                "fd engine on a half-precision backbone: scores will be noisy; use --dtype fp32"
            )

    def _eps_of(self, relative: float) -> float:
        """ε with ||εr|| = relative · ||θ|| (0 when r = 0)."""
        return relative * self.theta_norm / self.r_norm if self.r_norm > 0 else 0.0

    def _make_points(self, eps: float) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
        """θ + εr, θ − εr (formed in float64, rounded once to the parameters' dtype) and the
        realised 2ε along r, (θ₊ − θ₋) · r / ||r||², which that rounding can move slightly."""
        plus, minus = [], []
        for t, d in zip(self.theta, self._r, strict=True):
            plus.append((t.double() + eps * d).to(t.dtype))
            minus.append((t.double() - eps * d).to(t.dtype))
        step = sum(
            float(((p.double() - m.double()) * d).sum())
            for p, m, d in zip(plus, minus, self._r, strict=True)
        )
        return plus, minus, (step / self.r_norm**2 if self.r_norm > 0 else 0.0)

    def _load(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                p.copy_(v)

    def _differences(
        self, batch: dict[str, Any], points: list[tuple[list, list, float]]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """fd scores [B] (float64) for each (θ₊, θ₋, 2ε) of ``points``; L(θ) when it had to be
        run (DoRA); the mean of the last L(θ₊), L(θ₋)."""
        model = self.task.model
        at_theta = mean = None
        out = []
        with eval_mode(model), torch.no_grad(), frozen_dora_norms(model) as primed:
            try:
                if not primed:  # DoRA: one forward at θ fixes the norms the steps then reuse
                    at_theta = self.task.per_sample_loss(batch).double()
                for plus, minus, denominator in points:
                    self._load(plus)
                    up = self.task.per_sample_loss(batch).double()
                    self._load(minus)
                    down = self.task.per_sample_loss(batch).double()
                    out.append((up - down) / denominator)
                    mean = (up + down) / 2
            finally:
                self._load(self.theta)  # bit-exact: the copy taken at construction
        return out, at_theta, mean

    def calibrate(self, batch: dict[str, Any]) -> float:
        """Measure ε on ``batch`` (see ``FD_LADDER``); fills ``self.calibration``; returns ε."""
        if self.r_norm == 0:
            return 0.0
        points = [self._make_points(self._eps_of(rel)) for rel in FD_LADDER]
        scores, _, _ = self._differences(batch, points)
        best, best_gap = 0, math.inf
        self.calibration = []
        for k in range(len(FD_LADDER) - 1):
            a, b = scores[k], scores[k + 1]
            ok = torch.isfinite(a) & torch.isfinite(b)
            scale = float(b[ok].abs().max()) if bool(ok.any()) else 0.0
            gap = float((a[ok] - b[ok]).abs().max()) / scale if scale > 0 else math.inf
            self.calibration.append((FD_LADDER[k], gap))
            if gap < best_gap:
                best, best_gap = k, gap
        log.info(
            "fd step: ||εr|| / ||θ|| = %.2g (its scores agree to %.1e with the next smaller step)",
            FD_LADDER[best],
            best_gap,
        )
        return self._eps_of(FD_LADDER[best])

    def score(self, batch: dict[str, Any], layer_scores: bool = False) -> Scores:
        """Scores of one collated pool batch (``layer_scores`` is not available from fd)."""
        if layer_scores:
            raise InfluenceError("the fd engine gives no per-layer scores: use --engine hooks")
        if self._points[2] == 0:  # r = 0: every score is 0
            with eval_mode(self.task.model), torch.no_grad():
                losses = self.task.per_sample_loss(batch).double()
            zeros = torch.zeros_like(losses).masked_fill(~torch.isfinite(losses), math.nan)
            return Scores(zeros.cpu(), losses.cpu())
        (scores,), at_theta, mean = self._differences(batch, [self._points])
        scores = scores.masked_fill(~torch.isfinite(scores), math.nan)
        losses = at_theta if at_theta is not None else mean
        return Scores(scores.cpu(), losses.cpu())


def make_engine(name: str, task: Task, target: Target, **options: Any) -> HooksEngine | FDEngine:
    """The engine called ``name`` (``hooks`` or ``fd``) for ``task`` and ``target``."""
    if name == "hooks":
        return HooksEngine(task, target, **options)
    if name == "fd":
        return FDEngine(task, target, **options)
    raise ValueError(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")


def iter_scores(
    engine: HooksEngine | FDEngine,
    samples: Sequence[Sample],
    batch_size: int,
    role: Role = "pool",
    layer_scores: bool = False,
) -> Iterator[tuple[list[Sample], Scores]]:
    """Score ``samples`` batch by batch: yields (the batch's samples, their Scores)."""
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        yield chunk, engine.score(engine.task.collate(chunk, role), layer_scores=layer_scores)
