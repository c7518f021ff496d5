"""Property (issue 13): random bytes and random tar/JSONL structures as pools never raise
anything but batctl's one-line errors, never hang, and account for every sample: each row is
a good sample or a counted bad one, the same rows with and without decoding; and `score` on
such a pool either scores or counts every row (status 1, 2 or 3, none pending)."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batctl.data import BadSample, Sample, open_pool
from batctl.errors import BatctlError

CAP = 2048  # a small --max-sample-mib stand-in, so oversized samples are cheap to make

member_names = st.one_of(
    st.sampled_from(
        [
            "a.txt",
            "b.json",
            "c.jpg",
            "../up.txt",
            "/abs.txt",
            "x/../../y.txt",
            "dir/",
            "noext",
            ".hidden",
            "__key__",
            "k.TXT",
            "a.b.c.txt",
        ]
    ),  # fmt: skip
    st.text(alphabet="ab./\\\x00-_é", min_size=1, max_size=12),
)
payloads = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40).map(str.encode),
    st.builds(lambda n: b"z" * n, st.integers(CAP - 4, CAP + 64)),  # around the cap
    st.sampled_from([b'{"text": "hi"}', b'{"caption": "c"}', b"\xff\xfe", b"[1, 2]"]),
)


@st.composite
def tar_bytes(draw) -> bytes:
    buf = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for _ in range(draw(st.integers(0, 6))):
            name = draw(member_names)
            kind = draw(st.sampled_from(["file", "file", "file", "sym", "hard", "dir", "fifo"]))
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "file":
                data = draw(payloads)
                info.size = len(data)
            else:
                info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                             "dir": tarfile.DIRTYPE, "fifo": tarfile.FIFOTYPE}[kind]  # fmt: skip
                info.linkname = draw(st.sampled_from(["a.txt", "/etc/passwd", "../x"]))
            try:
                tar.addfile(info, io.BytesIO(data) if data else None)
            except (ValueError, UnicodeError):
                continue  # a name the chosen format cannot hold
    raw = buf.getvalue()
    cut = draw(st.one_of(st.none(), st.integers(0, max(0, len(raw) - 1))))
    if cut is not None:
        raw = raw[:cut]
    if draw(st.integers(0, 4)) == 0:  # flip a byte somewhere
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :] if raw else raw
    return raw


@st.composite
def jsonl_bytes(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        lines.append(
            draw(
                st.one_of(
                    st.builds(lambda t: json.dumps({"text": t}).encode(), st.text(max_size=30)),
                    st.builds(
                        lambda n: json.dumps({"text": "w" * n}).encode(),
                        st.integers(CAP - 20, CAP + 200),
                    ),  # fmt: skip
                    st.binary(max_size=40),
                    st.just(b""),
                    st.just(b'{"instruction": "q", "output": "a"}'),
                )
            )
        )
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


@st.composite
def pool_files(draw) -> list[tuple[str, bytes]]:
    files = []
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["tar", "tar.gz-named-tar", "jsonl", "json", "txt", "random"]))
        if kind == "tar":
            files.append((f"p{i}.tar", draw(tar_bytes())))
        elif kind == "tar.gz-named-tar":
            import gzip

            files.append((f"p{i}.tar", gzip.compress(draw(tar_bytes()), mtime=0)))
        elif kind == "jsonl":
            files.append((f"p{i}.jsonl", draw(jsonl_bytes())))
        elif kind == "json":
            files.append((f"p{i}.json", b"[" + b",".join(draw(jsonl_bytes()).split(b"\n")) + b"]"))
        elif kind == "txt":
            files.append((f"p{i}.txt", draw(jsonl_bytes())))
        else:
            suffix = draw(st.sampled_from(["tar", "jsonl", "json", "txt"]))
            files.append((f"p{i}.{suffix}", draw(st.binary(max_size=600))))
    return files


def read_rows(paths: list[Path], decode: bool) -> tuple[list, object] | None:
    """All rows of the pool, or None when the pool is refused with one of batctl's errors."""
    try:
        pool = open_pool([str(p) for p in paths], decode=decode, max_sample_bytes=CAP)
        rows = list(pool.iter_rows())
    except BatctlError as exc:
        assert "\n" not in str(exc) and str(exc)
        return None
    return rows, pool.stats


@settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)  # the deadline is the "never a hang" bound: 2 s for a few KB of input
@given(pool_files())
def test_random_pools_never_raise_and_count_every_sample(files):
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, data in files:
            path = Path(tmp) / name
            path.write_bytes(data)
            paths.append(path)
        decoded = read_rows(paths, decode=True)
        raw = read_rows(paths, decode=False)
        assert (decoded is None) == (raw is None)
        if decoded is None:
            return
        rows, stats = decoded
        assert all(type(r) in (Sample, BadSample) for r in rows)
        assert stats.good + stats.bad == len(rows)  # every row is scored-able or counted
        assert stats.good == sum(type(r) is Sample for r in rows)
        assert [(r.part, r.offset) for r in rows] == [(r.part, r.offset) for r in raw[0]]
        for r in rows:
            if type(r) is Sample:
                assert len(r.key) and "\x00" not in r.key
                for ext, value in r.raw.items():
                    name = f"{r.key}.{ext}"
                    assert not name.startswith("/") and ".." not in name.split("/"), name
                    assert len(value) <= CAP


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    from typer.testing import CliRunner

    from batctl.cli import app
    from batctl.tiny import build_tiny_lm

    from .lm_fixtures import color_records, write_jsonl

    root = tmp_path_factory.mktemp("prop-score")
    lm = build_tiny_lm(root / "lm", seed=0)
    data = write_jsonl(root / "d.jsonl", color_records(8, seed=1))
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args], terminal_width=200)

    result = cli("surrogate", "--model", lm, "--data", data, "--out", root / "sur",
                 "--steps", "2", "--targets", "all-linear")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return cli, lm, data, root / "sur"


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(pool_files())
def test_score_on_random_pools_scores_or_counts_every_row(scoring, files):
    import numpy as np

    from batctl.scorestore import PENDING, ScoreStore

    cli, lm, data, sur = scoring
    with tempfile.TemporaryDirectory() as tmp:
        args = []
        for name, content in files:
            (Path(tmp) / name).write_bytes(content)
            args += ["--pool", Path(tmp) / name]
        out = Path(tmp) / "scores"
        result = cli("score", "--method", "influence", "--model", lm, "--surrogate", sur, "--data", data, *args,
                     "--out", out, "--batch-size", "4", "--chunk-size", "4")  # fmt: skip
        assert (
            "Traceback" not in result.stderr
            and result.exception is None
            or isinstance(result.exception, SystemExit)
        ), result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        if result.exit_code != 0:
            assert result.exit_code in (1, 2) and len(errors) == 1, result.stderr
            return
        status = ScoreStore.open(out).column("status")
        assert len(status) > 0 and not np.any(status == PENDING)
