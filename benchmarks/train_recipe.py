"""Train recipe: choose adaptation steps and learning rate as a practitioner would, by
cross-validation on the adaptation set alone (no held-out text is read).

For each dev world (the LM demo's, n = 32 paragraphs; or with --family digits the diffusion
demo's dev digit, n = 8 images), D_A is split into --folds folds; for every recipe
(steps × lr) and fold, plain adaptation (`batctl train` without a selection) is trained on the
other folds and `batctl eval` measures its loss on the held-back fold. The recipe with the
lowest cross-validated loss, averaged over the worlds, is the one the demo and
benchmarks/bat_quality.py use. The bare backbone's loss on each fold is reported beside it: a
recipe that ends above it makes the adapter worse than no training.

With --with METHOD each fold trains as BAT would: on the fold's D_A plus the backbone samples
METHOD selects for it at γ --gamma, scored against the fold's D_A only (the held-back fold is
never read before its evaluation). METHOD must be one that needs no surrogate.

    python benchmarks/train_recipe.py [--family lm|digits] [--domains logging email ...]
        [--with mmr [--gamma 0.5]] [--steps 8 16 ...] [--lrs 1e-3 ...] [--out runs/train-recipe]

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

from bat_quality import (  # noqa: E402
    DEV_DIGITS,
    DEV_DOMAINS,
    log,
    method_flags,
    open_world,
    reads_surrogate_name,
    score_into,
    stage,
)

STEPS = {"lm": (8, 16, 24, 48), "digits": (40, 80, 160)}
LRS = {"lm": (1e-3, 3e-3), "digits": (1e-3, 3e-3, 1e-2)}
FOLDS = 4


def folds(path: Path, count: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """(train items, validation items) per fold: D_A's items (a JSONL file's lines, or an image
    folder's file names) shuffled once, dealt round-robin."""
    if path.is_dir():
        items = sorted(p.name for p in path.iterdir() if p.is_file())
    else:
        items = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(items)
    parts = [items[i::count] for i in range(count)]
    return [([x for j, p in enumerate(parts) if j != i for x in p], parts[i]) for i in range(count)]


def write_part(source: Path, items: list[str], target: Path) -> Path:
    """D_A's `items` as a dataset of their own at `target`: JSONL lines, or a folder of links to
    the images (`.jsonl` is appended for a file)."""
    if not source.is_dir():
        target = target.with_suffix(".jsonl")
        target.write_text("".join(x + "\n" for x in items), encoding="utf-8")
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in items:
        link = target / name
        if not link.exists():
            link.symlink_to(source / name)
    return target


def fold_selection(world: Any, data: Path, out: Path, method: str, gamma: float) -> Path:
    """The γ selection `method` makes from the world's pool for the adaptation set `data`
    (a cheap method: one that reads no surrogate)."""
    from batctl.selection import value_name

    scores = out.with_name(out.name + "-scores")
    score_into(world, scores, method, data)
    stage("select", out=out, scores=scores, gamma=(str(gamma),), strategy="albat")
    return out / value_name("gamma", gamma)


def run_world(
    family: str,
    domain: str,
    out: Path,
    recipes: list[tuple[int, float]],
    count: int,
    method: str | None = None,
    gamma: float = 0.5,
) -> dict[str, Any]:
    world = open_world(family, domain)
    out.mkdir(parents=True, exist_ok=True)
    common = {"model": str(world.model), **world.data_flags}
    losses: dict[str, list[float]] = {}
    backbone: list[float] = []
    source = Path(world.adaptation)
    for fold, (train_items, val_items) in enumerate(folds(source, count)):
        train_path = write_part(source, train_items, out / f"fold{fold}-train")
        val_path = write_part(source, val_items, out / f"fold{fold}-val")
        adapters = []
        extra: dict[str, Any] = {}
        if method:
            target = out / f"fold{fold}-{method}-g{gamma:g}"
            extra["selection"] = fold_selection(world, train_path, target, method, gamma)
        for steps, lr in recipes:
            path = out / f"s{steps}-lr{lr:g}-f{fold}"
            flags = {**world.train_flags, "steps": steps, "lr": lr}
            flags["warmup_steps"] = min(flags.get("warmup_steps", 0), max(1, steps // 8))
            stage("train", out=path, data=str(train_path), seed=0, **common, **flags, **extra)
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
    parser.add_argument("--family", choices=("lm", "digits"), default="lm")
    parser.add_argument(
        "--domains", nargs="+", help="dev worlds (default: the family's DEV_DOMAINS / DEV_DIGITS)"
    )
    parser.add_argument(
        "--steps", nargs="+", type=int, help="default: 8 16 24 48; digits: 40 80 160"
    )
    parser.add_argument("--lrs", nargs="+", type=float, help="default: 1e-3 3e-3; digits: + 1e-2")
    parser.add_argument("--folds", type=int, default=FOLDS)
    parser.add_argument(
        "--with",
        dest="method",
        help="train every fold with this method's selection (e.g. mmr); default: plain adaptation",
    )
    parser.add_argument("--gamma", type=float, default=0.5, help="the selection's γ with --with")
    parser.add_argument("--out", type=Path, default=Path("runs/train-recipe"))
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    family = args.family
    if args.method:
        from batctl.methods import METHODS

        if method_flags(args.method)["method"] not in METHODS:
            parser.error(f"--with {args.method}: not a method ({', '.join(METHODS)})")
        if reads_surrogate_name(args.method):
            parser.error(f"--with {args.method}: reads a surrogate; give a method that does not")
    domains = args.domains or list(DEV_DIGITS if family == "digits" else DEV_DOMAINS)
    recipes = [(s, lr) for s in args.steps or STEPS[family] for lr in args.lrs or LRS[family]]
    results = {}
    for domain in domains:
        started = time.monotonic()
        results[domain] = run_world(
            family,
            domain,
            args.out / f"{family}-{domain}",
            recipes,
            args.folds,
            args.method,
            args.gamma,
        )
        log(f"{domain}: done in {time.monotonic() - started:.0f} s")
    labels = list(next(iter(results.values()))["cv_loss"])
    averaged = {label: mean(r["cv_loss"][label] for r in results.values()) for label in labels}
    best = min(averaged, key=averaged.__getitem__)
    lines = [
        f"CV loss on held-back D_A folds ({args.folds} folds, "
        + (f"D_A + {args.method} at γ {args.gamma:g}" if args.method else "plain adaptation")
        + ", seed 0)",
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
