"""Start-up time of the commands a Makefile calls over and over, next to `python -c pass`.

Wall time (best, median) and CPU time (median, user + sys of the child: what a busy machine
barely changes) of `--repeats` runs each (after one warm-up run, so all read from the
page cache), as fresh processes:

- `python -c pass`: the interpreter alone, the floor;
- `batctl --help`;
- `batctl info RUN`: a finished score directory;
- `batctl select` up to date: the same selection asked twice;
- `batctl surrogate` up to date: the stage that trains, asked twice (its first run trains a few
  steps of a tiny LM, not timed).

The four batctl rows also record which heavy modules each imported (torch, transformers,
diffusers, peft): none, by design (DESIGN §2).

    python benchmarks/startup.py [--repeats 5]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "tiny-lm" / "data"
HEAVY = ("torch", "transformers", "diffusers", "peft", "pydantic")
PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['batctl', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('batctl', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
)


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, its stderr). CPU time barely depends on what
    else the machine runs; wall time does."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return seconds, cpu, proc.stderr


def batctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "batctl", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run(batctl("tiny", "lm", str(root / "model")), env)
        surrogate = ["surrogate", "--model", str(root / "model"), "--data"]
        surrogate += [str(DATA / "domain.jsonl"), "--out", str(root / "sur"), "--steps", "2"]
        run(batctl(*surrogate), env)
        score = ["score", "--model", str(root / "model"), "--surrogate", str(root / "sur")]
        score += ["--data", str(DATA / "domain.jsonl"), "--pool", str(DATA / "pool-000.jsonl")]
        run(batctl(*score, "--out", str(root / "scores")), env)
        select = ["select", "--scores", str(root / "scores"), "--gamma", "0.5"]
        select += ["--out", str(root / "sel")]
        run(batctl(*select), env)
        cases = {
            "python -c pass": ([sys.executable, "-c", "pass"], False),
            "batctl --help": (["--help"], True),
            "batctl info RUN": (["info", str(root / "scores")], True),
            "batctl select (up to date)": (select, True),
            "batctl surrogate (up to date)": (surrogate, True),
        }
        rows = []
        for name, (argv, is_batctl) in cases.items():
            argv = [sys.executable, "-c", PROBE, *argv] if is_batctl else argv
            run(argv, env)  # warm-up
            times, cpus, heavy = [], [], "-"
            for _ in range(args.repeats):
                seconds, cpu, err = run(argv, env)
                times.append(seconds)
                cpus.append(cpu)
                if is_batctl:
                    heavy = err.rsplit("HEAVY ", 1)[-1].strip()
            rows.append(
                {
                    "command": name,
                    "best_s": round(min(times), 3),
                    "median_s": round(statistics.median(times), 3),
                    "median_cpu_s": round(statistics.median(cpus), 3),
                    "heavy_imports": heavy,
                }
            )
    load = os.getloadavg()[0]
    floor = rows[0]["median_s"]
    print(f"start-up, {args.repeats} runs each, load average {load:.2f}")
    cpu_floor = rows[0]["median_cpu_s"]
    print(
        f"{'command':32} {'best s':>8} {'median s':>9} {'x pass':>7} {'cpu s':>7} {'x pass':>7}"
        "  heavy imports"
    )
    for row in rows:
        ratio = row["median_s"] / floor if floor else float("nan")
        cpu_ratio = row["median_cpu_s"] / cpu_floor if cpu_floor else float("nan")
        print(
            f"{row['command']:32} {row['best_s']:8.3f} {row['median_s']:9.3f} {ratio:7.1f} "
            f"{row['median_cpu_s']:7.3f} {cpu_ratio:7.1f}  {row['heavy_imports']}"
        )
    print(json.dumps({"benchmark": "startup", "load_average": load, "rows": rows}))


if __name__ == "__main__":
    main()
