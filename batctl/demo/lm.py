"""The LM demo world: stdlib docstrings, a tiny LLaMA pretrained on them by batctl.

The target domain (``email``) is split three ways: held-out paragraphs for eval, n adaptation
paragraphs (D_A), and the rest, which go into the pool with every other domain: BAT's premise is
that the pool is the backbone's own pretraining data, so the backbone is pretrained on exactly
the pool. The oracle set is D_A plus the pool's target-domain paragraphs: all the target data
there is, minus the held-out part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from batctl.demo.stdlib import Paragraph, read_corpus
from batctl.demo.world import World, cached_world
from batctl.errors import BatctlError
from batctl.training import warmup_cosine

log = logging.getLogger("batctl.demo")

TARGET = "email"
N_ADAPTATION = 32
N_HELDOUT = 100
POOL_PARTS = 2
MAX_TOKENS = 128
"""Tokens per sequence (BOS + text + EOS): a 300-character English paragraph fits; rare
non-ASCII-heavy ones (the encodings domain) are cut, and counted by the LM task."""

BACKBONE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384}
VOCAB = 1024
PRETRAIN: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_steps": 20,
    "max_steps": None,
}
"""Pretraining recipe (``max_steps`` cuts it short: tests use it)."""
VERSION = 1
"""Bump when the world's recipe changes, so cached worlds built by the old recipe are not used."""

TRAIN_FLAGS = {
    "rank": 8,
    "targets": ("all-linear",),
    "steps": 48,
    "batch_size": 8,
    "lr": 1e-3,
    "warmup_steps": 3,
}
"""Adaptation, chosen as a practitioner who runs BAT would: by 4-fold cross-validation on D_A
alone, each fold trained on its D_A plus the mmr selection made for it at γ 0.5, averaged over
the five dev worlds (`benchmarks/train_recipe.py --with mmr`; steps 8-96 × lr 1e-3 and 3e-3;
CV loss 4.5017 against 4.5082 for the best plain-adaptation recipe, 24 steps at 1e-3, which was
the demo's before and under which no selection moved held-out loss by more than a few
thousandths). The recipe before that (48 steps at 3e-3) overfit D_A."""

ORACLE_FLAGS = {
    "rank": 8,
    "targets": ("all-linear",),
    "steps": 160,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 4,
}
"""θ*: plenty of target data, so it trains longer (it is the reference, not a rival)."""

SURROGATE_FLAGS = {
    "rank": 8,
    "targets": ("all-linear",),
    "steps": 12,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
}
"""Three epochs over D_A: measured on this world's gradients (seed 0), the cosine between the
D_A target gradient and the held-out one's falls from 0.39 (fresh adapter) to 0.14 at 12 steps
and -0.05 at 48 (fitted to D_A: v is then noise), while 12 steps ranks best (AUC 0.69 vs 0.65)."""

SCORE_FLAGS = {"normalize": True}
"""Cosine-style scores: raw r · ∇L(x) puts high-gradient paragraphs of every domain on top (the
top 32 were 34% email; normalised, 66%)."""

RECIPE = {
    "train_flags": TRAIN_FLAGS,
    "oracle_flags": ORACLE_FLAGS,
    "surrogate_flags": SURROGATE_FLAGS,
    "score_flags": SCORE_FLAGS,
    "demo_methods": ("mmr", "bm25"),
}
"""How the demo runs the stages on this world (not part of the world's identity); the demo
compares batctl's default for LMs (mmr) with the strongest cheap baseline (bm25)."""


def record(domain: str, index: int, text: str) -> dict[str, str]:
    """A JSONL record whose key (``id``) carries its domain."""
    return {"id": f"{domain}-{index:05d}", "text": text}


def split(
    corpus: list[Paragraph], seed: int, target_domain: str = TARGET
) -> dict[str, list[dict[str, str]]]:
    """Held-out, adaptation, oracle and pool records (see the module docstring) for the
    ``target_domain`` (any domain of the corpus with enough paragraphs)."""
    rng = random.Random(seed)
    by_domain: dict[str, list[dict[str, str]]] = {}
    for p in corpus:
        rows = by_domain.setdefault(p.domain, [])
        rows.append(record(p.domain, len(rows), p.text))
    target = list(by_domain.get(target_domain, []))
    if len(target) < N_ADAPTATION + N_HELDOUT + N_ADAPTATION:
        raise BatctlError(
            f"the standard library has only {len(target)} {target_domain} docstring paragraphs; the "
            f"LM demo needs {2 * N_ADAPTATION + N_HELDOUT}"
        )
    rng.shuffle(target)
    heldout = target[:N_HELDOUT]
    adaptation = target[N_HELDOUT : N_HELDOUT + N_ADAPTATION]
    in_pool = target[N_HELDOUT + N_ADAPTATION :]
    pool = [r for d, rows in by_domain.items() if d != target_domain for r in rows] + in_pool
    rng.shuffle(pool)
    return {
        "heldout": heldout,
        "adaptation": adaptation,
        "oracle": adaptation + in_pool,
        "pool": pool,
    }


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    """One JSON object per line, UTF-8."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def pretrain(model_dir: Path, texts: list[str], seed: int) -> dict[str, Any]:
    """Build a tiny LLaMA with a tokenizer learned from ``texts`` and train it on them.

    Next-token loss on BOS + text + EOS (truncated to MAX_TOKENS), AdamW, linear warmup then
    cosine decay, PRETRAIN epochs in a seeded order. Saves the model over the random one in
    ``model_dir``. Returns steps, first and last loss (nats/token) and seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from batctl.tasks.lm import quiet_libraries
    from batctl.tiny import _no_progress_bars, build_tiny_lm

    quiet_libraries()
    started = time.monotonic()
    sample = "\n".join(texts[:: max(1, len(texts) // 1500)])  # ~1500 paragraphs: merges in ~10 s
    build_tiny_lm(
        model_dir, seed=seed, vocab_size=VOCAB, max_position_embeddings=128, text=sample, **BACKBONE
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [ids[: MAX_TOKENS - 1] + [eos] for ids in tokenizer(texts).input_ids]

    batch_size = PRETRAIN["batch_size"]
    gen = torch.Generator().manual_seed(seed)
    batches = [  # each epoch a fresh seeded permutation, cut into batches (the last one short)
        chunk.tolist()
        for _ in range(PRETRAIN["epochs"])
        for chunk in torch.randperm(len(encoded), generator=gen).split(batch_size)
    ]
    if PRETRAIN["max_steps"] is not None:
        batches = batches[: PRETRAIN["max_steps"]]
    steps = len(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    warmup = PRETRAIN["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup, steps)
    )
    from batctl.console import progress_bar

    model.train()
    losses = []
    with (
        torch.random.fork_rng(devices=[]),
        progress_bar("pretraining the demo LM", steps, unit="steps") as advance,
    ):
        torch.manual_seed(seed)
        for step in range(steps):
            rows = [encoded[i] for i in batches[step]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad)
            labels = torch.full((len(rows), width), -100)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                labels[i, : len(r)] = ids[i, : len(r)]
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            advance(1, loss=losses[-1])
    model.eval()
    with _no_progress_bars():
        model.save_pretrained(model_dir, safe_serialization=True)
    return {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(time.monotonic() - started, 1),
        "sequences": len(encoded),
    }


def build(work: Path, corpus: list[Paragraph], seed: int, target: str = TARGET) -> World:
    """Write the LM world of ``target`` into ``work`` (data files, pretrained backbone)."""
    parts = split(corpus, seed, target)
    data = work / "data"
    data.mkdir()
    pool_rows = parts["pool"]
    size = math.ceil(len(pool_rows) / POOL_PARTS)
    pool = tuple(
        write_jsonl(data / f"pool-{i:03d}.jsonl", pool_rows[i * size : (i + 1) * size])
        for i in range(POOL_PARTS)
    )
    stats = pretrain(work / "model", [r["text"] for r in pool_rows], seed)
    return World(
        family="lm",
        root=work,
        model=work / "model",
        adaptation=write_jsonl(data / "adaptation.jsonl", parts["adaptation"]),
        heldout=write_jsonl(data / "heldout.jsonl", parts["heldout"]),
        oracle=write_jsonl(data / "oracle.jsonl", parts["oracle"]),
        pool=pool,
        target=target,
        pool_domains=dict(Counter(World.domain_of(r["id"]) for r in pool_rows)),
        data_flags={"max_length": MAX_TOKENS},
        pretraining=stats,
    )


def lm_world(seed: int = 0, cache: Path | None = None, target: str = TARGET) -> tuple[World, bool]:
    """The LM demo world for ``seed`` and ``target`` domain, from the cache or built now (about
    a minute and a half on 2 cores). Each target domain has its own backbone, pretrained on its
    own pool, so that domain's held-out paragraphs are never in pretraining. Returns the world
    and whether it was built now."""
    from batctl import __version__
    from batctl.tiny import _library_versions

    corpus = read_corpus()
    text_hash = hashlib.sha256("\n".join(f"{p.domain}\t{p.text}" for p in corpus).encode())
    params = {
        "family": "lm",
        "recipe": VERSION,
        "seed": seed,
        "recipe_details": {
            "target": target,
            "n": [N_ADAPTATION, N_HELDOUT, POOL_PARTS, MAX_TOKENS, VOCAB],
            "backbone": BACKBONE,
            "pretrain": PRETRAIN,
        },
        "corpus": text_hash.hexdigest(),
        "batctl": __version__,
        "libraries": _library_versions(),
    }
    world, built = cached_world("lm", params, lambda work: build(work, corpus, seed, target), cache)
    return world.with_recipe(RECIPE), built
