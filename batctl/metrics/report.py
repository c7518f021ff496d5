"""eval's outputs: metrics.json, report.md, held-out loss bars and weight-difference curves."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRIC_NOTES = {
    "heldout_loss": "mean over held-out samples of the per-sample loss (the training loss)",
    "nll": "LM: held-out NLL per predicted token (total NLL / total tokens), nats",
    "perplexity": "LM: exp(nll)",
    "acc": "LM: multiple-choice accuracy, argmax of the summed log-likelihood of ' ' + choice",
    "acc_norm": "LM: multiple-choice accuracy, argmax of log-likelihood / len(choice) in characters",
    "weight_diff": "||θ − θ*||₂ over the adapter's trainable parameters, θ* = --reference",
    "weight_diff_rel": "||θ − θ*||₂ / ||θ*||₂ (the paper's measure)",
}
METRICS_JSON = "metrics.json"
"""eval's rows and context, in its --out."""
CURVE = "weight_diff_curve"
NOT_METRICS = {"adapter", CURVE}


def jsonable(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither); containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Pretty, key-ordered, strict JSON (no NaN)."""
    path.write_text(
        json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )


def metric_columns(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Metric names in first-seen order over the rows (curves and paths left out)."""
    columns: list[str] = []
    for row in rows.values():
        for key in row:
            if key not in NOT_METRICS and key not in columns:
                columns.append(key)
    return columns


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return (
            f"{value:.4g}"
            if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)
            else f"{value:.4f}"
        )
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in body]
    return lines


def render_report(
    rows: Mapping[str, Mapping[str, Any]], context: Mapping[str, Any], notes: Sequence[str]
) -> str:
    """report.md: what was evaluated, the metrics table, the weight-difference curves, notes."""
    lines = ["# batctl eval", ""]
    for key, value in context.items():
        if value is not None:
            lines.append(f"- {key}: {value}")
    lines.append("")
    columns = metric_columns(rows)
    lines += _table(
        ["row", *columns], [[name, *(row.get(c) for c in columns)] for name, row in rows.items()]
    )
    curves = [(name, row[CURVE]) for name, row in rows.items() if row.get(CURVE)]
    if curves:
        lines += ["", "## Weight difference to the reference against steps", ""]
        body = [
            [name, point["step"], point["weight_diff"], point["weight_diff_rel"], point["adapter"]]
            for name, curve in curves
            for point in curve
        ]
        lines += _table(["row", "step", "weight_diff", "weight_diff_rel", "adapter"], body)
    lines += ["", "## Notes", ""]
    lines += [f"- {c}: {METRIC_NOTES[c]}" for c in columns if c in METRIC_NOTES]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heldout(
    rows: Mapping[str, Mapping[str, Any]],
    path: Path,
    metric: str = "heldout_loss",
    reference: float | None = None,
) -> None:
    """One point per adapter row: its held-out loss, with the bare backbone (the first row) and
    the reference adapter θ* (when given) as horizontal reference lines.

    Points, not bars: a bar's length claims a zero baseline, which a zoomed loss axis would
    break. The y range always spans both reference lines, so a difference between adapters is
    seen against what adaptation gains in all (backbone → θ*), never blown up into a cliff.
    """
    plt = _pyplot()
    names = list(rows)
    backbone = rows[names[0]].get(metric) if names else None
    adapters = [n for n in names[1:] if rows[n].get(metric) is not None]
    values = [float(rows[n][metric]) for n in adapters]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * len(adapters)), 3.6), dpi=100)
    ax.plot(range(len(adapters)), values, "o", color="#3a75b0", ms=7, label="adapter")
    for x, v in enumerate(values):
        ax.annotate(
            f"{v:.4g}", (x, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8
        )
    if backbone is not None:
        ax.axhline(backbone, color="black", ls="--", lw=1, label=f"backbone {backbone:.4g}")
    if reference is not None:
        ax.axhline(reference, color="green", ls=":", lw=1.2, label=f"oracle θ* {reference:.4g}")
    span = values + [v for v in (backbone, reference) if v is not None]
    if span:
        low, high = min(span), max(span)
        pad = 0.12 * (high - low) if high > low else max(abs(high) * 0.01, 1e-3)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(-0.6, max(len(adapters), 1) - 0.4)
    ax.set_xticks(range(len(adapters)), adapters, rotation=20, ha="right")
    ax.set_ylabel("held-out loss (lower is better)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_weight_diff(rows: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """||θ − θ*||₂ / ||θ*||₂ against steps, one line per adapter."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, row in rows.items():
        curve = [p for p in row.get(CURVE) or [] if p.get("weight_diff_rel") is not None]
        if curve:
            ax.plot(
                [p["step"] for p in curve],
                [p["weight_diff_rel"] for p in curve],
                marker="o",
                ms=3,
                label=name,
            )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("‖θ − θ*‖₂ / ‖θ*‖₂")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
