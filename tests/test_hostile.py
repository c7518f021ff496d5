"""Hostile inputs: one test per numbered finding of issue 13.

Each test runs the CLI the way an adversary (or an unlucky user) would and asserts the exit
code, exactly one `error:` line (or none, for findings that must succeed), no traceback, and
that every input's bytes are unchanged afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from batctl.tiny import build_tiny_lm

from .lm_fixtures import color_records, write_jsonl
from .select_fixtures import make_score_dir, write_text_pool

FAST = ["--steps", "2", "--batch-size", "4", "--targets", "all-linear"]


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under each root (or of the root itself when it is a file)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_error(result, code: int) -> str:
    """Assert the exit code, one `error:` line and no traceback; return that line."""
    text = result.stderr
    assert result.exit_code == code, (result.exit_code, text, result.stdout)
    assert "Traceback" not in text and "Traceback" not in result.stdout, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("hostile-lm") / "tiny", seed=0)


@pytest.fixture
def domain(tmp_path):
    holder = tmp_path / "dataholder"
    holder.mkdir()
    return write_jsonl(holder / "domain.jsonl", color_records(8, seed=1))


@pytest.fixture(scope="module")
def surrogate(cli_module, lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-sur")
    data = write_jsonl(root / "domain.jsonl", color_records(8, seed=1))
    result = cli_module(
        "surrogate", "--model", lm, "--data", data, "--out", root / "sur", "--lr", "1e-2", *FAST
    )
    assert result.exit_code == 0, result.stderr
    return root / "sur", data


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from batctl.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], terminal_width=200)


# --------------------------------------------------------------------------- data loss (1-3)


def test_01_out_holding_the_data_is_refused_even_with_force(cli, lm, domain):
    holder = domain.parent
    before = tree_hashes(holder, lm)
    result = cli("train", "--model", lm, "--data", domain, "--out", holder, "--force", *FAST)
    line = one_error(result, 2)
    assert "holds the --data input" in line
    assert tree_hashes(holder, lm) == before


def test_02_out_equal_to_the_model_is_refused_even_with_force(cli, lm, tmp_path):
    copy = tmp_path / "mcopy"
    import shutil

    shutil.copytree(lm, copy)
    data = write_jsonl(tmp_path / "d.jsonl", color_records(8, seed=1))
    before = tree_hashes(copy, data)
    result = cli("train", "--model", copy, "--data", data, "--out", copy, "--force", *FAST)
    assert "is the --model input itself" in one_error(result, 2)
    # inside the model directory is refused too: it would change the model's fingerprint
    result = cli("train", "--model", copy, "--data", data, "--out", copy / "runs", *FAST)
    assert "lies inside the --model input" in one_error(result, 2)
    assert tree_hashes(copy, data) == before


def test_03_cwd_and_foreign_directories_are_never_removed(cli, tmp_path, monkeypatch):
    pool = write_text_pool(tmp_path)
    scores = make_score_dir(tmp_path / "scores", pool, n=4)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes\n")
    watched = (notes, scores, *pool)
    before = tree_hashes(*watched)
    monkeypatch.chdir(notes)
    args = ["select", "--scores", scores, "--gamma", "0.5", "--force"]
    assert "is or holds the current directory" in one_error(cli(*args, "--out", "."), 2)
    monkeypatch.chdir(tmp_path)
    # a directory with the user's files, not the cwd: still never removed by --force
    line = one_error(cli(*args, "--out", notes), 1)
    assert "not written by batctl" in line
    assert tree_hashes(*watched) == before
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    assert cli(*args, "--out", tmp_path / "empty").exit_code == 0
    assert tree_hashes(*watched) == before


# --------------------------------------------------------------------------- flags (9-11)


def train_refuses(cli, lm, domain, tmp_path, flags, named):
    """`train` with `flags` exits 2 with one line naming `named`, touching no input."""
    before = tree_hashes(domain, lm)
    result = cli("train", "--model", lm, "--data", domain, "--out", tmp_path / "o", *FAST, *flags)
    assert named in one_error(result, 2)
    assert tree_hashes(domain, lm) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--rank", "100000000"], "--rank must be <= 65536"),
        (["--seed", "99999999999999999999"], "--seed must be in [0, 2^32)"),
        (["--seed", "-1"], "--seed must be in [0, 2^32)"),
        (["--warmup-steps", "5"], "--warmup-steps must be <= --steps"),
        (["--batch-size", "99999999999"], "--batch-size: 99999999999 is out of range"),
    ],
)
def test_09_bad_numbers_are_one_line_naming_the_flag(cli, lm, domain, tmp_path, flags, named):
    train_refuses(cli, lm, domain, tmp_path, flags, named)


def test_09_every_bad_flag_is_reported_at_once(cli, lm, domain, tmp_path):
    result = cli(
        "train", "--model", lm, "--data", domain, "--out", tmp_path / "o",
        "--lr", "nan", "--seed", "-3", "--alpha", "inf", "--dropout", "nan",
    )  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    for flag in ("--lr", "--seed", "--alpha", "--dropout"):
        assert sum(line.startswith(f"error: {flag}") for line in result.stderr.splitlines()) == 1


def test_09_a_rank_wider_than_the_layers_is_refused_after_loading(cli, lm, domain, tmp_path):
    result = cli("train", "--model", lm, "--data", domain, "--out", tmp_path / "o", *FAST,
                 "--rank", "5000")  # fmt: skip
    assert "wider than every adaptable layer" in one_error(result, 2)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "1e400"], "--lr must be a finite number"),
        (["--alpha", "nan"], "--alpha must be a finite number"),
        (["--alpha", "-4"], "--alpha must be > 0"),
        (["--alpha", "0"], "--alpha must be > 0"),
    ],
)
def test_10_non_finite_or_bad_alpha_and_lr_are_refused(cli, lm, domain, tmp_path, flags, named):
    train_refuses(cli, lm, domain, tmp_path, flags, named)


def test_10_a_diverging_run_publishes_nothing(cli, lm, domain, tmp_path):
    before = tree_hashes(domain, lm)
    args = ["--model", lm, "--data", domain, "--out", tmp_path / "o", "--steps", "4"]
    result = cli("train", *args, "--lr", "1e30", "--targets", "all-linear")
    assert "training diverged at step" in one_error(result, 1)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dataholder"]  # no temporary, no lock
    assert tree_hashes(domain, lm) == before


@pytest.mark.parametrize(
    ("stage", "flags", "named"),
    [
        ("score", ["--damping", "nan"], "--damping must be a finite number"),
        ("score", ["--damping", "inf"], "--damping must be a finite number"),
        ("train", ["--backbone-weight", "nan"], "--backbone-weight must be a finite number"),
        ("select", ["--threshold", "nan"], "--threshold must be a finite number"),
    ],
)
def test_11_non_finite_score_and_mix_flags_are_refused(
    cli, lm, domain, tmp_path, stage, flags, named
):
    common = {
        "score": [
            "--method",
            "influence",
            "--model",
            lm,
            "--surrogate",
            tmp_path,
            "--data",
            domain,
            "--pool",
            domain,
        ],
        "train": ["--model", lm, "--data", domain, *FAST],
        "select": ["--scores", tmp_path, "--gamma", "0.5"],
    }[stage]
    result = cli(stage, *common, "--out", tmp_path / "o", *flags)
    assert named in one_error(result, 2)


def test_11_a_store_with_nothing_scored_is_not_published(cli_module, lm, surrogate, tmp_path):
    sur, data = surrogate
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"label": 1}\n{"label": 2}\n')  # readable JSON, nothing an LM can take
    before = tree_hashes(pool, data, sur, lm)
    out = tmp_path / "scores"
    result = cli_module(
        "score",
        "--method",
        "influence",
        "--model",
        lm,
        "--surrogate",
        sur,
        "--data",
        data,
        "--pool",
        pool,
        "--out",
        out,
    )
    assert "no sample got a finite score" in one_error(result, 1)
    assert not out.exists() and (tmp_path / ".scores.partial").is_dir()  # kept for inspection
    assert tree_hashes(pool, data, sur, lm) == before


# --------------------------------------------------------------------------- locks (17)

COUNTER = """
import sys
from pathlib import Path
from batctl.artifacts import output_lock
out, n = Path(sys.argv[1]), int(sys.argv[2])
counter = out.parent / "counter.txt"
for _ in range(n):
    with output_lock(out, wait=True):
        value = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(value + 1))
"""


def test_17_locks_are_removed_and_still_exclude_each_other(tmp_path):
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", COUNTER, str(tmp_path / "out"), "25"])
        for _ in range(6)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    # read-modify-write under the lock: any two holders at once would lose an increment
    assert (tmp_path / "counter.txt").read_text() == "150"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter.txt"]


def test_17_stages_leave_no_lock_files(cli_module, lm, surrogate, tmp_path):
    sur, data = surrogate
    assert not list(sur.parent.glob(".*"))  # the surrogate fixture's own run
    pool = write_jsonl(tmp_path / "pool.jsonl", color_records(6, seed=2))
    out = tmp_path / "runs" / "scores"
    args = ["--method", "influence", "--model", lm, "--surrogate", sur, "--data", data,
            "--pool", pool, "--out", out]  # fmt: skip
    assert cli_module("score", *args).exit_code == 0
    assert cli_module("score", *args).exit_code == 0  # up to date
    sel = tmp_path / "runs" / "sel"
    assert cli_module("select", "--scores", out, "--count", "2", "--out", sel).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["scores", "sel"]


# --------------------------------------------------------------------------- pools (4, 5, 12, 13)

MIB = 1 << 20


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def text_tar(path: Path, members: dict[str, bytes], gz: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            add_member(tar, name, data)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0) if gz else buf.getvalue())
    return path


@pytest.fixture(scope="module")
def hostile_run(cli_module, lm, surrogate, tmp_path_factory):
    """One score + select over a pool with every hostile part, with the inputs' hashes."""
    sur, data = surrogate
    root = tmp_path_factory.mktemp("hostile-pool")
    lines = [json.dumps({"text": f"item {i} is red"}) for i in range(4)]
    lines.insert(2, json.dumps({"text": "x" * (3 * MIB)}))  # finding 4: one huge line
    jsonl = root / "a.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    big = text_tar(root / "b.tar", {"s0.txt": b"blue sky", "big.txt": b"y " * (2 * MIB),
                                    "s1.txt": b"green tree"})  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "ok0.txt", b"item 1 is red")
        add_member(tar, "../../escape.txt", b"item 2 is red")
        add_member(tar, "/abs/path.txt", b"item 3 is red")
        add_member(tar, "sym.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tar, "hard.txt", type=tarfile.LNKTYPE, linkname="ok0.txt")
        add_member(tar, "ok1.txt", b"item 4 is red")
    names = root / "c.tar"
    names.write_bytes(buf.getvalue())
    gz = text_tar(
        root / "d.tar", {f"g{i}.txt": f"item {i} is blue".encode() for i in range(3)}, gz=True
    )  # fmt: skip  (finding 13: gzip bytes under a .tar name)
    pool = [jsonl, big, names, gz]
    before = tree_hashes(*pool, data, sur, lm)
    out = root / "scores"
    score = cli_module(
        "score", "--method", "influence", "--model", lm, "--surrogate", sur, "--data", data,
        *[a for p in pool for a in ("--pool", p)], "--out", out, "--max-sample-mib", "1", "--batch-size", "4",
    )  # fmt: skip
    select = cli_module("select", "--scores", out, "--threshold", "-1e30", "--out", root / "sel")
    from batctl.scorestore import ScoreStore

    assert score.exit_code == 0, score.stderr
    store = ScoreStore.open(out)
    rows = dict(zip(store.column("key").tolist(), store.column("status").tolist(), strict=True))
    after = tree_hashes(*pool, data, sur, lm)
    return {"score": score, "select": select, "rows": rows, "before": before, "after": after,
            "root": root, "pool": pool}  # fmt: skip


def no_error(result) -> None:
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr


def test_04_a_huge_jsonl_line_is_skipped_and_counted(hostile_run):
    no_error(hostile_run["score"])
    rows = hostile_run["rows"]
    assert rows["a:2"] == 2  # unreadable
    assert [rows[f"a:{i}"] for i in (0, 1, 3, 4)] == [1, 1, 1, 1]
    assert hostile_run["before"] == hostile_run["after"]


def test_04_the_reader_never_holds_a_line_over_the_cap(tmp_path):
    import tracemalloc

    from batctl.data import open_pool

    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "' + b"z" * (40 * MIB) + b'"}\n{"text": "b"}\n')
    pool = open_pool([path], max_sample_bytes=MIB)
    tracemalloc.start()
    rows = list(pool.iter_rows())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [type(r).__name__ for r in rows] == ["Sample", "BadSample", "Sample"]
    assert rows[1].code == "oversized" and pool.stats.by_code["oversized"] == 1
    assert peak < 8 * MIB, peak  # the cap, a read chunk and the stream buffer; not 40 MiB


def test_04_a_huge_json_array_element_is_counted_without_being_held(tmp_path):
    import tracemalloc

    from batctl.data import open_pool

    path = tmp_path / "p.json"
    huge = b'{"text": "' + b"q" * (40 * MIB) + b'"}'
    path.write_bytes(b'[{"text": "a"},\n' + huge + b',\n{"text": "b"}]')
    tracemalloc.start()
    rows = list(open_pool([path], max_sample_bytes=MIB).iter_rows())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # documented limit: an array cannot be resynchronised after an element it did not hold
    assert [type(r).__name__ for r in rows] == ["Sample", "BadSample"]
    assert rows[1].code == "oversized" and "rest of this array is not read" in rows[1].reason
    assert peak < 8 * MIB, peak


def test_05_a_huge_tar_member_is_skipped_unread_and_counted(hostile_run, tmp_path):
    import tracemalloc

    from batctl.data import open_pool

    rows = hostile_run["rows"]
    assert rows["big"] == 2 and rows["s0"] == 1 and rows["s1"] == 1
    path = text_tar(tmp_path / "t.tar", {"a.txt": b"a", "huge.txt": b"h" * (40 * MIB),
                                         "b.txt": b"b"})  # fmt: skip
    pool = open_pool([path], max_sample_bytes=MIB)
    tracemalloc.start()
    got = [(r.key, type(r).__name__) for r in pool.iter_rows()]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [("a", "Sample"), ("huge", "BadSample"), ("b", "Sample")]
    assert peak < 8 * MIB, peak  # the cap, a read chunk and the stream buffer; not 40 MiB


def test_05_lm_text_is_cut_before_tokenizing(lm):
    from batctl.data import Sample
    from batctl.tasks.base import TaskSettings
    from batctl.tasks.lm import LMTask

    task = LMTask(TaskSettings(model=str(lm), max_length=16))
    huge = Sample("k", 0, 0, {}, {"text": "word " * 2_000_000})
    ids, labels = task.encode(huge)
    assert len(ids) == 16 and task.counters()["truncated_samples"] == 1


def test_12_unsafe_names_and_links_are_counted_never_copied(hostile_run):
    no_error(hostile_run["select"])
    rows = hostile_run["rows"]
    for key in ("../../escape", "/abs/path", "sym", "hard"):
        assert rows[key] == 2, key  # unreadable, so never selected
    assert rows["ok0"] == 1 and rows["ok1"] == 1
    (tar_path,) = (hostile_run["root"] / "sel").glob("*/samples.tar")
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
        assert "ok0.txt" in names and not any(m.issym() or m.islnk() for m in tar.getmembers())
        target = hostile_run["root"] / "extract" / "inner"
        target.mkdir(parents=True)
        tar.extractall(target, filter="fully_trusted")  # what Python 3.11 did by default
    assert not (hostile_run["root"] / "escape.txt").exists()
    assert hostile_run["before"] == hostile_run["after"]


def test_12_select_refuses_to_write_an_unsafe_name(tmp_path):
    from batctl.errors import BatctlError
    from batctl.fetch import SampleTar

    sink = SampleTar(tmp_path / "s.tar")
    with pytest.raises(BatctlError, match="'..' component"):
        sink.write("../../x", {"txt": b"x"})
    sink.close()


def test_13_a_gzip_file_named_tar_is_read_as_a_compressed_tar(hostile_run, cli, tmp_path, caplog):
    rows = hostile_run["rows"]
    assert [rows[f"g{i}"] for i in range(3)] == [1, 1, 1]
    said = " ".join(hostile_run["score"].stderr.split())  # rich wraps long log lines
    assert "d.tar: is gz-compressed though its name does not say so" in said
    gz = hostile_run["pool"][3]
    before = tree_hashes(gz)
    result = cli("info", gz, "--json")  # --strict readers see the same samples
    no_error(result)
    assert json.loads(result.stdout)["samples"] == 3
    from batctl.data import open_pool

    assert [s.key for s in open_pool([gz], strict=True)] == ["g0", "g1", "g2"]
    zst = tmp_path / "z.tar"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    from batctl.errors import UsageError

    with pytest.raises(UsageError, match="is zstd-compressed; decompress it first"):
        open_pool([zst])
    assert tree_hashes(gz) == before


# --------------------------------------------------------------------------- formats, OS (14, 15)


@pytest.mark.parametrize(
    "text",
    ['{"text": "one record"}\n', '{\n  "data": [{"text": "a"}, {"text": "b"}]\n}\n'],
    ids=["one-line", "pretty"],
)
def test_14_a_top_level_json_object_is_an_error_naming_the_file(cli, lm, tmp_path, text):
    data = tmp_path / "obj.json"
    data.write_text(text)
    before = tree_hashes(data, lm)
    result = cli("train", "--model", lm, "--data", data, "--out", tmp_path / "o", *FAST)
    line = one_error(result, 2)
    assert str(data) in line and "single JSON object" in line
    assert tree_hashes(data, lm) == before and not (tmp_path / "o").exists()
    # JSON Lines under a .json name (Dataset.to_json) is still read
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    from batctl.data import open_pool

    assert [s.record["text"] for s in open_pool([data])] == ["a", "b"]


def test_15_an_os_error_names_the_path_it_hit(tmp_path):
    import resource
    import signal
    import subprocess
    import sys

    pool = write_text_pool(tmp_path, parts=2, per_part=200)
    scores = make_score_dir(tmp_path / "scores", pool, n=4)
    before = tree_hashes(scores, *pool)

    def small_files() -> None:  # a full disk, as far as the writer can tell
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "sel"
    proc = subprocess.run(
        [sys.executable, "-m", "batctl", "select", "--scores", str(scores), "--count", "300",
         "--out", str(out)],
        capture_output=True, text=True, preexec_fn=small_files, timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and str(out) in errors[0] and "File too large" in errors[0], errors
    assert not out.exists() and tree_hashes(scores, *pool) == before


# --------------------------------------------------------------------------- loaders (6-8)


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("how", ["auto_map", "unknown_type"])
def test_06_remote_code_needs_the_flag_and_the_message_names_it(cli, lm, tmp_path, how):
    model = copy_tree(lm, tmp_path / "remote")
    config = json.loads((model / "config.json").read_text())
    if how == "auto_map":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    else:
        config["model_type"] = "evilnet"
    (model / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "d.jsonl", color_records(8, seed=1))
    before = tree_hashes(model, data)
    result = cli("train", "--model", model, "--data", data, "--out", tmp_path / "o", *FAST)
    line = one_error(result, 2 if how == "auto_map" else 1)
    assert "--trust-remote-code" in line
    assert tree_hashes(model, data) == before and not (tmp_path / "o").exists()


def test_07_pickled_adapters_and_models_are_refused(cli_module, lm, surrogate, tmp_path):
    import torch
    from safetensors.torch import load_file

    sur, data = surrogate
    pickled_sur = copy_tree(sur, tmp_path / "sur")
    weights = pickled_sur / "adapter_model.safetensors"
    torch.save(load_file(weights), pickled_sur / "adapter_model.bin")
    weights.unlink()
    pool = write_jsonl(tmp_path / "pool.jsonl", color_records(4, seed=3))
    before = tree_hashes(pickled_sur, data, pool, lm)
    result = cli_module("score", "--method", "influence", "--model", lm, "--surrogate",
                        pickled_sur, "--data", data, "--pool", pool, "--out", tmp_path / "s")  # fmt: skip
    line = one_error(result, 1)
    assert "adapter_model.bin" in line and "convert it to safetensors" in line
    model = copy_tree(lm, tmp_path / "model")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    before.update(tree_hashes(model))
    result = cli_module("train", "--model", model, "--data", data, "--out", tmp_path / "o", *FAST)
    line = one_error(result, 1)
    assert "pytorch_model.bin" in line and "convert it to safetensors" in line
    assert tree_hashes(pickled_sur, data, pool, lm, model) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_08_a_damaged_adapter_is_reported_by_path_before_the_backbone_loads(
    cli_module, lm, surrogate, tmp_path, damage
):
    import time

    sur, data = surrogate
    bad = copy_tree(sur, tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(
        {
            "truncated": content[: len(content) - 100],
            "garbage": b"\x89not a tensor file" * 50,
            "empty": b"",
        }[damage]  # fmt: skip
    )
    before = tree_hashes(bad, data, lm)
    began = time.perf_counter()
    result = cli_module("eval", "--model", lm, "--adapter", sur, "--adapter", bad,
                        "--data", data, "--out", tmp_path / "e")  # fmt: skip
    elapsed = time.perf_counter() - began
    line = one_error(result, 1)
    assert str(weights) in line and "damaged safetensors file" in line
    assert elapsed < 30  # the backbone rows were never evaluated
    assert tree_hashes(bad, data, lm) == before and not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- determinism (16)


def test_16_safetensors_headers_are_canonical(tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from batctl.artifacts import canonical_safetensors

    tensors = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float64)}
    keys = [f"key{i}" for i in range(40)]
    paths = []
    for order in (keys, keys[::-1]):
        path = tmp_path / f"{len(paths)}.safetensors"
        save_file(tensors, str(path), metadata={k: k.upper() for k in order})
        canonical_safetensors(path)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    loaded = load_file(str(paths[0]))
    assert (loaded["a"] == tensors["a"]).all() and (loaded["b"] == tensors["b"]).all()


def _bytes_of(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"  # its times and host differ by design
    }


def test_16_two_identical_runs_write_identical_bytes(cli_module, lm, surrogate, tmp_path):
    sur, data = surrogate
    pool = write_jsonl(tmp_path / "pool.jsonl", color_records(6, seed=2))
    before = tree_hashes(data, pool, lm, sur)
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        common = ["--model", lm, "--data", data]
        surrogate_args = [*common, "--out", out / "sur", "--lr", "1e-2", "--targets", "q_proj",
                          "--targets", "v_proj", "--targets", "o_proj", "--steps", "2"]  # fmt: skip
        no_error(cli_module("surrogate", *surrogate_args))
        no_error(cli_module("score", "--method", "fusion", *common, "--surrogate", sur,
                            "--pool", pool, "--out", out / "scores"))  # fmt: skip
        runs.append(out)
    first, second = _bytes_of(runs[0]), _bytes_of(runs[1])
    assert "sur/adapter_config.json" in first and "scores/target.safetensors" in first
    assert first == second
    config = json.loads((runs[0] / "sur" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    assert tree_hashes(data, pool, lm, sur) == before
