"""webdataset tar pools: LAION layout, bad members, truncation, keys with dots, read-back, memory."""

from __future__ import annotations

import gc
import io
import json
import logging
import tarfile
import tracemalloc

import pytest

from batctl.data import BadSample, Pool, Sample, open_pool, split_member_name
from batctl.errors import BadSampleError

from .data_fixtures import (
    assert_read_back,
    assert_roundtrip,
    jpeg,
    laion_sample,
    write_laion,
    write_tar,
)


def test_laion_layout_streams_and_reads_back(tmp_path):
    path = write_laion(tmp_path / "laion-000.tar", 6)
    pool = open_pool([path])
    samples = assert_read_back(pool)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(6)]
    s = samples[2]
    assert set(s.raw) == {"jpg", "txt", "json"}
    assert s.record["caption"] == "a photo number 2"
    assert s.record["image"].mode == "RGB" and s.record["image"].size == (8, 8)
    assert s.record["meta"]["url"] == "https://example.com/2.jpg"
    assert [s.part for s in samples] == [0] * 6
    assert samples[0].offset == 0 and samples[1].offset > 0
    assert pool.stats.good == 6 and pool.stats.bad == 0
    assert_roundtrip(samples, tmp_path)


def test_bad_members_are_reported_once_counted_and_skipped(tmp_path, caplog):
    samples = [laion_sample(i) for i in range(6)]
    samples[1]["jpg"] = jpeg()[:40]  # corrupt JPEG: cut inside the entropy data
    samples[2]["jpg"] = b"this is not an image at all"
    del samples[3]["txt"]  # no .txt, but the json still has a caption: fine
    samples[4] = {"__key__": samples[4]["__key__"], "jpg": jpeg()}  # no caption anywhere
    samples[5]["txt"] = b"caf\xe9 latin-1"  # not UTF-8
    path = write_tar(tmp_path / "bad.tar", samples)
    seen: list[BadSample] = []
    with caplog.at_level(logging.WARNING, logger="batctl.data"):
        pool = open_pool([path], on_bad=seen.append)
        good = list(pool)
    assert [s.key for s in good] == ["000000000", "000000003"]
    assert good[1].record["caption"] == "a photo number 3"  # from the json's caption field
    assert pool.stats.good == 2 and pool.stats.bad == 4
    assert dict(pool.stats.by_code) == {"image": 2, "caption": 1, "utf8": 1}
    assert [b.key for b in pool.bad] == ["000000001", "000000002", "000000004", "000000005"]
    assert seen == pool.bad
    lines = [r.getMessage() for r in caplog.records if r.name == "batctl.data"]
    assert len(lines) == 4
    for line, bad in zip(lines, pool.bad, strict=True):
        assert "\n" not in line and str(path) in line and f"[{bad.key}]" in line
    assert "missing caption" in lines[2] and "not UTF-8" in lines[3]

    # rows keep every sample in place, with the same keys and offsets with or without decoding
    rows = list(pool.iter_rows())
    assert [type(r).__name__ for r in rows] == [
        "Sample",
        "BadSample",
        "BadSample",
        "Sample",
        "BadSample",
        "BadSample",
    ]
    assert pool.row_counts() == [6]
    fast = list(open_pool([path], decode=False).iter_rows())
    assert all(type(r) is Sample and r.record == {} for r in fast)
    assert [(r.key, r.part, r.offset) for r in fast] == [(r.key, r.part, r.offset) for r in rows]

    # reading a bad one back raises, naming file and key
    with pytest.raises(BadSampleError, match=r"bad\.tar \[000000002\]: undecodable image"):
        pool.read(0, rows[2].offset)


def test_strict_raises_naming_file_key_and_fix(tmp_path):
    samples = [laion_sample(i) for i in range(3)]
    samples[1]["jpg"] = b"garbage"
    path = write_tar(tmp_path / "s.tar", samples)
    pool = open_pool([path], strict=True)
    it = iter(pool)
    assert next(it).key == "000000000"
    with pytest.raises(BadSampleError) as err:
        next(it)
    assert err.value.file == str(path) and err.value.key == "000000001"
    assert "s.tar [000000001]" in str(err.value) and "undecodable image" in str(err.value)
    assert err.value.fix


def test_require_caption_false_accepts_bare_images(tmp_path):
    path = write_tar(tmp_path / "db.tar", [{"__key__": f"dog{i}", "jpg": jpeg()} for i in range(3)])
    assert len(list(open_pool([path]))) == 0
    pool = open_pool([path], require_caption=False)
    samples = list(pool)
    assert [s.key for s in samples] == ["dog0", "dog1", "dog2"]
    assert set(samples[0].record) == {"image"}


def test_keys_with_dots_stay_whole_and_round_trip(tmp_path):
    keys = ["photo.v2", "photo", "a.b.c.d", "x.jpg", "archive.tar", "v1.0_final", "n.json.x"]
    path = write_tar(
        tmp_path / "dots.tar",
        [{"__key__": k, "jpg": jpeg(), "txt": f"caption of {k}"} for k in keys],
    )
    samples = assert_read_back(open_pool([path]))
    assert [s.key for s in samples] == keys
    assert all(set(s.raw) == {"jpg", "txt"} for s in samples)
    assert samples[0].record["caption"] == "caption of photo.v2"
    assert_roundtrip(samples, tmp_path)
    # webdataset itself would split at the first dot
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(path), shardshuffle=False, empty_check=False)))
    assert first["__key__"] == "photo" and "v2.jpg" in first


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("000000001.jpg", ("000000001", "jpg")),
        ("photo.v2.jpg", ("photo.v2", "jpg")),
        ("dir.d/img.JPG", ("dir.d/img", "jpg")),
        ("0001.json.gz", ("0001", "json.gz")),
        ("a.b.txt.gz", ("a.b", "txt.gz")),
        ("a.seg.png", ("a.seg", "png")),
        ("noext", None),
        ("dir.x/noext", None),
        (".hidden", None),
        ("trailing.", None),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def _member_offsets(path):
    with tarfile.open(path) as tf:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tf.getmembers()]


def test_truncated_tar_keeps_earlier_samples_and_reports_the_cut_one(tmp_path, caplog):
    good = write_laion(tmp_path / "good.tar", 5)
    data = good.read_bytes()
    members = _member_offsets(good)
    # cut in the middle of the jpg data of sample 3
    name, _off, data_off, size = next(m for m in members if m[0] == "000000003.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data_off + size // 2])
    with caplog.at_level(logging.WARNING, logger="batctl.data"):
        pool = open_pool([cut])
        rows = list(pool.iter_rows())
    assert [r.key for r in rows] == ["000000000", "000000001", "000000002", "000000003"]
    assert [type(r) for r in rows] == [Sample, Sample, Sample, BadSample]
    assert rows[3].code == "truncated" and "truncated" in rows[3].reason
    assert pool.stats.good == 3 and pool.stats.bad == 1
    assert any("cut.tar [000000003]" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadSampleError, match="truncated"):
        list(open_pool([cut], strict=True))

    # cut inside a header: the sample in progress cannot be known complete and is reported
    first_of_3 = min(m[1] for m in members if m[0].startswith("000000003"))
    cut.write_bytes(data[: first_of_3 + 100])
    rows = list(open_pool([cut]).iter_rows())
    assert [(r.key, type(r)) for r in rows] == [
        ("000000000", Sample),
        ("000000001", Sample),
        ("000000002", BadSample),
    ]
    # a cut exactly on a block boundary between samples keeps everything before it (warning)
    cut.write_bytes(data[:first_of_3])
    with caplog.at_level(logging.WARNING, logger="batctl.data"):
        caplog.clear()
        assert [s.key for s in open_pool([cut])] == [f"{i:09d}" for i in range(3)]
    assert any("end-of-archive" in r.getMessage() for r in caplog.records)


def test_garbage_header_is_corrupt(tmp_path):
    data = bytearray(write_laion(tmp_path / "g.tar", 3).read_bytes())
    members = _member_offsets(tmp_path / "g.tar")
    first_of_2 = min(m[1] for m in members if m[0].startswith("000000002"))
    data[first_of_2 : first_of_2 + 512] = b"\x07" * 512
    (tmp_path / "g.tar").write_bytes(bytes(data))
    pool = open_pool([tmp_path / "g.tar"])
    assert [s.key for s in pool] == ["000000000"]  # sample 1 was in progress at the damage
    assert pool.bad[0].code == "corrupt" and pool.bad[0].key == "000000001"


def test_empty_tars_warn_and_yield_nothing(tmp_path, caplog):
    empty = write_tar(tmp_path / "empty.tar", [])
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    full = write_laion(tmp_path / "full.tar", 2)
    with caplog.at_level(logging.WARNING, logger="batctl.data"):
        pool = open_pool([empty, zero, full])
        keys = [s.key for s in pool]
    assert keys == ["000000000", "000000001"]
    assert pool.stats.empty_parts == [str(empty), str(zero)]
    assert pool.stats.bad == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any("empty.tar: no samples" in m for m in msgs)


def test_text_only_tars_are_lm_pools(tmp_path):
    samples = [
        {"__key__": "t0", "txt": "The quick brown fox."},
        {
            "__key__": "a0",
            "json": json.dumps({"instruction": "Add", "input": "1 2", "output": "3"}),
        },
        {"__key__": "a1", "json": json.dumps({"instruction": "Say hi", "output": "hi"})},
        {"__key__": "j0", "json": json.dumps({"text": "from json"})},
        {"__key__": "x0", "json": json.dumps({"foo": 1})},  # none of the known fields
        {"__key__": "x1", "json": b"{not json"},
        {"__key__": "x2", "json": json.dumps({"caption": "no image"})},
        {"__key__": "x3", "json": json.dumps({"text": 5})},  # a known field, not a string
    ]
    path = write_tar(tmp_path / "lm.tar", samples)
    pool = open_pool([path])
    good = assert_read_back(pool)
    assert [s.key for s in good] == ["t0", "a0", "a1", "j0"]
    assert good[0].record == {"text": "The quick brown fox."}
    assert good[1].record["instruction"] == "Add" and good[1].record["input"] == "1 2"
    assert good[2].record["input"] == "" and good[2].record["output"] == "hi"
    assert good[3].record["text"] == "from json"
    assert [b.code for b in pool.bad] == ["fields", "json", "fields", "fields"]
    assert "none of the known fields" in pool.bad[0].reason
    assert "'text' must be a string, got int" in pool.bad[3].reason
    assert_roundtrip(good, tmp_path)


def test_compressed_tar_offsets_are_in_the_decompressed_stream(tmp_path):
    path = write_tar(tmp_path / "p.tar.gz", (laion_sample(i) for i in range(4)))
    tgz = tmp_path / "p.tgz"
    tgz.write_bytes(path.read_bytes())
    pool = open_pool([path, tgz])
    assert [p.compression for p in pool.parts] == ["gz", "gz"]
    samples = assert_read_back(pool)
    assert len(samples) == 8
    plain = write_laion(tmp_path / "p.tar", 4)
    assert [s.offset for s in samples[:4]] == [s.offset for s in open_pool([plain])]
    # a cut gzip stream: earlier samples kept, the cut reported
    data = path.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) * 3 // 4])
    rows = list(open_pool([tmp_path / "cut.tar.gz"]).iter_rows())
    assert type(rows[-1]) is BadSample and rows[-1].code == "truncated"
    assert all(type(r) is Sample for r in rows[:-1]) and len(rows) >= 2


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_member_names(tmp_path, fmt):
    """GNU longname and PAX path headers (names over 100 bytes), ustar prefixes."""
    long_dir = "d" * 60 + "/" + "e" * 60
    keys = [f"{long_dir}/sample.{i}.with.a.rather.long.name.{'z' * 40}" for i in range(3)]
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        for k in keys:
            for ext, data in (("jpg", jpeg()), ("txt", k.encode())):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    samples = assert_read_back(open_pool([path]))
    assert [s.key for s in samples] == keys
    assert samples[1].record["caption"] == keys[1]


def test_non_sample_members_are_skipped(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tf:
        d = tarfile.TarInfo("subdir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in (
            ("__meta__", b"x"),
            ("README", b"no extension"),
            ("subdir/k1.txt", b"hello"),
            ("subdir/k1.json", b'{"a": 1}'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("subdir/k2.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "k1.txt"
        tf.addfile(link)
    samples = list(open_pool([path]))
    assert [(s.key, sorted(s.raw)) for s in samples] == [("subdir/k1", ["json", "txt"])]


def test_bad_list_is_bounded_and_logging_is_summarised(tmp_path, caplog):
    path = write_tar(
        tmp_path / "many.tar",
        [{"__key__": f"k{i:03d}", "jpg": b"bad", "txt": "c"} for i in range(30)],
    )
    pool = Pool(open_pool([path]).parts, max_bad=5, max_logged=3)
    with caplog.at_level(logging.WARNING, logger="batctl.data"):
        assert list(pool) == []
    assert pool.stats.bad == 30 and len(pool.bad) == 5
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 4
    assert "30 bad samples skipped in total (image: 30)" in msgs[-1]


def test_iter_parts_and_stats_reset_per_pass(tmp_path):
    a = write_laion(tmp_path / "a.tar", 2)
    b = write_laion(tmp_path / "b.tar", 3, start=10)
    pool = open_pool([a, b])
    assert [s.key for s in pool.iter_parts([1])] == ["000000010", "000000011", "000000012"]
    assert pool.stats.good == 3
    assert [s.part for s in pool] == [0, 0, 1, 1, 1]
    assert pool.stats.good == 5 and pool.stats.parts_done == 2
    with pytest.raises(Exception, match="out of range"):
        list(pool.iter_parts([2]))


def _peak_streaming(path) -> int:
    pool = open_pool([path], decode=False)
    gc.collect()
    tracemalloc.start()
    try:
        n = 0
        for _ in pool.iter_rows():
            n += 1
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_the_pool(tmp_path):
    def samples(n):
        for i in range(n):
            yield {"__key__": f"{i:09d}", "txt": f"sample {i}"}

    # an integer mtime: no PAX header per member, so the test writes and reads fast
    small = write_tar(tmp_path / "small.tar", samples(2_000), mtime=0)
    big = write_tar(tmp_path / "big.tar", samples(20_000), mtime=0)
    peak_small = _peak_streaming(small)
    peak_big = _peak_streaming(big)
    # the same buffers whatever the length; 10x the samples may not cost 64 KiB more
    assert peak_big < peak_small + 64 * 1024, (peak_small, peak_big)


def test_pool_pickles_for_worker_processes(tmp_path):
    import pickle

    pool = open_pool([write_laion(tmp_path / "a.tar", 3)])
    first = next(iter(pool))
    clone = pickle.loads(pickle.dumps(pool))
    assert [s.key for s in clone] == ["000000000", "000000001", "000000002"]
    assert clone.read(0, first.offset).same_content(first)


def test_rows_streamed_raw_decode_later_like_a_decoding_pass(tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    from batctl.data import BadSample, open_pool

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")
    path = tmp_path / "p.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "a", "jpg": buf.getvalue(), "txt": b"red square"})
        sink.write({"__key__": "b", "jpg": b"not a jpeg", "txt": b"broken"})
    decoding = list(open_pool([str(path)]).iter_rows())
    raw_pool = open_pool([str(path)], decode=False)
    late = [
        raw_pool.decoded(row) if type(row) is not BadSample else row for row in raw_pool.iter_rows()
    ]
    assert [type(r) for r in late] == [type(r) for r in decoding]
    assert late[0].same_content(decoding[0])
    assert late[1].code == decoding[1].code == "image"
    assert raw_pool.stats.good == 1 and raw_pool.stats.bad == 1
