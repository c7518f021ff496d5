"""Size and speed of `batctl tiny` backbones (the issue-2 budget: under 5 MB, a forward under 100 ms).

    python benchmarks/tiny_backbones.py

Prints a table and one JSON line: directory sizes, the median of 20 LM forward passes on 1 x 32
tokens, and of 5 two-step 32 x 32 pipeline generations, each after warm-up.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from batctl.tiny import build_tiny_diffusion, build_tiny_lm


def median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        lm_dir, sd_dir = build_tiny_lm(Path(tmp) / "lm"), build_tiny_diffusion(Path(tmp) / "sd")
        model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
        ids = torch.randint(
            0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            lm_s = median_seconds(lambda: model(input_ids=ids), warmup=3, repeats=20)
        pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
        pipe.set_progress_bar_config(disable=True)
        sd_s = median_seconds(
            lambda: pipe(
                "a photo of sks dog",
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
            ),
            warmup=1,
            repeats=5,
        )
        result = {
            "lm_mb": dir_mb(lm_dir),
            "diffusion_mb": dir_mb(sd_dir),
            "lm_forward_ms": lm_s * 1e3,
            "diffusion_2step_ms": sd_s * 1e3,
        }
    print(f"{'backbone':<10} {'MB':>6} {'ms':>8}")
    print(
        f"{'lm':<10} {result['lm_mb']:>6.2f} {result['lm_forward_ms']:>8.1f}  (forward, 1 x 32 tokens)"
    )
    print(
        f"{'diffusion':<10} {result['diffusion_mb']:>6.2f} {result['diffusion_2step_ms']:>8.1f}  (2-step 32 x 32 image)"
    )
    ok = result["lm_mb"] < 5 and result["diffusion_mb"] < 5 and result["lm_forward_ms"] < 100
    print("PASS" if ok else "FAIL", "under 5 MB each, LM forward under 100 ms")
    print(json.dumps({"benchmark": "tiny_backbones", **result, "pass": ok}))


if __name__ == "__main__":
    main()
