"""Pool several bat_quality reports into one comparison: the closing tables of a report (the goal
per case, every method judged by the goal's criteria, the default against each rival pooled over
every case with its bootstrap interval), over the cases of all the reports at once.

    python benchmarks/pool_reports.py REPORT.json[+MORE_SEEDS.json][:OLD=NEW,...] ... [--default mmr]
        [--out benchmarks/results/bat_quality-lm-pooled.md]

Each REPORT is a `bat_quality.json`; `+` joins runs of the same worlds with other training
seeds (their losses are merged: a case's seed pairs are all of them, and the goal's "2 of 3
seeds" becomes two thirds of them). The optional renames give one method one name in every
report: a report written when the default was a benchmark variant names it otherwise (e.g.
`bat_quality-lm.json:mmr=mmr-c256,mmr-c1024=mmr`). A case is named DOMAIN@REPORT (the file's
stem without `bat_quality-`, or for a plain `bat_quality.json` its folder's name), so the same
domain in two worlds stays two cases. Methods: those with a loss for every case, γ and seed.
Prints the markdown; --out writes it and the numbers (same stem, .json).
Nothing is re-run: the reports' held-out losses are all it reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_bat_quality() -> Any:
    """benchmarks/bat_quality.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bat_quality", HERE / "bat_quality.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def parse_report(arg: str) -> tuple[tuple[Path, ...], dict[str, str]]:
    """`PATH[+PATH...][:OLD=NEW,...]` -> (paths, renames). Paths joined by `+` are runs of the
    same worlds with other training seeds (`bat_quality.py --seeds 3 4 5` into another folder):
    one report. Only a tail with an `=` is read as renames, so a path may hold a colon."""
    path, sep, spec = arg.rpartition(":")
    if not sep or "=" not in spec:
        path, spec = arg, ""
    renames = {}
    for pair in filter(None, spec.split(",")):
        old, eq, new = pair.partition("=")
        if not eq or not old or not new:
            raise SystemExit(f"{arg}: a rename is OLD=NEW, got {pair!r}")
        renames[old] = new
    return tuple(Path(p) for p in path.split("+")), renames


def merged_seeds(paths: tuple[Path, ...]) -> dict[str, dict[str, Any]]:
    """The results of runs of the same worlds with disjoint training seeds, as one run's:
    losses together, seeds in order. Refuses other worlds or a seed run twice."""
    runs = [json.loads(p.read_text(encoding="utf-8"))["results"] for p in paths]
    out = {domain: dict(result) for domain, result in runs[0].items()}
    for path, run in zip(paths[1:], runs[1:], strict=True):
        if set(run) != set(out):
            raise SystemExit(
                f"{path}: other worlds ({sorted(run)}) than {paths[0]} ({sorted(out)})"
            )
        for domain, result in run.items():
            twice = set(result["seeds"]) & set(out[domain]["seeds"])
            if twice:
                raise SystemExit(f"{path} ({domain}): seeds {sorted(twice)} are in {paths[0]} too")
            out[domain]["loss"] = {**out[domain]["loss"], **result["loss"]}
            out[domain]["seeds"] = sorted([*out[domain]["seeds"], *result["seeds"]])
    return out


def method_of(label: str) -> str | None:
    """The method of a held-out loss label: METHOD-gG-sS, or none-sS (plain adaptation)."""
    if label.startswith("none-s"):
        return "none"
    method, sep, _ = label.rpartition("-g")
    return method if sep else None


def methods_of(result: dict[str, Any]) -> set[str]:
    """The methods with a held-out loss in `result` (none included)."""
    return {m for m in map(method_of, result["loss"]) if m is not None}


def complete_methods(result: dict[str, Any], label: Any) -> set[str]:
    """The methods of `result` with a held-out loss at every γ and seed; `label(method, γ,
    seed)` is bat_quality's loss label."""
    loss = result["loss"]
    return {
        m
        for m in methods_of(result)
        if all(label(m, g, s) in loss for g in result["gammas"] for s in result["seeds"])
    }


def renamed(result: dict[str, Any], renames: dict[str, str], where: str) -> dict[str, Any]:
    """`result` with its methods renamed in its held-out losses. Refuses (naming `where`) a
    rename of a method the result lacks, of none, or onto a name another method keeps."""
    have = methods_of(result)
    kept = have - set(renames)
    for old, new in renames.items():
        if old == "none" or old not in have:
            raise SystemExit(f"{where}: cannot rename {old!r}: its methods are {sorted(have)}")
        if new in kept or list(renames.values()).count(new) > 1:
            raise SystemExit(f"{where}: {old}={new} would merge two methods' losses")
    loss = {}
    for key, value in result["loss"].items():
        method = method_of(key)
        if method in renames:
            key = renames[method] + key[len(method) :]
        loss[key] = value
    return {**result, "loss": loss}


def report_name(path: Path) -> str:
    """How a report's cases are suffixed: its file's stem without `bat_quality-`, or its
    folder's name for a plain `bat_quality.json` (what bat_quality writes under --out)."""
    if path.stem == "bat_quality":
        return path.parent.name
    return path.stem.removeprefix("bat_quality-")


def pool_results(
    reports: list[tuple[tuple[Path, ...], dict[str, str]]],
) -> dict[str, dict[str, Any]]:
    """Every case of every report (its runs' seeds merged), renamed, keyed DOMAIN@REPORT (the
    report's first file names it)."""
    results: dict[str, dict[str, Any]] = {}
    names = [report_name(paths[0]) for paths, _ in reports]
    if len(set(names)) < len(names):
        raise SystemExit(f"two reports share a name ({', '.join(names)}): rename a file")
    for (paths, renames), name in zip(reports, names, strict=True):
        for domain, result in merged_seeds(paths).items():
            results[f"{domain}@{name}"] = renamed(result, renames, f"{paths[0]} ({domain})")
    return results


def pooled_report(
    bq: Any, results: dict[str, dict[str, Any]], default: str
) -> tuple[list[str], dict[str, Any]]:
    """bat_quality's closing tables (markdown lines, JSON parts) over every case of `results`,
    for the methods every world has at every γ and seed. Refuses an empty pool, a default some
    world lacks and worlds of two families."""
    if not results:
        raise SystemExit("no cases: the reports hold no results")
    families = {r.get("family", "lm") for r in results.values()}
    if len(families) > 1:
        raise SystemExit(f"the reports mix families ({', '.join(sorted(families))})")
    common = set.intersection(*(complete_methods(r, bq.label) for r in results.values()))
    if default not in common:
        raise SystemExit(f"--default {default}: not in every report (they share {sorted(common)})")
    return bq.summarize(results, sorted(common), default, families != {"lm"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "reports", nargs="+", help="bat_quality.json[+more seeds.json][:OLD=NEW,...]"
    )
    parser.add_argument("--default", default="mmr")
    parser.add_argument("--out", type=Path, help="write the markdown here and the JSON beside it")
    args = parser.parse_args()
    results = pool_results([parse_report(a) for a in args.reports])
    lines, summary = pooled_report(load_bat_quality(), results, args.default)
    text = (
        f"# {sum(len(r['gammas']) for r in results.values())} cases ({len(results)} worlds) "
        f"pooled from {', '.join(args.reports)} (PATH:OLD=NEW renames a method)\n\n"
        + "\n".join(lines)
        + "\n"
    )
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        args.out.with_suffix(".json").write_text(
            json.dumps({"reports": args.reports, **summary}, indent=2, default=str) + "\n"
        )
    print(text)


if __name__ == "__main__":
    main()
