"""Train recipe: choose adaptation steps and learning rate as a practitioner would, by
cross-validation on the adaptation set alone (no held-out text is read).

For each dev world of the LM demo, D_A (n = 32) is split into --folds folds; for every recipe
(steps × lr) and fold, plain adaptation (`batctl train` without a selection) is trained on the
other folds and `batctl eval` measures its loss on the held-back fold. The recipe with the
lowest cross-validated loss, averaged over the worlds, is the one the demo and
benchmarks/bat_quality.py use. The bare backbone's loss on each fold is reported beside it:
a recipe that ends above it makes the adapter worse than no training.

    python benchmarks/train_recipe.py [--domains logging email ...] [--out runs/train-recipe]

Prints a markdown table (mean CV loss per world and recipe) and writes train_recipe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bat_quality import DEV_DOMAINS, log, stage  # noqa: E402

STEPS = (8, 16, 24, 48)
LRS = (1e-3, 3e-3)
FOLDS = 4


def folds(path: Path, count: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """(train lines, validation lines) per fold: D_A's lines shuffled once, dealt round-robin."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    parts = [lines[i::count] for i in range(count)]
    return [([x for j, p in enumerate(parts) if j != i for x in p], parts[i]) for i in range(count)]


def run_world(
    domain: str, out: Path, recipes: list[tuple[int, float]], count: int
) -> dict[str, Any]:
    from batctl.demo.lm import lm_world

    world, _ = lm_world(0, target=domain)
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": str(world.model), **world.data_flags}
    losses: dict[str, list[float]] = {}
    backbone: list[float] = []
    for fold, (train_lines, val_lines) in enumerate(folds(Path(world.adaptation), count)):
        train_path = out / f"fold{fold}-train.jsonl"
        val_path = out / f"fold{fold}-val.jsonl"
        train_path.write_text("".join(x + "\n" for x in train_lines), encoding="utf-8")
        val_path.write_text("".join(x + "\n" for x in val_lines), encoding="utf-8")
        adapters = []
        for steps, lr in recipes:
            path = out / f"s{steps}-lr{lr:g}-f{fold}"
            flags = {**world.train_flags, "steps": steps, "lr": lr}
            flags["warmup_steps"] = min(flags.get("warmup_steps", 0), max(1, steps // 8))
            stage("train", out=path, data=str(train_path), seed=0, **common, **flags)
            adapters.append(path)
        evaluation = out / f"eval-f{fold}"
        stage("eval", out=evaluation, data=str(val_path), adapter=tuple(adapters), **common)
        rows = json.loads((evaluation / "metrics.json").read_text())["rows"]
        backbone.append(rows["backbone"]["heldout_loss"])
        for path in adapters:
            label = path.name.rsplit("-f", 1)[0]
            losses.setdefault(label, []).append(rows[path.name]["heldout_loss"])
        log(f"{domain}: fold {fold} done")
    return {"backbone": mean(backbone), "cv_loss": {k: mean(v) for k, v in losses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", nargs="+", default=list(DEV_DOMAINS))
    parser.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    parser.add_argument("--folds", type=int, default=FOLDS)
    parser.add_argument("--out", type=Path, default=Path("runs/train-recipe"))
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    recipes = [(s, lr) for s in args.steps for lr in args.lrs]
    results = {}
    for domain in args.domains:
        started = time.monotonic()
        results[domain] = run_world(domain, args.out / f"lm-{domain}", recipes, args.folds)
        log(f"{domain}: done in {time.monotonic() - started:.0f} s")
    labels = list(next(iter(results.values()))["cv_loss"])
    averaged = {label: mean(r["cv_loss"][label] for r in results.values()) for label in labels}
    best = min(averaged, key=averaged.__getitem__)
    lines = [
        f"CV loss on held-back D_A folds ({args.folds} folds, plain adaptation, seed 0)",
        "",
        "| recipe | " + " | ".join(results) + " | mean |",
        "|---" * (len(results) + 2) + "|",
        "| bare backbone | "
        + " | ".join(f"{r['backbone']:.4f}" for r in results.values())
        + f" | {mean(r['backbone'] for r in results.values()):.4f} |",
    ]
    for label in labels:
        mark = " (chosen)" if label == best else ""
        lines.append(
            f"| {label}{mark} | "
            + " | ".join(f"{r['cv_loss'][label]:.4f}" for r in results.values())
            + f" | {averaged[label]:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_recipe.md").write_text(text, encoding="utf-8")
    (args.out / "train_recipe.json").write_text(
        json.dumps({"results": results, "mean": averaged, "chosen": best}, indent=2) + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
