"""Dynamic re-selection (the paper's ALBAT loop) against static selection, random and none.

On the LM demo world (`batctl/demo/`: stdlib docstrings, a tiny LLaMA pretrained by batctl on
the pool), for every target domain and seed, with the demo's own recipe (score with --method,
batctl's default unless told; a surrogate when the method reads one; select at one γ):

- trains none (D_A alone), random (static), albat (static `train --selection`), albat-dynamic
  (`train --reselect-every N --scores`) and the oracle θ* on the oracle set, each saving a
  checkpoint every N steps;
- measures at every checkpoint the held-out loss and ||θ − θ*|| (the paper's Figure 3 plots
  the latter for BAT against random, claiming BAT stays closer throughout training);
- times the static and the dynamic albat run (wall seconds of the same stage, one run each, so
  the ratio is the cost of the loop; the machine's load is printed) and reads the seconds of
  every check and re-selection from reselect-timing.jsonl.

Prints a markdown table and one JSON object; writes reselect_curves.{md,json,png} under --out.

    python benchmarks/reselect_curves.py [--seeds 0 1 2] [--targets email] [--every 6]
        [--candidates 128] [--gamma 0.75] [--out runs/reselect-curves]

Every run is an ordinary batctl output under --out: a rerun finds them up to date (their timings
are kept in timing.json) and only redraws. `--targets` takes other domains where the demo world
offers them (`lm_world(seed, target=...)`), or a built world's directory.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

STRATEGIES = ("none", "random", "albat", "albat-dynamic")


def world_for(target: str) -> Any:
    """The LM demo world whose target domain is `target` (with its stage recipe); `target` may
    also be a built world's directory (e.g. one of another target domain)."""
    from batctl.demo.lm import RECIPE, TARGET, lm_world
    from batctl.demo.world import WORLD_FILE, World

    if (Path(target) / WORLD_FILE).is_file():
        return World.load(Path(target)).with_recipe(RECIPE)
    if "target" in inspect.signature(lm_world).parameters:
        return lm_world(0, target=target)[0]
    if target != TARGET:
        raise SystemExit(f"this demo world has one target domain, {TARGET!r}; not {target!r}")
    return lm_world(0)[0]


def timed_stage(stage: str, timing: dict[str, float], label: str, **flags: Any) -> None:
    """run_stage, timing it when it actually runs (an up-to-date output keeps its old time)."""
    from batctl.stages.demo import run_stage

    started = time.perf_counter()
    manifest = Path(flags["out"]) / "manifest.json"
    before = manifest.stat().st_mtime if manifest.is_file() else None
    run_stage(stage, **flags)
    if not manifest.is_file() or manifest.stat().st_mtime != before:
        timing[label] = time.perf_counter() - started


def run_seed(world: Any, seed: int, out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Every stage for one (world, seed); returns the adapter directory of each strategy."""
    from batctl.stages.demo import run_stage

    out.mkdir(parents=True, exist_ok=True)
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    common = {"model": str(world.model), **world.data_flags}
    on_adaptation = {**common, "data": str(world.adaptation), "seed": seed}
    training = {**on_adaptation, **world.train_flags, **args.train_override}
    training["save_every"] = args.every
    gamma = (str(args.gamma),)
    from batctl.methods import reads_surrogate

    gradient: dict[str, Any] = {}
    if reads_surrogate(args.method):
        run_stage("surrogate", out=out / "surrogate", **on_adaptation, **world.surrogate_flags)
        gradient = {"surrogate": out / "surrogate", "preconditioner": "woodbury"}
        gradient.update(world.score_flags)
    scores = out / "scores"
    run_stage(
        "score",
        out=scores,
        method=args.method,
        data=str(world.adaptation),
        pool=tuple(str(p) for p in world.pool),
        **common,
        **gradient,
    )
    name = f"gamma-{float(args.gamma)!r}"
    for strategy in ("albat", "random"):
        run_stage(
            "select",
            out=out / f"select-{strategy}",
            scores=scores,
            gamma=gamma,
            strategy=strategy,
            seed=seed,
        )
    adapters = {s: out / "train" / s for s in STRATEGIES}
    run_stage("train", out=adapters["none"], **training)
    run_stage("train", out=adapters["random"], selection=out / "select-random" / name, **training)
    albat = out / "select-albat" / name
    timed_stage("train", timing, "albat", out=adapters["albat"], selection=albat, **training)
    timed_stage(
        "train",
        timing,
        "albat-dynamic",
        out=adapters["albat-dynamic"],
        selection=albat,
        reselect_every=args.every,
        scores=scores,
        candidate_count=args.candidates,
        **training,
    )
    timing_path.write_text(json.dumps(timing, indent=1) + "\n")
    oracle = out / "oracle"
    run_stage("train", out=oracle, **{**training, **world.oracle_flags, "data": str(world.oracle)})
    adapters["oracle"] = oracle
    return adapters


def curves(world: Any, adapters: dict[str, Path]) -> dict[str, list[dict[str, float]]]:
    """Held-out loss and ||θ − θ*|| at every checkpoint (and the final step) of each strategy."""
    from batctl.stages.eval import heldout_loss, load_adapter, unload_adapter

    from batctl.metrics.weights import adapter_checkpoints, final_step, weight_difference
    from batctl.samples import load_samples
    from batctl.tasks import load_task
    from batctl.tasks.base import TaskSettings

    settings = TaskSettings(model=str(world.model), max_length=world.data_flags["max_length"])
    task = load_task(settings, "lm")
    heldout = load_samples(str(world.heldout), flag="heldout")
    load_adapter(task, adapters["oracle"])
    star = task.adapter_state()
    unload_adapter(task, adapters["oracle"])
    out: dict[str, list[dict[str, float]]] = {}
    for strategy in STRATEGIES:
        points = [*adapter_checkpoints(adapters[strategy])]
        last = final_step(adapters[strategy])
        if last is not None and all(step != last for step, _ in points):
            points.append((last, adapters[strategy]))
        rows = []
        for step, path in points:
            load_adapter(task, path)
            rows.append(
                {
                    "step": step,
                    "heldout_loss": heldout_loss(task, heldout, 16),
                    "weight_diff": weight_difference(
                        task.adapter_state(), star, str(path)
                    ).absolute,
                }
            )
            unload_adapter(task, path)
        out[strategy] = rows
    return out


def dynamic_record(adapter: Path) -> dict[str, Any]:
    """The dynamic run's checks: actions, sides, seconds."""
    history = [json.loads(x) for x in (adapter / "reselect.jsonl").read_text().splitlines()]
    timing = [json.loads(x) for x in (adapter / "reselect-timing.jsonl").read_text().splitlines()]
    manifest = json.loads((adapter / "manifest.json").read_text())
    return {
        "checks": [
            {k: h[k] for k in ("step", "bat", "adaptation", "holds", "action", "new_bat")}
            | {"added": len(h["added"]), "dropped": len(h["dropped"])}
            for h in history
        ],
        "check_seconds": [t["check_seconds"] for t in timing],
        "reselect_seconds": [t["reselect_seconds"] for t in timing if t["reselect_seconds"] > 0],
        "final_keys": manifest["reselect"]["final_keys"],
    }


def figure3(runs: dict[int, dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Per seed: at how many checkpoints strategy `a` is closer to θ* than `b`."""
    out = {}
    for seed, run in runs.items():
        da = {p["step"]: p["weight_diff"] for p in run["curves"][a]}
        db = {p["step"]: p["weight_diff"] for p in run["curves"][b]}
        steps = sorted(set(da) & set(db))
        closer = sum(da[s] < db[s] for s in steps)
        out[str(seed)] = {"closer": closer, "of": len(steps), "throughout": closer == len(steps)}
    return out


def table(target: str, runs: dict[int, dict[str, Any]]) -> str:
    """Markdown: per step, mean over seeds of held-out loss and ||θ − θ*|| per strategy."""
    first = next(iter(runs.values()))
    steps = [p["step"] for p in first["curves"]["albat"]]
    head = "| step | " + " | ".join(f"{s} loss" for s in STRATEGIES)
    head += " | " + " | ".join(f"{s} ‖θ−θ*‖" for s in STRATEGIES) + " |"
    lines = [f"### target {target}: mean over seeds {sorted(runs)}", "", head]
    lines.append("|" + "---|" * (1 + 2 * len(STRATEGIES)))
    for i, step in enumerate(steps):
        cells = []
        for key in ("heldout_loss", "weight_diff"):
            for s in STRATEGIES:
                values = [r["curves"][s][i][key] for r in runs.values() if i < len(r["curves"][s])]
                cells.append(f"{mean(values):.4f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """Held-out loss and ||θ − θ*|| over steps, mean and range over seeds, one row per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for row, (target, runs) in enumerate(results.items()):
        for col, key in enumerate(("heldout_loss", "weight_diff")):
            ax = axes[row][col]
            for s in STRATEGIES:
                n = min(len(r["curves"][s]) for r in runs.values())
                steps = [p["step"] for p in next(iter(runs.values()))["curves"][s][:n]]
                values = np.array([[p[key] for p in r["curves"][s][:n]] for r in runs.values()])
                ax.plot(steps, values.mean(0), marker="o", ms=3, label=s)
                ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
            for r in runs.values():
                for check in r["dynamic"]["checks"]:
                    if check["action"] in ("reselect", "fallback"):
                        ax.axvline(check["step"], color="grey", lw=0.4, ls=":")
            ax.set_xlabel("step")
            ax.set_ylabel("held-out loss" if key == "heldout_loss" else "‖θ − θ*‖")
            ax.set_title(f"{target}: {'held-out loss' if col == 0 else 'distance to θ*'}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=["email"])
    parser.add_argument("--every", type=int, default=6, help="re-check every N steps")
    parser.add_argument("--candidates", type=int, default=128, help="the store's top M")
    parser.add_argument("--gamma", type=float, default=0.75)
    parser.add_argument("--out", type=Path, default=Path("runs/reselect-curves"))
    parser.add_argument(
        "--method", default="mmr", help="score --method of the static selection and candidates"
    )
    parser.add_argument(
        "--train",
        metavar="STEPS,LR,WARMUP",
        help="train with this recipe instead of the demo's (e.g. 48,3e-3,4, the overfitting one)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bat_quality import train_recipe

    args.train_override = train_recipe(args.train)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"load": os.getloadavg(), "args": vars(args) | {"out": str(args.out)}}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    markdown = []
    for given in args.targets:
        world = world_for(given)
        target = world.target
        runs: dict[int, dict[str, Any]] = {}
        for seed in args.seeds:
            started = time.perf_counter()
            out = args.out / f"{target}-seed{seed}"
            adapters = run_seed(world, seed, out, args)
            timing = json.loads((out / "timing.json").read_text())
            dynamic = dynamic_record(adapters["albat-dynamic"])
            runs[seed] = {
                "curves": curves(world, adapters),
                "dynamic": dynamic,
                "train_seconds": timing,
                "run_ratio": timing["albat-dynamic"] / timing["albat"],
                "check_seconds_mean": mean(dynamic["check_seconds"]),
                "reselect_seconds_mean": (
                    mean(dynamic["reselect_seconds"]) if dynamic["reselect_seconds"] else None
                ),
            }
            print(f"{target} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        results[target] = runs
        checks = {
            "albat_vs_random": figure3(runs, "albat", "random"),
            "dynamic_vs_random": figure3(runs, "albat-dynamic", "random"),
            "dynamic_vs_albat": figure3(runs, "albat-dynamic", "albat"),
        }
        final = {
            s: mean(r["curves"][s][-1]["heldout_loss"] for r in runs.values()) for s in STRATEGIES
        }
        cost = [
            f"seed {s}: static {r['train_seconds']['albat']:.1f} s, dynamic "
            f"{r['train_seconds']['albat-dynamic']:.1f} s (×{r['run_ratio']:.2f}); one check "
            f"{r['check_seconds_mean']:.2f} s, one re-selection "
            + (
                f"{r['reselect_seconds_mean']:.2f} s"
                if r["reselect_seconds_mean"] is not None
                else "none"
            )
            + "; actions "
            + ",".join(c["action"][0] for c in r["dynamic"]["checks"])
            for s, r in runs.items()
        ]
        markdown += [
            table(target, runs),
            "Final held-out loss (mean): "
            + ", ".join(f"{s} {v:.4f}" for s, v in final.items())
            + "\n",
            "Figure 3 (closer to θ* than random at every checkpoint): "
            + "; ".join(f"{k}: {json.dumps(v)}" for k, v in checks.items())
            + "\n",
            "Cost (wall seconds, one run each; actions c=continue r=reselect f=fallback "
            "s=stay-adaptation):\n\n" + "\n".join(f"- {line}" for line in cost) + "\n",
        ]
        report[target] = {"figure3": checks, "final_heldout": final, "runs": runs}
    report["load_after"] = os.getloadavg()
    plot(results, args.out / "reselect_curves.png")
    text = f"Load average before: {report['load']}, after: {report['load_after']}\n\n"
    text += "\n".join(markdown)
    (args.out / "reselect_curves.md").write_text(text, encoding="utf-8")
    (args.out / "reselect_curves.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(text)
    print(json.dumps({t: report[t]["figure3"] for t in results}, default=str))


if __name__ == "__main__":
    main()
