"""Pool several bat_quality reports into one comparison: the closing tables of a report (the goal
per case, every method judged by the goal's criteria, the default against each rival pooled over
every case with its bootstrap interval), over the cases of all the reports at once.

    python benchmarks/pool_reports.py REPORT.json[:OLD=NEW,...] ... [--default mmr]
        [--out benchmarks/results/bat_quality-lm-pooled.md]

Each REPORT is a `bat_quality.json`. The optional renames give one method one name in every
report: a report written when the default was a benchmark variant names it otherwise (e.g.
`bat_quality-lm.json:mmr=mmr-c256,mmr-c1024=mmr`). A case is named DOMAIN@REPORT (the file's
stem without `bat_quality-`, or for a plain `bat_quality.json` its folder's name), so the same
domain in two worlds stays two cases. Methods: those every report has. Prints the markdown; --out writes it and the numbers (same stem, .json).
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


def parse_report(arg: str) -> tuple[Path, dict[str, str]]:
    """`PATH[:OLD=NEW,...]` -> (path, renames)."""
    path, _, spec = arg.partition(":")
    renames = {}
    for pair in filter(None, spec.split(",")):
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise SystemExit(f"{arg}: a rename is OLD=NEW, got {pair!r}")
        renames[old] = new
    return Path(path), renames


def renamed(result: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """`result` with its methods renamed in its held-out losses (labels METHOD-gG-sS)."""
    loss = {}
    for key, value in result["loss"].items():
        method, sep, rest = key.rpartition("-g")
        if sep and method in renames:
            key = f"{renames[method]}-g{rest}"
        loss[key] = value
    return {**result, "loss": loss}


def methods_of(result: dict[str, Any]) -> set[str]:
    """The methods with a held-out loss in `result` (none included)."""
    names = {"none"} if any(k.startswith("none-s") for k in result["loss"]) else set()
    return names | {k.rpartition("-g")[0] for k in result["loss"] if not k.startswith("none-s")}


def report_name(path: Path) -> str:
    """How a report's cases are suffixed: its file's stem without `bat_quality-`, or its
    folder's name for a plain `bat_quality.json` (what bat_quality writes under --out)."""
    if path.stem == "bat_quality":
        return path.parent.name
    return path.stem.removeprefix("bat_quality-")


def pool_results(reports: list[tuple[Path, dict[str, str]]]) -> dict[str, dict[str, Any]]:
    """Every case of every report, renamed, keyed DOMAIN@REPORT."""
    results: dict[str, dict[str, Any]] = {}
    names = [report_name(path) for path, _ in reports]
    if len(set(names)) < len(names):
        raise SystemExit(f"two reports share a name ({', '.join(names)}): rename a file")
    for (path, renames), name in zip(reports, names, strict=True):
        for domain, result in json.loads(path.read_text(encoding="utf-8"))["results"].items():
            results[f"{domain}@{name}"] = renamed(result, renames)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="bat_quality.json[:OLD=NEW,...]")
    parser.add_argument("--default", default="mmr")
    parser.add_argument("--out", type=Path, help="write the markdown here and the JSON beside it")
    args = parser.parse_args()
    bq = load_bat_quality()
    results = pool_results([parse_report(a) for a in args.reports])
    common = set.intersection(*(methods_of(r) for r in results.values()))
    if args.default not in common:
        raise SystemExit(
            f"--default {args.default}: not in every report (they share {sorted(common)})"
        )
    digits = any(r.get("family") == "digits" for r in results.values())
    methods = sorted(common)
    lines, summary = bq.summarize(results, methods, args.default, digits)
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
