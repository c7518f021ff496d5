"""Property: for random pools mixing formats, read(part, offset) gives back the streamed sample,
decode=False gives the same rows, and the TarWriter round trip (what `select` writes) holds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batctl.data import open_pool

from .data_fixtures import jpeg, write_tar

FORMATS = ("tar_img", "tar_text", "tar_gz", "jsonl", "json", "txt")
JPEGS = [jpeg((200, 30, 30)), jpeg((0, 90, 250), size=12), jpeg((5, 5, 5), size=5)]

keys = st.text(alphabet="abcxyz019._-", min_size=1, max_size=10)
words = st.text(
    alphabet=st.characters(
        whitelist_categories=("L", "N", "P", "S", "Zs"), blacklist_characters="\r\n"
    ),
    min_size=1,
    max_size=30,
).filter(lambda t: any(c.isalnum() for c in t))
any_text = st.text(max_size=40)  # json values: anything, quotes, braces, newlines included


@st.composite
def records(draw):
    kind = draw(st.sampled_from(["text", "alpaca"]))
    if kind == "text":
        rec = {"text": draw(words)}
    else:
        rec = {"instruction": draw(words), "input": draw(any_text), "output": draw(any_text)}
    if draw(st.booleans()):
        rec["extra"] = {"nested": [draw(any_text), {"k": draw(any_text)}]}
    return rec


@st.composite
def parts(draw):
    fmt = draw(st.sampled_from(FORMATS))
    part_keys = draw(st.lists(keys, max_size=5, unique=True))
    n = len(part_keys)
    if fmt == "tar_img" or fmt == "tar_gz":
        samples = []
        for k in part_keys:
            s = {"__key__": k, "jpg": draw(st.sampled_from(JPEGS)), "txt": draw(words)}
            if draw(st.booleans()):
                s["json"] = json.dumps({"caption": draw(any_text), "x": draw(any_text)})
            samples.append(s)
        return fmt, samples
    if fmt == "tar_text":
        samples = []
        for k in part_keys:
            if draw(st.booleans()):
                samples.append({"__key__": k, "txt": draw(words)})
            else:
                samples.append({"__key__": k, "json": json.dumps(draw(records()))})
        return fmt, samples
    if fmt in ("jsonl", "json"):
        recs = [draw(records()) for _ in range(n)]
        for k, rec in zip(part_keys, recs, strict=True):
            if draw(st.booleans()):
                rec["id"] = k
        return fmt, (recs, draw(st.sampled_from([None, 0, 2])), draw(st.booleans()))
    paras = [draw(st.lists(words, min_size=1, max_size=3)) for _ in range(n)]
    # what follows each paragraph's last line: at least one blank (or whitespace-only) line
    seps = [draw(st.sampled_from(["\n", "\n\n", " \n\n", "\r\n"])) for _ in range(n)]
    return fmt, (paras, seps)


def write_part(d: Path, i: int, fmt: str, content, paragraphs: bool) -> tuple[Path, int]:
    """Write one part; returns its path and how many samples it holds."""
    if fmt in ("tar_img", "tar_text"):
        return write_tar(d / f"p{i}.tar", content), len(content)
    if fmt == "tar_gz":
        return write_tar(d / f"p{i}.tar.gz", content), len(content)
    if fmt == "jsonl":
        recs, _indent, ascii_ = content
        path = d / f"p{i}.jsonl"
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=ascii_) + "\n" for r in recs), encoding="utf-8"
        )
        return path, len(recs)
    if fmt == "json":
        recs, indent, ascii_ = content
        path = d / f"p{i}.json"
        path.write_text(json.dumps(recs, indent=indent, ensure_ascii=ascii_), encoding="utf-8")
        return path, len(recs)
    paras, seps = content
    path = d / f"p{i}.txt"
    if paragraphs:
        text = "".join("\n".join(p) + "\n" + sep for p, sep in zip(paras, seps, strict=True))
        count = len(paras)
    else:
        text = "".join(line + "\n" for p in paras for line in p)
        count = sum(len(p) for p in paras)
    path.write_bytes(text.encode("utf-8"))
    return path, count


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(parts(), min_size=1, max_size=4), st.booleans())
def test_read_back_equals_stream_for_random_pools(pool_parts, paragraphs):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths, counts = [], []
        for i, (fmt, content) in enumerate(pool_parts):
            path, count = write_part(d, i, fmt, content, paragraphs)
            paths.append(path)
            counts.append(count)
        pool = open_pool([str(p) for p in paths], paragraphs=paragraphs)
        rows = list(pool.iter_rows())
        assert pool.stats.bad == 0, [b.line() for b in pool.bad]
        assert [sum(1 for r in rows if r.part == i) for i in range(len(paths))] == counts

        for s in rows:
            back = pool.read(s.part, s.offset)
            assert (back.key, back.part, back.offset) == (s.key, s.part, s.offset)
            assert back.same_content(s), s.key
            assert back == s or "image" in s.record  # dataclass equality where no image

        fast = list(
            open_pool([str(p) for p in paths], paragraphs=paragraphs, decode=False).iter_rows()
        )
        assert [(r.key, r.part, r.offset, r.raw) for r in fast] == [
            (r.key, r.part, r.offset, r.raw) for r in rows
        ]

        # what `select` writes: {"__key__": key, **raw} through TarWriter, read back equal
        for i in range(len(paths)):
            mine = [s for s in rows if s.part == i]
            if not mine:
                continue
            out = write_tar(d / f"rt{i}.tar", ({"__key__": s.key, **s.raw} for s in mine))
            again = list(open_pool([out]))
            assert [s.key for s in again] == [s.key for s in mine]
            assert all(a.same_content(b) for a, b in zip(again, mine, strict=True))
