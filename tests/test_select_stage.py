"""`batctl select` end to end on hand-made score stores over real pools (no model needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from batctl.artifacts import read_manifest, require_stage, upstream_input
from batctl.data import open_pool
from batctl.samples import load_samples
from batctl.scorestore import NON_FINITE, SCORED, UNREADABLE

from .data_fixtures import laion_sample, write_tar
from .select_fixtures import make_score_dir, write_text_pool


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 40-row text pool in two parts and its score directory (n = 5, chunks of 8)."""
    root = tmp_path_factory.mktemp("select")
    pool = write_text_pool(root, parts=2, per_part=20)
    status = np.full(40, SCORED, np.uint8)
    status[[3, 17]] = UNREADABLE
    status[25] = NON_FINITE
    scores = np.random.default_rng(1).standard_normal(40).astype(np.float32)
    scores[[3, 17, 25]] = np.nan
    scores[25] = 99.0  # status 3 with a finite-looking score: still never eligible
    make_score_dir(root / "scores", pool, n=5, scores=scores, status=status)
    return {
        "root": root,
        "pool": pool,
        "scores": root / "scores",
        "values": scores,
        "status": status,
    }


def select(cli, scored, out, *extra):
    return cli("select", "--scores", scored["scores"], "--out", out, *extra)


def test_one_complete_selection_directory_per_value_that_train_accepts(cli, scored, tmp_path):
    out = tmp_path / "sel"
    result = select(
        cli, scored, out, "--gamma", "0.5,0.75", "--count", "3", "--threshold", "1.0", "--json"
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    names = {"gamma-0.5", "gamma-0.75", "count-3", "threshold-1.0"}
    assert set(summary["selections"]) == names
    assert summary["selections"]["gamma-0.75"]["count"] == 2  # round(5 · 0.25 / 0.75) = 2
    assert summary["selections"]["gamma-0.5"]["count"] == 5 and summary["eligible"] == 37
    eligible = (scored["status"] == SCORED) & np.isfinite(scored["values"])
    above = int((scored["values"][eligible] >= 1.0).sum())
    assert summary["selections"]["threshold-1.0"]["count"] == above
    assert summary["selections"]["threshold-1.0"]["gamma"] == pytest.approx(5 / (5 + above))
    ranked = sorted(np.flatnonzero(eligible), key=lambda i: (-scored["values"][i], i))
    for name in names:
        sub = out / name
        assert require_stage(sub, "select", "--selection") == sub
        assert upstream_input(sub, "model") == upstream_input(scored["scores"], "model")
        files = {p.name for p in sub.iterdir()}
        assert files == {
            "manifest.json",
            "selection.json",
            "samples.tar",
            "preview.md",
            "scores.png",
        }
        chosen = json.loads((sub / "selection.json").read_text())
        assert chosen["strategy"] == "albat" and chosen["n_adaptation"] == 5
        rows = [c["row"] for c in chosen["chosen"]]
        assert rows == ranked[: chosen["count"]]  # highest scores, eligible only
        assert len(
            load_samples(str(sub / "samples.tar"), flag="--selection", allow_empty=True)
        ) == len(rows)
        assert read_manifest(sub)["params"]["value"] == name
    preview = (out / "count-3" / "preview.md").read_text()
    assert "| 1 |" in preview and "| 3 |" in preview and "| 4 |" not in preview
    top = json.loads((out / "selection.json").read_text())
    assert top["status"]["unreadable"] == 2 and top["status"]["non-finite"] == 1
    again = select(cli, scored, out, "--gamma", "0.75,0.5", "--count", "3", "--threshold", "1.0")
    assert again.exit_code == 0 and "up to date" in again.stderr


def test_samples_tar_round_trips_every_chosen_sample_byte_for_byte(cli, scored, tmp_path):
    # An image pool too (contact sheet), keys with dots and a second part.
    images = [
        write_tar(tmp_path / "img-0.tar", [laion_sample(i) for i in range(12)]),
        write_tar(
            tmp_path / "img-1.tar",
            [{**laion_sample(i), "__key__": f"shard.v2/{i:05d}"} for i in range(12, 20)],
        ),
    ]
    image_scores = make_score_dir(tmp_path / "img-scores", images, n=4, chunk_size=4)
    for scores, name, sheet in (
        (scored["scores"], "text", "preview.md"),
        (image_scores, "img", "contact_sheet.png"),
    ):
        out = tmp_path / f"sel-{name}"
        result = cli(
            "select", "--scores", scores, "--out", out, "--count", "9", "--strategy", "random"
        )
        assert result.exit_code == 0, result.stderr
        sub = out / "count-9"
        assert (sub / sheet).is_file()
        chosen = json.loads((sub / "selection.json").read_text())
        pool = open_pool(chosen["pool"])
        back = list(open_pool([str(sub / "samples.tar")]))
        assert [s.key for s in back] == [c["key"] for c in chosen["chosen"]]
        for sample, entry in zip(back, chosen["chosen"], strict=True):
            assert sample.same_content(pool.read(entry["part"], entry["offset"])), entry["key"]


def test_sample_tar_writes_the_bytes_webdataset_tarwriter_writes(tmp_path):
    import webdataset as wds

    from batctl.fetch import SampleTar

    samples = [laion_sample(i) for i in range(3)] + [
        {"__key__": "pool-0:7", "json": b'{"text": "hi"}'}
    ]
    with wds.TarWriter(str(tmp_path / "wds.tar"), mtime=0.0) as sink:
        for s in samples:
            sink.write(s)
    mine = SampleTar(tmp_path / "mine.tar")
    for s in samples:
        mine.write(
            s["__key__"],
            {k: v.encode() if isinstance(v, str) else v for k, v in s.items() if k != "__key__"},
        )
    mine.close()
    assert (tmp_path / "mine.tar").read_bytes() == (tmp_path / "wds.tar").read_bytes()


def test_random_is_reproducible_per_seed_through_the_cli(cli, scored, tmp_path):
    tars = {}
    for label, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        out = tmp_path / label
        assert (
            select(
                cli, scored, out, "--count", "6", "--strategy", "random", "--seed", seed
            ).exit_code
            == 0
        )
        tars[label] = (out / "count-6" / "samples.tar").read_bytes()
    assert tars["a"] == tars["b"] != tars["c"]


def test_dedupe_drops_repeated_content_and_keys_are_always_deduplicated(cli, tmp_path):
    lines = [json.dumps({"text": f"line {i % 4}"}) for i in range(12)]  # 4 distinct contents
    (tmp_path / "dup.jsonl").write_text("\n".join(lines) + "\n")
    scores = make_score_dir(
        tmp_path / "scores", [tmp_path / "dup.jsonl"], n=2, scores=np.arange(12, dtype=np.float32)
    )
    plain = cli("select", "--scores", scores, "--out", tmp_path / "plain", "--count", "6")
    assert plain.exit_code == 0, plain.stderr
    deduped = cli(
        "select", "--scores", scores, "--out", tmp_path / "dd", "--count", "4", "--dedupe"
    )
    assert deduped.exit_code == 0, deduped.stderr
    texts = [
        s.record["text"] for s in open_pool([str(tmp_path / "dd" / "count-4" / "samples.tar")])
    ]
    assert sorted(texts) == ["line 0", "line 1", "line 2", "line 3"]
    too_many = cli(
        "select", "--scores", scores, "--out", tmp_path / "x", "--count", "5", "--dedupe"
    )
    assert too_many.exit_code == 1
    errors = [line for line in too_many.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds only 4" in errors[0] and "8 repeated contents" in errors[0]


def test_asking_for_more_than_the_eligible_pool_is_one_line_saying_how_many(cli, scored, tmp_path):
    result = select(cli, scored, tmp_path / "o", "--gamma", "0.1")  # k = 45 of 37
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "holds only 37" in errors[0] and "--gamma 0.1" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("gamma", ["1.5", "0", "1", "-0.2", "half"])
def test_gamma_outside_the_unit_interval_is_a_usage_error(cli, scored, tmp_path, gamma):
    result = select(cli, scored, tmp_path / "o", "--gamma", gamma)
    assert result.exit_code == 2 and "--gamma" in result.stderr


def test_a_partial_store_is_refused_with_how_far_it_got_unless_allowed(cli, tmp_path):
    pool = write_text_pool(tmp_path, parts=1, per_part=40)
    done = np.array([True, False, True, False, True])
    make_score_dir(tmp_path / "scores", pool, n=3, done=done, publish=False)
    refused = cli(
        "select", "--scores", tmp_path / "scores", "--out", tmp_path / "o", "--count", "2"
    )
    assert refused.exit_code == 1
    assert "3 of 5 chunks done" in refused.stderr and "--allow-partial" in refused.stderr
    assert not (tmp_path / "o").exists()
    allowed = cli(
        "select", "--scores", tmp_path / "scores", "--out", tmp_path / "o", "--count", "24",
        "--allow-partial", "--strategy", "random",
    )  # fmt: skip
    assert allowed.exit_code == 0, allowed.stderr
    rows = [
        c["row"]
        for c in json.loads((tmp_path / "o" / "count-24" / "selection.json").read_text())["chosen"]
    ]
    assert sorted(rows) == [r for c in (0, 2, 4) for r in range(8 * c, 8 * c + 8)]
    # the selection still leads `train` to the model, though the store has no manifest yet
    assert upstream_input(tmp_path / "o" / "count-24", "model")["kind"] == "dir"
    more = cli(
        "select", "--scores", tmp_path / "scores", "--out", tmp_path / "o2", "--count", "25",
        "--allow-partial",
    )  # fmt: skip
    assert more.exit_code == 1 and "holds only 24" in more.stderr


def test_strategy_none_writes_empty_but_complete_selections(cli, scored, tmp_path):
    result = select(cli, scored, tmp_path / "none", "--gamma", "0.75", "--strategy", "none")
    assert result.exit_code == 0, result.stderr
    alone = select(cli, scored, tmp_path / "alone", "--strategy", "none")
    assert alone.exit_code == 0, alone.stderr
    for sub in (tmp_path / "none" / "gamma-0.75", tmp_path / "alone"):
        require_stage(sub, "select", "--selection")
        assert load_samples(str(sub / "samples.tar"), flag="--selection", allow_empty=True) == []
        chosen = json.loads((sub / "selection.json").read_text())
        assert chosen["count"] == 0 and chosen["gamma"] == 1.0 and chosen["chosen"] == []
        assert (sub / "preview.md").is_file()


def test_the_default_path_does_not_import_torch(scored, tmp_path):
    code = (
        "import sys; from batctl.cli import main; sys.argv = ['batctl'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules, 'webdataset' in sys.modules)"
    )
    args = [
        "select",
        "--scores",
        str(scored["scores"]),
        "--out",
        str(tmp_path / "o"),
        "--gamma",
        "0.5",
        "--dedupe",
    ]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert (tmp_path / "o" / "gamma-0.5" / "samples.tar").is_file()


def test_training_a_selection_with_another_adaptation_set_warns_with_the_real_gamma(
    tmp_path, caplog
):
    from batctl.selection_files import SELECTION_JSON, warn_other_adaptation

    warn_other_adaptation(tmp_path, 10, 10)  # no selection.json: nothing to compare
    (tmp_path / SELECTION_JSON).write_text(json.dumps({"n_adaptation": 30, "gamma": 0.75}))
    warn_other_adaptation(tmp_path, 30, 10)
    assert not caplog.records
    warn_other_adaptation(tmp_path, 10, 10)
    assert "made for 30 adaptation samples (gamma 0.75) but --data has 10" in caplog.text
    assert "trains at gamma 0.5" in caplog.text
