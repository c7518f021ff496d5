"""Scoring throughput on this machine: batctl's engines against the ways others compute it.

One run, one model, the same batches for every method (ratios are what to read; absolute
times on a shared 2-core box are noise):

- `forward`: a plain no-grad forward pass (per-sample losses): the floor of any method;
- `train step`: forward + backward of the batch loss (a LoRA training step without the optimizer);
- `hooks`: batctl's exact engine (one batched backward, contractions with r per layer);
- `fd`: batctl's finite-difference engine (two no-grad forwards);
- `batch-1 loop`: one backward per sample and a dot product with r, the way DataInf and LESS
  compute per-sample gradients.

Then peak RSS of `batctl score` on a 2,000- and a 20,000-sample pool (default tiny LM, short
texts, so the big pool finishes in about a minute), each in its own process.

    python benchmarks/score_throughput.py [--batches 4] [--skip-rss]

Prints a table and one JSON line. Goals (issue 4): hooks >= 0.9x the training step, fd >= 0.8x
half the forward rate, both >= 1.5x the batch-1 loop; RSS(20k) within 10% of RSS(2k).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not but first one their its new after who they have two been also into "
    "more other than when time most over some such only years three can made many would"
).split()


def text_of(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def best_rate(fn, samples: int, repeats: int = 3) -> float:
    """Samples per second of `fn()` (which handles `samples` samples), best of `repeats`."""
    fn()  # warm-up: allocator, autograd graph caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return samples / best


def engine_rates(workdir: Path, batches: int, batch_size: int, seq: int) -> dict[str, float]:
    from batctl.data import open_pool
    from batctl.influence.engines import make_engine
    from batctl.influence.target import prepare_target
    from batctl.tasks.base import AdapterSettings, TaskSettings
    from batctl.tasks.lm import LMTask
    from batctl.tiny import build_tiny_lm

    model = build_tiny_lm(workdir / "lm-256x4", hidden_size=256, num_layers=4, seed=0)
    task = LMTask(TaskSettings(str(model), max_length=seq))
    task.add_adapter(AdapterSettings(rank=8, targets=("q_proj", "v_proj")), seed=0)
    rng = random.Random(0)
    # ~1 token per character of these short words is conservative; cut to exactly `seq` tokens.
    adaptation = list(
        open_pool([str(write_jsonl(workdir / "a.jsonl", [text_of(rng, 200) for _ in range(16)]))])
    )
    pool = list(
        open_pool(
            [
                str(
                    write_jsonl(
                        workdir / "p.jsonl",
                        [text_of(rng, 200) for _ in range(batches * batch_size)],
                    )
                )
            ]
        )
    )
    target = prepare_target(task, adaptation)
    task.model.eval()
    collated = [
        task.collate(pool[i : i + batch_size], "pool") for i in range(0, len(pool), batch_size)
    ]
    assert all(b["input_ids"].shape[1] == seq for b in collated), "samples must fill --seq tokens"
    n = len(pool)
    hooks, fd = make_engine("hooks", task, target), make_engine("fd", task, target)
    r = {name: target.r[name].float() for name in target.layers}
    params = task.trainable_parameters()

    def forward():
        with torch.no_grad():
            for batch in collated:
                task.per_sample_loss(batch)

    def train_step():
        for batch in collated:
            task.per_sample_loss(batch).mean().backward()
        for p in params.values():
            p.grad = None

    def batch1_loop():
        names = list(params)
        for batch in collated:
            for i in range(batch["input_ids"].shape[0]):
                single = {k: v[i : i + 1] for k, v in batch.items()}
                grads = torch.autograd.grad(
                    task.per_sample_loss(single)[0], [params[k] for k in names]
                )
                sum(
                    torch.dot(g.flatten(), r[k].flatten())
                    for k, g in zip(names, grads, strict=True)
                )

    return {
        "forward": best_rate(forward, n),
        "train step": best_rate(train_step, n),
        "hooks": best_rate(lambda: [hooks.score(b) for b in collated], n),
        "fd": best_rate(lambda: [fd.score(b) for b in collated], n),
        "batch-1 loop": best_rate(batch1_loop, n, repeats=1),
    }


def peak_rss_mib(workdir: Path, n_pool: int) -> float:
    """Peak RSS (MiB) of one `batctl score` process on an `n_pool`-sample pool."""
    rng = random.Random(n_pool)
    root = workdir / f"rss-{n_pool}"
    root.mkdir()
    pool = write_jsonl(root / "pool.jsonl", [text_of(rng, 12) for _ in range(n_pool)])
    data = write_jsonl(root / "a.jsonl", [text_of(rng, 12) for _ in range(8)])
    base = workdir / "lm-tiny"
    batctl = [sys.executable, "-m", "batctl"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if not base.exists():
        subprocess.run([*batctl, "tiny", "lm", str(base)], check=True, capture_output=True)
    subprocess.run(
        [
            *batctl,
            "surrogate",
            "--model",
            str(base),
            "--data",
            str(data),
            "--out",
            str(root / "sur"),
            "--steps",
            "2",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    code = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    args = [
        *batctl,
        "score",
        "--model",
        str(base),
        "--surrogate",
        str(root / "sur"),
        "--data",
        str(data),
        "--pool",
        str(pool),
        "--out",
        str(root / "scores"),
        "--batch-size",
        "64",
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env
    )
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=4, help="pool batches per timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample")
    parser.add_argument("--skip-rss", action="store_true", help="only the engine rates")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batctl-bench-") as tmp:
        workdir = Path(tmp)
        rates = engine_rates(workdir, args.batches, args.batch_size, args.seq)
        rss = {} if args.skip_rss else {n: peak_rss_mib(workdir, n) for n in (2_000, 20_000)}
    goals = {
        "hooks >= 0.9x train step": rates["hooks"] >= 0.9 * rates["train step"],
        "fd >= 0.8x half forward": rates["fd"] >= 0.8 * rates["forward"] / 2,
        "hooks >= 1.5x batch-1 loop": rates["hooks"] >= 1.5 * rates["batch-1 loop"],
        "fd >= 1.5x batch-1 loop": rates["fd"] >= 1.5 * rates["batch-1 loop"],
    }
    if rss:
        goals["RSS(20k) <= 1.1x RSS(2k)"] = rss[20_000] <= 1.1 * rss[2_000]
    print(
        f"tiny LLaMA 4x256, LoRA r=8 on q,v, batch {args.batch_size}, {args.seq} tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'method':<14} {'samples/s':>10} {'x train step':>13}")
    for name, rate in rates.items():
        print(f"{name:<14} {rate:>10.1f} {rate / rates['train step']:>13.2f}")
    for n, mib in rss.items():
        print(f"peak RSS scoring {n:>6} samples: {mib:.0f} MiB")
    for goal, met in goals.items():
        print(f"{'PASS' if met else 'FAIL'}  {goal}")
    print(
        json.dumps(
            {"benchmark": "score_throughput", "rates": rates, "peak_rss_mib": rss, "goals": goals}
        )
    )


if __name__ == "__main__":
    main()
