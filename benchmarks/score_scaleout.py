"""Scale-out of `batctl score`: throughput of 1 vs 2 processes, and peak memory per token budget.

1. The same one-file pool scored by one process and by `torchrun --nproc_per_node 2` (each
   process one thread, so two processes have twice the compute when the machine has two free
   cores): rows/s of each and the ratio. On a shared machine read the ratio, not the rates.
2. Peak RSS of one `batctl score` process per `--max-batch-tokens` budget (with `--batch-size`
   64), on a pool of mixed lengths, and the rows/s each budget gives: the table a user picks a
   budget from. On a GPU the same flags bound the activation memory of the hooks engine.

    python benchmarks/score_scaleout.py [--rows 1024] [--hidden 256] [--budgets 1024,4096,16384]

Prints two tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not but first one their its new after who they have two been also into"
).split()

RSS_OF_CHILD = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path, rows: int, hidden: int) -> dict[str, Path]:
    """A random LLaMA (4 layers x `hidden`), a surrogate, and a one-file pool of mixed lengths."""
    from batctl.tiny import build_tiny_lm

    rng = random.Random(0)
    model = build_tiny_lm(root / "lm", hidden_size=hidden, num_layers=4, num_heads=4)
    data = write_texts(root / "a.jsonl", [" ".join(rng.choices(WORDS, k=24)) for _ in range(8)])
    lengths = [rng.choice((8, 16, 32, 64, 128, 160)) for _ in range(rows)]
    pool = write_texts(root / "pool.jsonl", [" ".join(rng.choices(WORDS, k=n)) for n in lengths])
    subprocess.run(
        [sys.executable, "-m", "batctl", "surrogate", "--model", str(model), "--data", str(data),
         "--out", str(root / "sur"), "--steps", "2"],
        check=True, capture_output=True,
    )  # fmt: skip
    return {"model": model, "data": data, "pool": pool, "sur": root / "sur"}


def score_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "score", "--model", str(paths["model"]), "--surrogate", str(paths["sur"]),
        "--data", str(paths["data"]), "--pool", str(paths["pool"]), "--out", str(out),
        "--chunk-size", "64", "--batch-size", "64", *extra,
    ]  # fmt: skip


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def throughput(root: Path, paths: dict[str, Path], rows: int) -> dict[str, float]:
    """rows/s of one process and of two torchrun ranks (wall time, model load included)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = timed([sys.executable, "-m", "batctl", *score_args(paths, root / "one")], env)
    two = timed(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "-m", "batctl", *score_args(paths, root / "two")],
        env,
    )  # fmt: skip
    return {"1 process": rows / one, "2 processes": rows / two, "ratio": one / two}


def memory_table(root: Path, paths: dict[str, Path], rows: int, budgets: list[int | None]):
    """Peak RSS (MiB) and rows/s of one scoring process per token budget."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    table = []
    for budget in budgets:
        extra = [] if budget is None else ["--max-batch-tokens", str(budget)]
        out = root / f"mem-{budget}"
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", RSS_OF_CHILD, sys.executable, "-m", "batctl",
             *score_args(paths, out, *extra)],
            check=True, capture_output=True, text=True, env=env,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        table.append(
            {
                "max_batch_tokens": budget,
                "peak_rss_mib": int(done.stdout.strip()) / 1024,
                "rows_per_s": rows / elapsed,
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--budgets", default="512,2048,8192")
    args = parser.parse_args()
    budgets: list[int | None] = [int(b) for b in args.budgets.split(",") if b] + [None]
    with tempfile.TemporaryDirectory(prefix="batctl-scaleout-") as tmp:
        root = Path(tmp)
        paths = prepare(root, args.rows, args.hidden)
        rates = throughput(root, paths, args.rows)
        table = memory_table(root, paths, args.rows, budgets)
    load = os.getloadavg()[0]
    print(f"random LLaMA 4x{args.hidden}, {args.rows} pool rows (8-160 words), load {load:.1f}")
    print(f"{'processes':<12} {'rows/s':>8}")
    for name in ("1 process", "2 processes"):
        print(f"{name:<12} {rates[name]:>8.1f}")
    print(f"ratio 2/1: {rates['ratio']:.2f}")
    print(f"{'--max-batch-tokens':<20} {'peak RSS MiB':>12} {'rows/s':>8}")
    for row in table:
        name = "none (64 samples)" if row["max_batch_tokens"] is None else row["max_batch_tokens"]
        print(f"{name!s:<20} {row['peak_rss_mib']:>12.0f} {row['rows_per_s']:>8.1f}")
    print(
        json.dumps(
            {"benchmark": "score_scaleout", "throughput": rates, "memory": table, "load": load}
        )
    )


if __name__ == "__main__":
    main()
