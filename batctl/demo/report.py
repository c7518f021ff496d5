"""The demo's results: one row per adapter, read back from the stage outputs, as a table,
results.json and plots (held-out loss by γ, ||θ − θ*|| over steps, training loss, scores)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batctl.demo.world import World
from batctl.metrics.report import METRICS_JSON
from batctl.selection import value_name
from batctl.selection_files import read_chosen


def adapter_label(strategy: str, gamma: float | None = None) -> str:
    """The train directory name (and eval row label) of one adapter: none, random-g0.5, or a
    method's name and γ (influence-g0.5, bm25-g0.5)."""
    if strategy == "none":
        return "none"
    return f"{strategy}-g{gamma}"


def selection_dir(out: Path, strategy: str, gamma: float) -> Path:
    """Where the demo's select stage wrote the selection an adapter was trained with (a
    METHOD-dynamic adapter starts from METHOD's)."""
    return out / f"select-{strategy.removesuffix('-dynamic')}" / value_name("gamma", gamma)


def target_share(selection: Path, world: World) -> tuple[int, float | None]:
    """(selected count, share of them from the target domain; None when nothing was selected)."""
    chosen = read_chosen(selection)
    if not chosen:
        return 0, None
    hits = sum(World.domain_of(c["key"]) == world.target for c in chosen)
    return len(chosen), hits / len(chosen)


def collect(
    world: World, out: Path, gammas: Sequence[float], methods: Sequence[str], seed: int
) -> dict[str, Any]:
    """Every adapter's held-out loss, weight difference to θ* (final and per step), training
    loss curve and selection make-up, from the eval, train and select outputs under ``out``."""
    metrics = json.loads((out / "eval" / METRICS_JSON).read_text())["rows"]
    plan: list[tuple[str, float | None]] = [("none", None)]
    for g in gammas:
        plan.append(("random", g))
        plan += [(m, g) for m in methods]
    rows = []
    for strategy, gamma in plan:
        label = adapter_label(strategy, gamma)
        row = metrics[label]
        count, share = 0, None
        if strategy != "none":
            count, share = target_share(selection_dir(out, strategy, gamma), world)
        rows.append(
            {
                "adapter": label,
                "strategy": strategy,
                "gamma": gamma,
                "selected": count,
                "target_share": share,
                "heldout_loss": row.get("heldout_loss"),
                "weight_diff": row.get("weight_diff"),
                "weight_diff_rel": row.get("weight_diff_rel"),
                "weight_diff_curve": row.get("weight_diff_curve") or [],
                "train_loss": training_curve(out / "train" / label),
            }
        )
    return {
        "family": world.family,
        "target": world.target,
        "base_rate": world.base_rate,
        "pool": world.pool_domains,
        "n_adaptation": count_lines(world.adaptation),
        "seed": seed,
        "world": str(world.root),
        "backbone_heldout_loss": metrics.get("backbone", {}).get("heldout_loss"),
        "oracle_heldout_loss": metrics.get("oracle", {}).get("heldout_loss"),
        "rows": rows,
        "scores": {m: str(out / f"scores-{m}") for m in methods if not m.endswith("-dynamic")},
    }


def count_lines(path: Path) -> int | None:
    """Samples in a JSONL file or files in an image folder (the adaptation set's n)."""
    path = Path(path)
    if path.is_dir():
        return sum(
            1 for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg")
        )
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return None


def training_curve(adapter: Path) -> list[tuple[int, float]]:
    """(step, training loss) from an adapter's log.jsonl."""
    log = adapter / "log.jsonl"
    if not log.is_file():
        return []
    out = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "step" in record:
            out.append((int(record["step"]), float(record["loss"])))
    return out


def fmt(value: float | None, spec: str = ".4f") -> str:
    """A number for the table; "-" when absent or not finite."""
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def loss_decimals(results: dict[str, Any]) -> int:
    """Decimals enough to tell the losses apart (2-8): the diffusion demo's differ in the 5th."""
    values = [r["heldout_loss"] for r in results["rows"] if r["heldout_loss"] is not None]
    values += [results.get("backbone_heldout_loss"), results.get("oracle_heldout_loss")]
    values = [v for v in values if v is not None and math.isfinite(v)]
    scale = max(values, key=abs) if values else 1.0
    spread = max(values) - min(values) if len(values) > 1 else 0.0
    # Four digits below the spread's leading digit, or four significant ones when all agree.
    digits = 4 - math.floor(math.log10(spread)) - 1 if spread > 0 else 4
    digits = max(digits, 4 - math.floor(math.log10(abs(scale))) - 1 if scale else 4)
    return min(max(digits, 2), 8)


def render_table(results: dict[str, Any]) -> str:
    """The markdown table the demo prints: one row per adapter."""
    spec = f".{loss_decimals(results)}f"
    lines = [
        f"BAT demo ({results['family']}): target domain {results['target']!r}, "
        f"n = {results['n_adaptation']} adaptation samples, pool base rate "
        f"{100 * results['base_rate']:.1f}% of {sum(results['pool'].values())}; seed {results['seed']}",
        "",
        "| adapter | γ | selected | target share | held-out loss | ‖θ−θ*‖/‖θ*‖ |",
        "|---|---|---|---|---|---|",
        f"| backbone (no adapter) | - | - | - | {fmt(results['backbone_heldout_loss'], spec)} | - |",
    ]
    for row in results["rows"]:
        share = row["target_share"]
        lines.append(
            f"| {row['adapter']} | {row['gamma'] if row['gamma'] is not None else 1.0} | "
            f"{row['selected']} | {'-' if share is None else f'{100 * share:.0f}%'} | "
            f"{fmt(row['heldout_loss'], spec)} | {fmt(row['weight_diff_rel'], '.3f')} |"
        )
    lines.append(f"| oracle θ* | - | - | - | {fmt(results['oracle_heldout_loss'], spec)} | 0 |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], report: Path) -> str:
    """results.json, table.md and the plots into ``report``; returns the table."""
    from batctl.metrics.report import write_json

    report.mkdir(parents=True, exist_ok=True)
    write_json(report / "results.json", results)
    table = render_table(results)
    (report / "table.md").write_text(table, encoding="utf-8")
    plot_heldout_by_gamma(results, report / "heldout_loss.png")
    plot_curves(results, "weight_diff_curve", report / "weight_diff.png")
    plot_curves(results, "train_loss", report / "train_loss.png")
    plot_scores(results, report / "scores.png")
    return table


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gammas(results: dict[str, Any]) -> list[float]:
    return sorted({r["gamma"] for r in results["rows"] if r["gamma"] is not None})


def plot_heldout_by_gamma(results: dict[str, Any], path: Path) -> None:
    """Held-out loss of each strategy at each γ (points, one marker per strategy), with the
    backbone, plain adaptation and θ* as horizontal reference lines. The y range spans the
    backbone and θ*, so gaps between strategies are read against the whole gain of adaptation."""
    plt = _pyplot()
    gammas = _gammas(results)
    strategies = [
        r["adapter"].rsplit("-g", 1)[0] for r in results["rows"] if r["gamma"] == gammas[0]
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    width = 0.6 / max(1, len(strategies))
    markers = "os^Dv<>"
    for j, name in enumerate(strategies):
        values = [
            next(r["heldout_loss"] for r in results["rows"] if r["adapter"] == f"{name}-g{g}")
            for g in gammas
        ]
        xs = [i + (j - (len(strategies) - 1) / 2) * width for i in range(len(gammas))]
        ax.plot(xs, values, markers[j % len(markers)], ms=7, label=name)
    none = next(r["heldout_loss"] for r in results["rows"] if r["strategy"] == "none")
    lines = [
        (results.get("backbone_heldout_loss"), "backbone (no adapter)", "gray", "-."),
        (none, "none (D_A only)", "black", "--"),
        (results.get("oracle_heldout_loss"), "oracle θ*", "green", ":"),
    ]
    for value, label, color, style in lines:
        if value is not None:
            ax.axhline(value, color=color, ls=style, lw=1, label=f"{label} {value:.4g}")
    ax.set_xticks(range(len(gammas)), [f"γ = {g}" for g in gammas])
    values = [r["heldout_loss"] for r in results["rows"] if r["heldout_loss"] is not None]
    values += [v for v, *_ in lines if v is not None]
    low, high = min(values), max(values)
    pad = 0.08 * (high - low) if high > low else 1e-3
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(-0.6, len(gammas) - 0.4)
    ax.set_xlabel("γ = n / (n + m): D_A's share of the augmented set")
    ax.set_ylabel("held-out loss, target domain (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(results: dict[str, Any], key: str, path: Path) -> None:
    """One panel per γ: ``key`` over training steps for none, random and albat (the paper's
    Figures 3-5: relative weight difference to θ*, or the training loss)."""
    plt = _pyplot()
    gammas = _gammas(results)
    fig, axes = plt.subplots(
        1, len(gammas), figsize=(4.2 * len(gammas), 3.6), dpi=100, squeeze=False
    )
    none = next(r for r in results["rows"] if r["strategy"] == "none")
    for ax, g in zip(axes[0], gammas, strict=True):
        for row in [none] + [r for r in results["rows"] if r["gamma"] == g]:
            points = row[key]
            if key == "weight_diff_curve":
                points = [
                    (p["step"], p["weight_diff_rel"])
                    for p in points
                    if p.get("weight_diff_rel") is not None
                ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=row["adapter"], lw=1.2)
        ax.set_title(f"γ = {g}")
        ax.set_xlabel("step")
        ax.set_ylabel("‖θ − θ*‖ / ‖θ*‖" if key == "weight_diff_curve" else "training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scores(results: dict[str, Any], path: Path) -> None:
    """Histogram of each method's pool scores, target domain against the rest."""
    import numpy as np

    from batctl.scorestore import SCORED, ScoreStore

    plt = _pyplot()
    stores = results["scores"]
    fig, axes = plt.subplots(1, len(stores), figsize=(5 * len(stores), 3.5), dpi=100, squeeze=False)
    for ax, (name, store_path) in zip(axes[0], stores.items(), strict=True):
        store = ScoreStore.open(Path(store_path))
        ok = store.column("status") == SCORED
        scores = np.asarray(store.column("score"))[ok]
        keys = np.asarray(store.column("key"))[ok]
        target = np.array([World.domain_of(str(k)) == results["target"] for k in keys])
        bins = np.histogram_bin_edges(scores, bins=60)
        ax.hist(scores[~target], bins=bins, alpha=0.6, label="other domains", log=True)
        ax.hist(scores[target], bins=bins, alpha=0.8, label=results["target"], log=True)
        ax.set_title(f"{name} scores")
        ax.set_xlabel("score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
