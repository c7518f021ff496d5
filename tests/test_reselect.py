"""The ALBAT loop (`train --reselect-every`, batctl.reselect): greedy re-selection against a hand
computation with `prop2`, both sides against a dense float64 solve, the static run bit for bit
when the condition always holds, the score-store candidate source, and the diffusion family."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from batctl import prop2
from batctl.artifacts import describe_model, open_output
from batctl.reselect import _sides_with_one_more, greedy_order, reordered
from batctl.samples import load_samples
from batctl.tasks.base import TaskSettings
from batctl.tasks.lm import LMTask
from batctl.tiny import build_tiny_diffusion, build_tiny_lm

from .lm_fixtures import color_records, mixed_pool_lines, write_jsonl
from .test_select_prop2 import brute_force_grads, dense_side

# ------------------------------------------------------------------------------ the math


def synthetic(n: int, p: int, dims: dict[str, int], seed: int, c: float = 0.1) -> prop2.Grams:
    g = torch.Generator().manual_seed(seed)
    grams = {}
    for name, d in dims.items():
        G = torch.randn(n + p, d, generator=g, dtype=torch.float64)
        G[n:] *= torch.rand(p, 1, generator=g, dtype=torch.float64) * 3  # pool norms vary
        grams[name] = G @ G.T
    return prop2.Grams(grams, dims, n, torch.ones(p, dtype=torch.bool), [], c)


def hand_greedy(grams: prop2.Grams, k: int) -> list[int]:
    """Greedy smallest combined Score_bat, one `prop2.report` per trial set, ties to the first."""
    n, finite = grams.n, int(grams.pool_finite.sum())
    chosen: list[int] = []
    for _ in range(min(k, finite)):
        best = None
        for p in range(finite):
            if p in chosen:
                continue
            index = list(range(n)) + [n + q for q in [*chosen, p]]
            sub = prop2.Grams(
                {name: K[index][:, index] for name, K in grams.grams.items()},
                grams.dims,
                n,
                torch.ones(len(chosen) + 1, dtype=torch.bool),
                grams.excluded,
                grams.c,
            )
            bat = prop2.report(sub, len(chosen) + 1)["bat"]
            if best is None or bat < best[0]:
                best = (bat, p)
        chosen.append(best[1])
    return chosen


@pytest.mark.parametrize(("n", "p", "k", "seed"), [(3, 8, 3, 0), (5, 12, 4, 1), (2, 5, 5, 2)])
def test_greedy_equals_the_greedy_by_hand_with_prop2(n, p, k, seed):
    grams = synthetic(n, p, {"a": 7, "b": 30, "dead": 4}, seed)
    grams.excluded.append("dead")
    assert greedy_order(grams, k) == hand_greedy(grams, k)
    grams.pool_finite[1] = False  # one pool row without finite gradients: one fewer to pick from
    for name, K in grams.grams.items():
        keep = [i for i in range(n + p) if i != n + 1]
        grams.grams[name] = K[keep][:, keep]
    assert len(greedy_order(grams, p)) == p - 1


def test_one_more_sample_side_equals_newton_side():
    grams = synthetic(4, 6, {"w": 9}, seed=3, c=0.5)
    K = grams.grams["w"]
    sides = _sides_with_one_more(K, 4, [2, 0], torch.tensor([1, 3, 4, 5]), 9, 0.5)
    for side, r in zip(sides.tolist(), [1, 3, 4, 5], strict=True):
        index = [0, 1, 2, 3, 4 + 2, 4 + 0, 4 + r]
        assert side == pytest.approx(prop2.newton_side(K[index][:, index], 9, 0.5)[0], rel=1e-12)
    report = prop2.report(reordered(grams, [5, 2]), 2)
    index = [0, 1, 2, 3, 9, 6]
    assert report["bat"] == pytest.approx(prop2.newton_side(K[index][:, index], 9, 0.5)[0])


def test_k_one_greedy_is_the_exhaustive_optimum():
    grams = synthetic(3, 10, {"a": 6, "b": 11}, seed=4)
    best = min(range(10), key=lambda q: prop2.report(reordered(grams, [q]), 1)["bat"])
    assert greedy_order(grams, 1) == [best]


# ------------------------------------------------------------------------------ the tiny LM

REP = [{"text": "zzz " * (40 + i)} for i in range(6)]
"""One token over and over: every sample pulls the adapter the same way, far from D_A's answers,
so D_A plus these has a much longer damped Newton step than D_A alone (Proposition 2 fails)."""
SALAD_WORDS = "alpha beta gamma delta river stone".split()
SALAD = [
    {"text": " ".join(random.Random(i).choice(SALAD_WORDS) for _ in range(30))} for i in range(6)
]


def selection_dir(path, model, groups):
    """A select output whose samples.tar holds `groups` [(key prefix, records)], via TarWriter."""
    with open_output(
        path, stage="select", params={}, inputs={"model": describe_model(model)}
    ) as out:
        with wds.TarWriter(str(out.work / "samples.tar")) as sink:
            for prefix, records in groups:
                for i, record in enumerate(records):
                    sink.write(
                        {"__key__": f"{prefix}-{i:03d}", "json": json.dumps(record).encode()}
                    )
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from typer.testing import CliRunner

    from batctl.cli import app

    root = tmp_path_factory.mktemp("reselect")
    lm = build_tiny_lm(root / "lm", seed=0)
    domain = write_jsonl(root / "domain.jsonl", color_records(6, seed=1))
    records = [json.loads(line) for line in domain.read_text().splitlines()]
    # The question without its answer: the loss sits on EOS alone.
    empty = [{"instruction": r["instruction"], "input": "", "output": ""} for r in records]
    result = CliRunner().invoke(
        app,
        [str(a) for a in ["surrogate", "--model", lm, "--data", domain, "--out", root / "sur",
                          "--steps", "8", "--lr", "1e-2", "--targets", "all-linear"]],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return {
        "root": root,
        "lm": lm,
        "domain": domain,
        "sur": root / "sur",
        "rep": selection_dir(root / "init-rep", lm, [("rep", REP[:4])]),
        "salad": selection_dir(root / "init-salad", lm, [("salad", SALAD[:4])]),
        "candidates": selection_dir(
            root / "cands", lm, [("rep", REP), ("salad", SALAD), ("empty", empty)]
        ),
    }


def train(cli, world, out, selection, *extra):
    result = cli(
        "train", "--model", world["lm"], "--data", world["domain"], "--selection", selection,
        "--out", out, "--steps", "5", "--lr", "1e-2", "--targets", "all-linear",
        "--init", "surrogate", "--surrogate", world["sur"], "--json", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def grads_at(world, adapter, samples, role):
    """Brute-force per-sample gradients (float64) at the adapter `adapter`."""
    return brute_force_grads({"lm": world["lm"], "sur": adapter}, samples, role)


def assert_sides_equal_dense(record, a_grads, s_grads, c):
    """Both sides of a reselect.jsonl record against H = GᵀG/N + λI solved densely (float64)."""
    sq_bat = sq_a = 0.0
    for layer, g_a in a_grads.items():
        bat = dense_side(torch.cat([g_a, s_grads[layer]]), c)
        ada = dense_side(g_a, c)
        got = record["layers"][layer]
        assert got["bat"] == pytest.approx(bat, rel=1e-5, abs=1e-9), layer
        assert got["adaptation"] == pytest.approx(ada, rel=1e-5, abs=1e-9), layer
        if layer not in record["excluded_layers"]:
            sq_bat, sq_a = sq_bat + bat**2, sq_a + ada**2
    assert record["bat"] == pytest.approx(math.sqrt(sq_bat), rel=1e-5)
    assert record["adaptation"] == pytest.approx(math.sqrt(sq_a), rel=1e-5)
    assert record["holds"] == (math.sqrt(sq_bat) <= math.sqrt(sq_a))


def test_a_failing_check_reselects_what_prop2_picks_by_hand(cli, world, tmp_path):
    out = tmp_path / "dyn"
    summary = train(
        cli, world, out, world["rep"], "--reselect-every", "2", "--candidates",
        world["candidates"], "--damping", "1", "--save-every", "2",
    )  # fmt: skip
    history = [json.loads(line) for line in (out / "reselect.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    first = history[0]
    assert not first["holds"] and first["bat"] > 2 * first["adaptation"]  # by construction
    assert first["selection_size"] == 4 and first["candidates"] == 18

    # by hand, at the parameters of that check (the step-2 checkpoint)
    adaptation = load_samples(str(world["domain"]), flag="--data")
    candidates = load_samples(str(world["candidates"] / "samples.tar"), flag="c")
    rep = load_samples(str(world["rep"] / "samples.tar"), flag="s")
    checkpoint = out / "checkpoints" / "step-2"
    a_grads = grads_at(world, checkpoint, adaptation, "adaptation")
    s_grads = grads_at(world, checkpoint, rep, "pool")
    assert_sides_equal_dense(first, a_grads, s_grads, 1.0)
    task = LMTask(TaskSettings(model=str(world["lm"])))
    task.load_adapter(checkpoint, trainable=True)
    grams = prop2.gradient_grams(task, adaptation, candidates, 1.0)
    picked = [candidates[p] for p in hand_greedy(grams, 4)]
    by_key = {s.key: s for s in candidates}
    old = {s.key for s in rep}
    assert first["added"] == [s.key for s in picked if s.key not in old]
    assert first["dropped"] == [s.key for s in rep if s.key not in {p.key for p in picked}]
    assert first["action"] == "reselect" and first["new_holds"] and first["new_selection_size"] == 4
    p_grads = grads_at(world, checkpoint, picked, "pool")
    bat = math.sqrt(
        sum(
            dense_side(torch.cat([g, p_grads[layer]]), 1.0) ** 2
            for layer, g in a_grads.items()
            if layer not in first["excluded_layers"]
        )
    )
    assert first["new_bat"] == pytest.approx(bat, rel=1e-5)

    # the second check is made on what the first one chose
    second = history[1]
    assert second["selection_size"] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    final = manifest["reselect"]["final_keys"]
    expected = [s.key for s in picked]
    if second["action"] == "reselect":
        expected = [k for k in expected if k not in second["dropped"]] + second["added"]
    assert sorted(final) == sorted(expected) and all(k in by_key for k in final)
    assert manifest["reselect"]["checks"] == 2 and summary["reselect"]["reselections"] >= 1
    assert (out / "reselect.png").is_file()
    timing = [json.loads(line) for line in (out / "reselect-timing.jsonl").read_text().splitlines()]
    assert [t["step"] for t in timing] == [2, 4] and all(t["seconds"] > 0 for t in timing)

    # same seed, same inputs: the same history and adapter, byte for byte
    again = tmp_path / "again"
    train(
        cli, world, again, world["rep"], "--reselect-every", "2", "--candidates",
        world["candidates"], "--damping", "1",
    )  # fmt: skip
    for name in ("reselect.jsonl", "adapter_model.safetensors", "log.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_a_check_that_always_holds_trains_bit_for_bit_like_static(cli, world, tmp_path):
    static, dynamic = tmp_path / "static", tmp_path / "dynamic"
    train(cli, world, static, world["salad"], "--steps", "8")
    summary = train(
        cli, world, dynamic, world["salad"], "--steps", "8", "--reselect-every", "2",
        "--candidates", world["candidates"], "--damping", "300",
    )  # fmt: skip
    history = [json.loads(line) for line in (dynamic / "reselect.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6]  # none after the last step
    assert all(h["holds"] and h["action"] == "continue" for h in history)
    assert summary["reselect"]["failed"] == 0
    for name in ("adapter_model.safetensors", "log.jsonl"):
        assert (dynamic / name).read_bytes() == (static / name).read_bytes(), name
    manifest = json.loads((dynamic / "manifest.json").read_text())
    assert manifest["reselect"]["final_keys"] == [f"salad-{i:03d}" for i in range(4)]


def test_candidates_from_a_score_store(cli, world, tmp_path):
    root = world["root"]
    pool = root / "pool.jsonl"
    pool.write_text("\n".join(mixed_pool_lines(16, 10, np.random.default_rng(0), 8)) + "\n")
    common = ["--model", world["lm"], "--data", world["domain"]]
    scored = cli(
        "score", "--method", "influence", *common, "--surrogate", world["sur"], "--pool", pool, "--out", tmp_path / "scores",
        "--chunk-size", "8", "--batch-size", "4",
    )  # fmt: skip
    assert scored.exit_code == 0, scored.stderr
    for value in ("--gamma", "0.75"), ("--count", "5"):
        selected = cli(
            "select", "--scores", tmp_path / "scores", *value, "--out", tmp_path / value[0]
        )
        assert selected.exit_code == 0, selected.stderr
    initial = tmp_path / "--gamma" / "gamma-0.75"
    summary = train(
        cli, world, tmp_path / "bat", initial, "--reselect-every", "2",
        "--scores", tmp_path / "scores", "--candidate-count", "5",
    )  # fmt: skip
    assert summary["reselect"]["candidates"] == 5 and summary["reselect"]["count"] == 2
    assert summary["reselect"]["damping"] == 0.1  # the score run's
    top5 = json.loads((tmp_path / "--count" / "count-5" / "selection.json").read_text())
    top5 = [c["key"] for c in top5["chosen"]]
    current = [c["key"] for c in json.loads((initial / "selection.json").read_text())["chosen"]]
    history = [
        json.loads(line) for line in (tmp_path / "bat" / "reselect.jsonl").read_text().splitlines()
    ]
    assert len(history) == 2
    for h in history:
        assert h["candidates"] == 5
        assert set(h["added"]) <= set(top5) and set(h["dropped"]) <= set(current)
    final = json.loads((tmp_path / "bat" / "manifest.json").read_text())["reselect"]["final_keys"]
    assert sorted(final) == sorted(walk(current, history)) and len(final) in (0, 2)


def walk(keys: list[str], history: list[dict]) -> list[str]:
    """The selection after every check of `history`, from its added and dropped keys."""
    for h in history:
        assert h["selection_size"] == len(keys)
        keys = [k for k in keys if k not in h["dropped"]] + h["added"]
        assert h["action"] not in ("fallback", "stay-adaptation") or keys == []
    return keys


def test_reselect_flags_are_checked_up_front(cli, world, tmp_path):
    base = ["train", "--model", world["lm"], "--data", world["domain"], "--out", tmp_path / "o"]
    result = cli(*base, "--reselect-every", "2", "--candidate-count", "0")
    assert result.exit_code == 2
    for message in (
        "--reselect-every needs --selection",
        "--reselect-every needs one candidate source",
        "--candidate-count must be >= 1",
    ):
        assert message in result.stderr
    result = cli(*base, "--scores", tmp_path, "--damping", "-1")
    assert result.exit_code == 2
    assert "--scores is only used with --reselect-every" in result.stderr
    assert "--damping must be a finite number > 0" in result.stderr
    empty = selection_dir(tmp_path / "empty", world["lm"], [])
    result = cli(
        *base, "--selection", empty, "--reselect-every", "1", "--candidates", world["candidates"]
    )
    assert result.exit_code == 1 and "is empty (plain adaptation)" in result.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ diffusion


def test_the_loop_is_family_blind_on_a_tiny_stable_diffusion(cli, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "instance").mkdir()
    for i in range(3):
        pixels = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
        pixels[..., 0] += 200
        Image.fromarray(pixels).save(tmp_path / "instance" / f"dog{i}.png")
    with wds.TarWriter(str(tmp_path / "cands.tar")) as sink:
        for i in range(5):
            pixels = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
            pixels[..., i % 3] += 200
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            sink.write({"__key__": f"c{i}", "png": buf.getvalue(), "txt": b"a square"})
    sd = build_tiny_diffusion(tmp_path / "sd", seed=0)
    candidates = tmp_path / "cands"
    with open_output(
        candidates, stage="select", params={}, inputs={"model": describe_model(sd)}
    ) as out:
        (out.work / "samples.tar").write_bytes((tmp_path / "cands.tar").read_bytes())
    initial = tmp_path / "init"
    with open_output(
        initial, stage="select", params={}, inputs={"model": describe_model(sd)}
    ) as out:
        with wds.TarWriter(str(out.work / "samples.tar")) as sink:
            for sample in wds.WebDataset(str(tmp_path / "cands.tar"), shardshuffle=False):
                if sample["__key__"] in ("c3", "c4"):
                    sink.write(
                        {
                            k: v
                            for k, v in sample.items()
                            if not k.startswith("__") or k == "__key__"
                        }
                    )
    common = [
        "--model",
        sd,
        "--data",
        tmp_path / "instance",
        "--instance-prompt",
        "a photo of sks dog",
    ]
    result = cli("surrogate", *common, "--out", tmp_path / "sur", "--steps", "2", "--lr", "1e-3")
    assert result.exit_code == 0, result.stderr
    result = cli(
        "train", *common, "--selection", initial, "--out", tmp_path / "bat", "--steps", "3",
        "--reselect-every", "1", "--candidates", candidates, "--init", "surrogate",
        "--surrogate", tmp_path / "sur", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    history = [
        json.loads(line) for line in (tmp_path / "bat" / "reselect.jsonl").read_text().splitlines()
    ]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert math.isfinite(h["bat"]) and math.isfinite(h["adaptation"]) and h["layers"]
        assert h["action"] in ("continue", "reselect", "fallback", "stay-adaptation")
    # the first check fails here, so the candidates' gradients were taken and the greedy ran
    first = history[0]
    assert not first["holds"] and first["candidates"] == 5 and first["new_bat"] > 0
    final = json.loads((tmp_path / "bat" / "manifest.json").read_text())["reselect"]["final_keys"]
    assert sorted(final) == sorted(walk(["c3", "c4"], history))
    assert (tmp_path / "bat" / "reselect.png").is_file()
