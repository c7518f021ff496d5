"""Peak resident memory of `batctl score` with and without hostile samples (issue 13).

Two pools over the same tiny LM and surrogate:

- clean:   a JSONL part (400 short records) and a tar part (100 short text members);
- hostile: the same, plus one 50 MB JSONL line and one 200 MB tar member.

Each `score` runs in its own process; its peak RSS comes from `os.wait4`. The hostile samples
are larger than the default `--max-sample-mib` (16), so they must be skipped without being read
whole: the goal is a hostile peak within 10% of the clean one. Prints a table and one JSON line.

    python benchmarks/hostile_memory.py [--work DIR] [--line-mb 50] [--member-mb 200]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MB = 1_000_000


def batctl(*args: object) -> tuple[int, float, float]:
    """Run `python -m batctl ARGS`; (exit code, peak RSS in MiB, wall seconds)."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batctl", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(err)
    return code, usage.ru_maxrss / 1024, time.perf_counter() - began  # ru_maxrss is KiB on Linux


def write_pool(root: Path, line_mb: int, member_mb: int) -> list[Path]:
    """The JSONL and tar parts; with line_mb/member_mb > 0, each with its one huge sample."""
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "part-0.jsonl"
    with jsonl.open("w") as fh:
        for i in range(400):
            if line_mb and i == 200:
                fh.write('{"text": "' + "word " * (line_mb * MB // 5) + '"}\n')
            fh.write(json.dumps({"text": f"item {i} is {['red', 'blue'][i % 2]} and round"}) + "\n")
    tar_path = root / "part-1.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(100):
            if member_mb and i == 50:
                big = root / "big.txt"
                with big.open("w") as fh:  # written in pieces: the benchmark stays small too
                    for _ in range(member_mb):
                        fh.write("text " * (MB // 5))
                tar.add(big, arcname="huge.txt")
                big.unlink()
            data = f"sample {i} says hello".encode()
            info = tarfile.TarInfo(f"s{i:04d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [jsonl, tar_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--line-mb", type=int, default=50)
    parser.add_argument("--member-mb", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        lm, data, sur = work / "lm", work / "domain.jsonl", work / "sur"
        code, _, _ = batctl("tiny", "lm", lm)
        assert code == 0
        data.write_text("".join(json.dumps({"text": f"item {i} is red"}) + "\n" for i in range(8)))
        code, _, _ = batctl("surrogate", "--model", lm, "--data", data, "--out", sur,
                            "--steps", "2", "--targets", "all-linear")  # fmt: skip
        assert code == 0
        rows = {}
        for name, sizes in (("clean", (0, 0)), ("hostile", (args.line_mb, args.member_mb))):
            parts = write_pool(work / f"pool-{name}", *sizes)
            pool_args = [a for p in parts for a in ("--pool", p)]
            code, rss, wall = batctl("score", "--model", lm, "--surrogate", sur, "--data", data,
                                     *pool_args, "--out", work / f"scores-{name}")  # fmt: skip
            size = sum(p.stat().st_size for p in parts)
            rows[name] = {"exit": code, "peak_rss_mib": round(rss, 1), "wall_s": round(wall, 1),
                          "pool_mb": round(size / MB, 1)}  # fmt: skip
            for p in parts:
                p.unlink()
    ratio = rows["hostile"]["peak_rss_mib"] / rows["clean"]["peak_rss_mib"]
    print(f"{'pool':<8} {'pool MB':>8} {'exit':>4} {'peak RSS MiB':>13} {'wall s':>7}")
    for name, row in rows.items():
        print(f"{name:<8} {row['pool_mb']:>8} {row['exit']:>4} {row['peak_rss_mib']:>13} "
              f"{row['wall_s']:>7}")  # fmt: skip
    print(f"hostile / clean peak RSS: {ratio:.3f} (goal: <= 1.10)")
    load = os.getloadavg()[0]
    print(json.dumps({"benchmark": "hostile_memory", "rows": rows, "ratio": round(ratio, 4),
                      "goal_met": ratio <= 1.10 and all(r["exit"] == 0 for r in rows.values()),
                      "load_avg_1m": round(load, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
