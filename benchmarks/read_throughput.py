"""Read throughput of batctl's pool reader against a plain webdataset loop, on the same tar.

    python benchmarks/read_throughput.py                       # 10,000 samples of 64x64 JPEGs
    python benchmarks/read_throughput.py --samples 2000 --size 128 --repeats 5
    python benchmarks/read_throughput.py --tar laion-000.tar   # an existing shard
    python benchmarks/read_throughput.py --profile             # cProfile of batctl's passes

Two modes, both measured in one run on one file, alternating the two readers, repeated, best
time kept: ``decode`` (batctl ``decode=True`` vs ``WebDataset(...).decode("pil")``: images
decoded to RGB PIL, text and json decoded) and ``raw`` (batctl ``decode=False`` vs the bytes
``WebDataset`` yields).  Prints a table and one JSON line; exits 1 when a ratio
batctl/webdataset is below ``--min-ratio`` (0.8).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_tar(path: Path, samples: int, size: int, seed: int = 0) -> None:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["a", "photo", "of", "the", "red", "dog", "on", "beach", "painting", "city", "night"]
    pyrng = random.Random(seed)
    with wds.TarWriter(str(path)) as writer:
        for i in range(samples):
            # smooth random image: a small noise grid upsampled, so JPEG sizes are realistic
            grid = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(grid).resize((size, size), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            caption = " ".join(pyrng.choice(words) for _ in range(pyrng.randint(4, 16)))
            meta = {
                "url": f"https://example.com/{i}.jpg",
                "caption": caption,
                "width": size,
                "height": size,
                "similarity": pyrng.random(),
            }
            writer.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": buf.getvalue(),
                    "txt": caption,
                    "json": json.dumps(meta),
                }
            )


def run_batctl(path: str, decode: bool) -> int:
    from batctl.data import open_pool

    n = 0
    for _sample in open_pool([path], decode=decode):
        n += 1
    return n


def run_webdataset(path: str, decode: bool) -> int:
    import webdataset as wds

    ds = wds.WebDataset(path, shardshuffle=False, empty_check=False)
    if decode:
        ds = ds.decode("pil")
    n = 0
    for _sample in ds:
        n += 1
    return n


def timed(fn, path: str, decode: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(path, decode)
    return time.perf_counter() - t0, n


def profile(path: str, decode: bool, top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    run_batctl(path, decode)
    prof.disable()
    print(f"\n--- cProfile: batctl decode={decode} (top {top} by tottime) ---")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--tar", type=Path, help="use this tar instead of writing one")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-ratio", type=float, default=0.8)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of batctl's passes")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", module="webdataset")
    with tempfile.TemporaryDirectory(prefix="batctl-bench-") as tmp:
        if args.tar is not None:
            path = str(args.tar)
        else:
            path = os.path.join(tmp, "bench.tar")
            t0 = time.perf_counter()
            write_tar(Path(path), args.samples, args.size)
            print(
                f"wrote {path}: {args.samples} samples of {args.size}x{args.size} JPEG + txt + json "
                f"({os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )

        # warm the page cache and imports once
        run_batctl(path, False)
        run_webdataset(path, False)

        best: dict[tuple[str, str], float] = {}
        counts: dict[tuple[str, str], int] = {}
        for _ in range(args.repeats):
            for mode, decode in (("decode", True), ("raw", False)):
                for reader, fn in (("batctl", run_batctl), ("webdataset", run_webdataset)):
                    dt, n = timed(fn, path, decode)
                    k = (mode, reader)
                    best[k] = min(best.get(k, float("inf")), dt)
                    counts[k] = n

        rows = []
        ok = True
        for mode in ("decode", "raw"):
            nb, nw = counts[(mode, "batctl")], counts[(mode, "webdataset")]
            rb, rw = nb / best[(mode, "batctl")], nw / best[(mode, "webdataset")]
            ratio = rb / rw
            passed = ratio >= args.min_ratio and nb == nw
            ok &= passed
            rows.append(
                {
                    "mode": mode,
                    "samples": nb,
                    "batctl_per_s": round(rb, 1),
                    "webdataset_per_s": round(rw, 1),
                    "ratio": round(ratio, 3),
                    "pass": passed,
                    "webdataset_samples": nw,
                }
            )

        print(
            f"{'mode':<8} {'samples':>8} {'batctl/s':>11} {'webdataset/s':>13} {'ratio':>7}  result"
        )
        for r in rows:
            note = "" if r["samples"] == r["webdataset_samples"] else "  (sample counts differ!)"
            print(
                f"{r['mode']:<8} {r['samples']:>8} {r['batctl_per_s']:>11.0f} "
                f"{r['webdataset_per_s']:>13.0f} {r['ratio']:>7.2f}  "
                f"{'PASS' if r['pass'] else 'FAIL'}{note}"
            )
        print(
            json.dumps(
                {
                    "benchmark": "read_throughput",
                    "tar": os.path.basename(path),
                    "size": args.size,
                    "repeats": args.repeats,
                    "min_ratio": args.min_ratio,
                    "results": rows,
                }
            )
        )
        if args.profile:
            profile(path, True, args.top)
            profile(path, False, args.top)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
