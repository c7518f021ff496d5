"""The paper's ALBAT loop (Algorithm 1, appendix C): re-check Proposition 2 while training and
re-select the backbone data when it stops holding. Blind to the model family: it sees a Task.

Every `every` optimizer steps (not after the last one, where a check could change nothing), at
the adapter's current parameters:

1. check: both sides of Proposition 2 for D_A and the current selection S, with the same code
   `select` uses (`batctl.prop2.gradient_grams` + `prop2.report`): Score_bat = side(D_A ∪ S),
   Score_A = side(D_A), per layer and combined. While Score_bat ≤ Score_A training goes on
   unchanged (the data order is not touched, so a run whose check always holds is the static run
   bit for bit).
2. re-select, when it fails (or when training runs on D_A alone after a fallback, whose check
   compares D_A with itself and says nothing): per-sample gradients of D_A and the bounded
   candidate set C (a score store's top M, or a selection's samples) at the current parameters,
   one Gram matrix per layer, then greedy forward selection of k = |S| candidates (γ is kept):
   each round adds the candidate that gives the smallest combined Score_bat of D_A ∪ S ∪ {c},
   ties to the earlier candidate. Exact minimisation over all k-subsets is combinatorial; the
   greedy rounds cost k batched (n + k)² solves per layer from the Gram matrices, no gradients.
3. If the chosen set satisfies the condition, training continues on D_A ∪ S'; if not (no
   candidate set of that size promises faster convergence, which the paper reports near the
   end of training), it continues on D_A alone and says so.

Everything is recorded (`CheckRecord`), as one JSON line per check in `reselect.jsonl`; the
seconds each check took go to `reselect-timing.jsonl`, so the history itself is the same bytes
for the same seed and inputs.

Cost of one check: gradients of n + k samples; of a re-selection: gradients of n + M samples,
the Gram matrices ((n + M)² per layer) and k greedy rounds. Memory: (n + M) × Σ_l D_l × 8 bytes
while the Gram matrices are formed (see `batctl.prop2`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batctl import prop2
from batctl.data import Sample
from batctl.tasks.base import Task

log = logging.getLogger("batctl.reselect")

HISTORY = "reselect.jsonl"
TIMING = "reselect-timing.jsonl"
PLOT = "reselect.png"


@dataclass(frozen=True)
class ReselectSettings:
    """How often and how the ALBAT loop re-checks Proposition 2."""

    every: int
    """Check every this many optimizer steps (after steps every, 2·every, ...)."""

    damping: float = 0.1
    """c in Proposition 2's λ = c · mean ||g||² / D_l."""

    batch_size: int = 8
    """Samples per gradient pass."""


# ------------------------------------------------------------------------------ the math


def greedy_order(grams: prop2.Grams, k: int) -> list[int]:
    """Greedy forward selection of `k` finite pool rows of `grams` minimising combined Score_bat.

    Round t adds the row c (not yet chosen) that minimises Σ_l side_l(D_A ∪ S ∪ {c})² over the
    layers not excluded, ties to the lower row. Returns positions among the finite pool rows
    (0-based, i.e. Gram row n + position), in the order chosen; fewer than `k` when fewer rows
    are finite.
    """
    finite = int(grams.pool_finite.sum())
    k = min(k, finite)
    n = grams.n
    chosen: list[int] = []
    layers = [name for name in grams.grams if name not in grams.excluded]
    for _ in range(k):
        rest = torch.tensor([p for p in range(finite) if p not in chosen], dtype=torch.long)
        total = torch.zeros(len(rest), dtype=torch.float64)
        for name in layers:
            total += _sides_with_one_more(
                grams.grams[name], n, chosen, rest, grams.dims[name], grams.c
            ).pow(2)
        # torch.argmin returns the first minimum: ties go to the lower row, as documented.
        chosen.append(int(rest[int(torch.argmin(total))]))
    return chosen


def _sides_with_one_more(
    K: torch.Tensor, n: int, chosen: list[int], rest: torch.Tensor, dim: int, c: float
) -> torch.Tensor:
    """side(D_A ∪ S ∪ {r}) of one layer for every r in `rest`, as `prop2.newton_side` computes
    it, batched over r: [len(rest)] float64."""
    K = K.double()
    base = torch.tensor(list(range(n)) + [n + p for p in chosen], dtype=torch.long)
    extra = rest + n
    N0 = len(base)
    N = N0 + 1
    R = len(rest)
    B = torch.empty(R, N, N, dtype=torch.float64)
    B[:, :N0, :N0] = K[base][:, base]
    cross = K[extra][:, base]  # [R, N0]
    B[:, N0, :N0] = cross
    B[:, :N0, N0] = cross
    B[:, N0, N0] = K[extra, extra]
    lam = c * B.diagonal(dim1=1, dim2=2).sum(1) / (N * dim)  # [R]
    A = B.clone()
    A.diagonal(dim1=1, dim2=2).add_((N * lam).unsqueeze(1))
    ones = torch.ones(R, N, 1, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(A)
    u = torch.cholesky_solve(ones, L)
    bad = info != 0
    if bool(bad.any()):
        u[bad] = torch.linalg.solve(A[bad], ones[bad])
    quad = (u.transpose(1, 2) @ B @ u).reshape(R).clamp_min(0.0)
    return torch.where(lam > 0, quad.sqrt(), torch.zeros_like(quad))


def reordered(grams: prop2.Grams, positions: Sequence[int]) -> prop2.Grams:
    """`grams` with only D_A followed by the finite pool rows at `positions`, in that order: then
    `prop2.report(result, len(positions))` gives both sides for D_A ∪ those rows."""
    index = torch.tensor(list(range(grams.n)) + [grams.n + p for p in positions], dtype=torch.long)
    return prop2.Grams(
        {name: K[index][:, index] for name, K in grams.grams.items()},
        dict(grams.dims),
        grams.n,
        torch.ones(len(positions), dtype=torch.bool),
        list(grams.excluded),
        grams.c,
    )


# ------------------------------------------------------------------------------ the loop's hook


@dataclass
class CheckRecord:
    """One check of the ALBAT loop, as a line of reselect.jsonl."""

    step: int
    report: dict[str, Any]
    """Both sides for the selection trained on before the check (prop2.report's keys)."""

    selection_size: int
    action: str
    """continue (holds), reselect (a new selection that satisfies it), fallback (none does:
    D_A alone from here), or stay-adaptation (on D_A alone, no candidate set satisfies it)."""

    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    new_report: dict[str, Any] | None = None
    """Both sides for the set chosen by the re-selection (whether it satisfies them or not)."""

    new_size: int = 0
    candidates: int = 0
    """Candidates with finite gradients that the re-selection chose from."""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "bat": self.report["bat"],
            "adaptation": self.report["adaptation"],
            "holds": self.report["holds"],
            "selection_size": self.selection_size,
            "action": self.action,
            "added": self.added,
            "dropped": self.dropped,
            "new_selection_size": self.new_size,
            "new_bat": None if self.new_report is None else self.new_report["bat"],
            "new_holds": None if self.new_report is None else self.new_report["holds"],
            "candidates": self.candidates,
            "layers": {
                name: {"bat": layer["bat"], "adaptation": layer["adaptation"]}
                for name, layer in self.report["layers"].items()
            },
            "excluded_layers": self.report["excluded_layers"],
        }


class Reselector:
    """The training loop's hook: `maybe_reselect(step, task, selection)` after every step.

    Holds D_A, the initial selection (whose size k is kept: γ is kept), the candidate set, and
    writes reselect.jsonl and reselect-timing.jsonl into `out_dir` as it goes.
    """

    def __init__(
        self,
        adaptation: Sequence[Sample],
        selection: Sequence[Sample],
        candidates: Sequence[Sample],
        settings: ReselectSettings,
        out_dir: Path,
    ) -> None:
        self.adaptation = list(adaptation)
        self.current = list(selection)
        """The selection trained on now."""
        self.candidates = list(candidates)
        self.count = len(self.current)
        """k, kept (γ is kept): the size of the initial selection."""
        self.settings = settings
        self.out_dir = out_dir
        self.records: list[CheckRecord] = []
        self.timing: list[dict[str, Any]] = []
        (out_dir / HISTORY).write_text("", encoding="utf-8")
        (out_dir / TIMING).write_text("", encoding="utf-8")

    def maybe_reselect(
        self, step: int, task: Task, selection: Sequence[Sample]
    ) -> list[Sample] | None:
        """After optimizer step `step` (1-based): None to go on with `selection`, or the samples
        to train on from now (possibly empty: D_A alone)."""
        if step % self.settings.every:
            return None
        started = time.perf_counter()
        report = self.check(task, selection)
        checked = time.perf_counter()
        record = CheckRecord(step, report, len(selection), "continue")
        new: list[Sample] | None = None
        # On D_A alone the check compares D_A with itself; only a re-selection can tell more.
        if (not report["holds"] or not selection) and self.count > 0 and self.candidates:
            new = self.reselect(task, selection, record)
        elif not report["holds"]:
            record.action = "fallback"
            new = []
        finished = time.perf_counter()
        self.records.append(record)
        self.timing.append(
            {
                "step": step,
                "check_seconds": round(checked - started, 6),
                "reselect_seconds": round(finished - checked, 6),
                "seconds": round(finished - started, 6),
            }
        )
        with (self.out_dir / HISTORY).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")
        with (self.out_dir / TIMING).open("a", encoding="utf-8") as f:
            f.write(json.dumps(self.timing[-1]) + "\n")
        if new is None or {s.key for s in new} == {s.key for s in selection}:
            return None  # the same samples: keep the data order as it is
        self.current = new
        return new

    def check(self, task: Task, selection: Sequence[Sample]) -> dict[str, Any]:
        """Both sides of Proposition 2 for D_A and `selection` at the task's current adapter."""
        grams = prop2.gradient_grams(
            task, self.adaptation, list(selection), self.settings.damping, self.settings.batch_size
        )
        return prop2.report(grams, len(selection))

    def reselect(
        self, task: Task, selection: Sequence[Sample], record: CheckRecord
    ) -> list[Sample]:
        """Greedy smallest-Score_bat k-subset of the candidates at the current adapter; the
        new selection if it satisfies Proposition 2, else [] (D_A alone). Fills `record`."""
        grams = prop2.gradient_grams(
            task, self.adaptation, self.candidates, self.settings.damping, self.settings.batch_size
        )
        finite = [
            s for s, ok in zip(self.candidates, grams.pool_finite.tolist(), strict=True) if ok
        ]
        positions = greedy_order(grams, self.count)
        picked = [finite[p] for p in positions]
        new_report = prop2.report(reordered(grams, positions), len(positions))
        record.new_report = new_report
        record.candidates = len(finite)
        if len(positions) < self.count:
            log.warning(
                "re-selection at step %d: only %d candidates have finite gradients, fewer than "
                "k = %d; the new selection is smaller (γ rises)",
                record.step,
                len(positions),
                self.count,
            )
        old = [s.key for s in selection]
        if new_report["holds"] and picked:
            record.action = "reselect"
            chosen = picked
        else:
            record.action = "fallback" if selection else "stay-adaptation"
            chosen = []
        keys = [s.key for s in chosen]
        old_set, new_set = set(old), set(keys)
        record.added = [k for k in keys if k not in old_set]
        record.dropped = [k for k in old if k not in new_set]
        record.new_size = len(chosen)
        if record.action == "reselect":
            log.info(
                "step %d: Proposition 2 %s (%.4g vs %.4g); re-selected %d samples "
                "(%d added, %d dropped), new Score_bat %.4g",
                record.step,
                "holds only trivially on D_A alone" if not selection else "fails",
                record.report["bat"],
                record.report["adaptation"],
                len(chosen),
                len(record.added),
                len(record.dropped),
                new_report["bat"],
            )
        elif record.action == "fallback":
            log.warning(
                "step %d: Proposition 2 fails (%.4g > %.4g) and no set of %d candidates "
                "satisfies it (best %.4g): training continues on D_A alone",
                record.step,
                record.report["bat"],
                record.report["adaptation"],
                self.count,
                new_report["bat"],
            )
        return chosen

    def summary(self) -> dict[str, Any]:
        """What the manifest records: checks, re-selections, fallbacks, seconds, final keys."""
        actions = [r.action for r in self.records]
        return {
            "every": self.settings.every,
            "damping": self.settings.damping,
            "count": self.count,
            "candidates": len(self.candidates),
            "checks": len(self.records),
            "failed": sum(not r.report["holds"] for r in self.records),
            "reselections": actions.count("reselect"),
            "fallbacks": actions.count("fallback"),
            "seconds": round(sum(t["seconds"] for t in self.timing), 3),
            "final_size": len(self.current),
            "final_keys": [s.key for s in self.current],
        }


# ------------------------------------------------------------------------------ candidates


def candidates_from_scores(path: Path, count: int) -> tuple[list[Sample], float | None]:
    """The `count` best-scored eligible rows of the score store at `path` (albat order, one row
    per key), decoded from the pool, and the score run's damping c (None if not recorded)."""
    from batctl import selection as sel
    from batctl.fetch import Fetcher

    source = sel.open_scores(path)
    columns = sel.read_columns(source.store)
    plan = sel.plan_selection(columns, source.n, strategy="albat", counts=[count])
    rows = plan.stream[: plan.values[0].count]
    fetch = Fetcher(source, source.pool_paths())
    fetch.locate(rows, columns.key)
    damping = source.params.get("damping")
    return [fetch.decoded(int(r)) for r in rows], None if damping is None else float(damping)


def plot_history(records: Sequence[CheckRecord], path: Path) -> None:
    """Both combined sides over steps, re-selections and fallbacks marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(
        steps, [r.report["bat"] for r in records], marker="o", ms=3, label="Score_bat (D_A ∪ S)"
    )
    ax.plot(
        steps, [r.report["adaptation"] for r in records], marker="s", ms=3, label="Score_A (D_A)"
    )
    for r in records:
        if r.action == "reselect":
            ax.axvline(r.step, color="tab:green", lw=0.8, ls="--")
            ax.plot([r.step], [r.new_report["bat"]], "g^", ms=6)  # type: ignore[index]
        elif r.action == "fallback":
            ax.axvline(r.step, color="tab:red", lw=0.8, ls=":")
    ax.plot([], [], color="tab:green", ls="--", label="re-selected (▲ new Score_bat)")
    ax.plot([], [], color="tab:red", ls=":", label="fallback to D_A alone")
    ax.set_xlabel("step")
    ax.set_ylabel("||H⁻¹ mean ∇L|| (combined)")
    ax.set_yscale("log" if all(r.report["bat"] > 0 for r in records) and records else "linear")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
