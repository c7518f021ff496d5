"""Helpers for the batctl.data tests: real webdataset tars, JPEGs, JSON and text files."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from PIL import Image

from batctl.data import Pool, Sample, open_pool

_JPEGS: dict[tuple, bytes] = {}


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    k = (color, size)
    if k not in _JPEGS:
        buf = io.BytesIO()
        Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=90)
        _JPEGS[k] = buf.getvalue()
    return _JPEGS[k]


def png(color: tuple[int, int, int] = (10, 200, 30), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def laion_sample(i: int, caption: str | None = None, **extra) -> dict:
    """A sample in img2dataset's layout: 000000001.jpg / .txt / .json."""
    caption = caption if caption is not None else f"a photo number {i}"
    sample = {
        "__key__": f"{i:09d}",
        "jpg": jpeg(((i * 37) % 256, (i * 91) % 256, 128)),
        "txt": caption,
        "json": json.dumps(
            {
                "url": f"https://example.com/{i}.jpg",
                "caption": caption,
                "key": f"{i:09d}",
                "width": 8,
                "height": 8,
            }
        ),
    }
    sample.update(extra)
    return sample


def write_tar(path: Path, samples: Iterable[dict], **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), **kw) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def write_laion(path: Path, n: int, start: int = 0) -> Path:
    return write_tar(path, (laion_sample(i) for i in range(start, start + n)))


def roundtrip_tar(samples: Iterable[Sample], path: Path) -> Path:
    """What `select` does: write {"__key__": key, **raw} with TarWriter."""
    return write_tar(path, ({"__key__": s.key, **s.raw} for s in samples))


def assert_read_back(pool: Pool) -> list[Sample]:
    """Every streamed sample equals the one read back by (part, offset)."""
    streamed = list(pool)
    for s in streamed:
        back = pool.read(s.part, s.offset)
        assert back.part == s.part and back.offset == s.offset
        assert back.same_content(s), (s.key, back.key)
    return streamed


def assert_roundtrip(streamed: list[Sample], tmp: Path, **open_kw) -> None:
    """Writing the samples with TarWriter and reading the tar gives equal samples."""
    path = roundtrip_tar(streamed, tmp / "roundtrip.tar")
    again = list(open_pool([path], **open_kw))
    assert [s.key for s in again] == [s.key for s in streamed]
    for a, b in zip(again, streamed, strict=True):
        assert a.same_content(b), a.key
