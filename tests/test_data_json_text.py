"""JSON arrays (incremental byte scanner), JSON Lines and text files."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from batctl.data import BadSample, Sample, jsonio, open_pool
from batctl.errors import BadSampleError

from .data_fixtures import assert_read_back, assert_roundtrip, png

TRICKY = [
    {"instruction": 'Quote "this" {and} [that]', "input": "", "output": 'a \\ b \\" c'},
    {"instruction": "Nested", "input": '{"a": [1, {"b": "}"}]}', "output": "]]]}}}"},
    {"instruction": "Unicode é 漢字 \u2028 🦜", "input": "tab\there", "output": "new\nline"},
    {"instruction": "escaped slash \\/ and \\u0041", "output": "ok", "extra": {"deep": [[{}]]}},
]


def test_json_array_with_nested_braces_and_escaped_quotes(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(TRICKY, indent=4, ensure_ascii=False), encoding="utf-8")
    pool = open_pool([path])
    assert pool.parts[0].kind == "json"
    samples = assert_read_back(pool)
    assert [s.key for s in samples] == [f"alpaca_data:{i}" for i in range(4)]
    for s, rec in zip(samples, TRICKY, strict=True):
        assert json.loads(s.raw["json"]) == rec
        assert s.record["instruction"] == rec["instruction"]
        assert s.record["output"] == rec["output"]
        assert s.record["input"] == rec.get("input", "")
        data = path.read_bytes()
        assert data[s.offset : s.offset + len(s.raw["json"])] == s.raw["json"]
    assert_roundtrip(samples, tmp_path)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_json_scanner_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(jsonio, "CHUNK", chunk)
    path = tmp_path / "a.json"
    records = TRICKY * 3 + [{"text": "x" * 200}]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, ensure_ascii=False).encode())
    samples = assert_read_back(open_pool([path]))
    assert [json.loads(s.raw["json"]) for s in samples] == records


def test_json_array_ids_and_damage(tmp_path, caplog):
    path = tmp_path / "d.json"
    path.write_text(
        '[{"id": "first.one", "text": "a"}, {"key": 7, "text": "b"}, "a string",'
        ' {"text": 3}, {"text": "c"}, {"text": "d"} {"text": "lost"}]'
    )
    with caplog.at_level(logging.WARNING, logger="batctl.data"):
        pool = open_pool([path])
        rows = list(pool.iter_rows())
    assert [(r.key, type(r)) for r in rows] == [
        ("first.one", Sample),
        ("7", Sample),
        ("d:2", BadSample),
        ("d:3", BadSample),
        ("d:4", Sample),
        ("d:5", Sample),
        ("d:6", BadSample),
    ]
    assert "not a JSON object" in rows[2].reason
    assert "expected ','" in rows[6].reason
    for r in rows:
        if type(r) is Sample:
            assert pool.read(r.part, r.offset).same_content(r)
    # a file cut inside the array keeps what came before
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text": "c')
    rows = list(open_pool([path]).iter_rows())
    assert [type(r) for r in rows] == [Sample, Sample, BadSample]
    assert rows[2].code == "truncated"


def test_json_that_is_not_an_array(tmp_path):
    (tmp_path / "s.json").write_text('"just a string"')
    pool = open_pool([tmp_path / "s.json"])
    assert list(pool) == [] and pool.stats.bad == 1
    (tmp_path / "e.json").write_text("  \n")
    (tmp_path / "e2.json").write_text("[ ]")
    pool = open_pool([tmp_path / "e.json", tmp_path / "e2.json"])
    assert list(pool) == [] and pool.stats.bad == 0 and len(pool.stats.empty_parts) == 2


def test_jsonl_with_a_malformed_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'{"text": "one"}\n'
        b"\n"
        b'{"text": "two", "broken": }\n'
        b'{"instruction": "i", "output": "o"}\r\n'
        b"[1, 2]\n"
        b'{"text": "caf\xe9"}\n'
        b'{"text": "last"}'
    )
    pool = open_pool([path])
    rows = list(pool.iter_rows())
    assert [(r.key, type(r)) for r in rows] == [
        ("train:0", Sample),
        ("train:1", BadSample),
        ("train:2", Sample),
        ("train:3", BadSample),
        ("train:4", BadSample),
        ("train:5", Sample),
    ]
    assert rows[1].code == "json" and "malformed JSON" in rows[1].reason
    assert rows[4].code == "utf8"
    assert rows[2].record["instruction"] == "i"
    data = path.read_bytes()
    starts = [0, *(i + 1 for i, c in enumerate(data) if c == 0x0A)]
    assert [r.offset for r in rows] == [o for o in starts if data[o : o + 1] not in (b"\n", b"")]
    assert data[rows[5].offset :].startswith(b'{"text": "last"}')
    good = assert_read_back(pool)
    with pytest.raises(BadSampleError, match=r"train\.jsonl \[train:1\]: malformed JSON"):
        pool.read(0, 17)
    with pytest.raises(BadSampleError, match=r"train\.jsonl \[train:1\]"):
        list(open_pool([path], strict=True))
    assert_roundtrip(good, tmp_path)
    # decode=False: same rows, keys and offsets, no validation
    fast = list(open_pool([path], decode=False).iter_rows())
    assert [(r.key, r.offset) for r in fast] == [(r.key, r.offset) for r in rows]


def test_json_named_file_holding_json_lines_and_gzip(tmp_path):
    lines = [{"text": f"t{i}", "id": f"row.{i}"} for i in range(3)]
    (tmp_path / "hf.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": f"z{i}"}) for i in range(3)))
    pool = open_pool([tmp_path / "hf.json", tmp_path / "z.jsonl.gz"])
    assert [(p.kind, p.compression) for p in pool.parts] == [("jsonl", None), ("jsonl", "gz")]
    samples = assert_read_back(pool)
    assert [s.key for s in samples] == ["row.0", "row.1", "row.2", "z:0", "z:1", "z:2"]


def test_json_records_with_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    records = [
        {"image": "imgs/a.png", "caption": "a green square"},
        {"image": "imgs/missing.png", "caption": "gone"},
        {"image": "https://example.com/x.png", "caption": "remote"},
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    pool = open_pool([tmp_path / "set.jsonl"])
    rows = list(pool.iter_rows())
    assert type(rows[0]) is Sample and set(rows[0].raw) == {"json", "png"}
    assert rows[0].record["caption"] == "a green square"
    assert rows[0].record["image"].size == (8, 8)
    assert rows[1].code == "missing_file" and "missing.png" in rows[1].reason
    assert rows[2].code == "missing_file" and "URL" in rows[2].reason
    assert_roundtrip([rows[0]], tmp_path)


def test_text_lines_and_paragraphs(tmp_path):
    path = tmp_path / "corpus.txt"
    data = "\ufefffirst line\n\n  \nsecond line\r\nthird\n\nfourth\nstill fourth\n\n\n"
    path.write_bytes(data.encode("utf-8"))
    pool = open_pool([path])
    samples = assert_read_back(pool)
    assert [s.record["text"] for s in samples] == [
        "first line",
        "second line",
        "third",
        "fourth",
        "still fourth",
    ]
    assert [s.key for s in samples] == [f"corpus:{i}" for i in range(5)]
    assert samples[0].offset == 3  # after the BOM
    raw = path.read_bytes()
    assert all(raw[s.offset :].startswith(s.raw["txt"]) for s in samples)

    pool = open_pool([path], paragraphs=True)
    samples = assert_read_back(pool)
    assert [s.record["text"] for s in samples] == [
        "first line",
        "second line\r\nthird",
        "fourth\nstill fourth",
    ]
    assert_roundtrip(samples, tmp_path)


def test_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"good\ncaf\xe9\nalso good\n")
    pool = open_pool([path])
    assert [s.record["text"] for s in pool] == ["good", "also good"]
    assert pool.bad[0].key == "latin:1" and pool.bad[0].code == "utf8"
    with pytest.raises(BadSampleError, match=r"latin\.txt \[latin:1\].*not UTF-8"):
        list(open_pool([path], strict=True))


def test_read_with_an_offset_that_is_not_a_sample(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("aaa\nbbb\n")
    pool = open_pool([path])
    with pytest.raises(BadSampleError, match="no sample starts at offset 1"):
        pool.read(0, 1)
