"""One reader per part kind.  Each turns its part into rows ``(key, offset, raw, bad)``.

``key`` is None in a row from ``read_one`` when the key is the sample's index in its part
(``<stem>:<n>``) and the caller must look the index up; ``raw`` is None for bad rows.
"""

from __future__ import annotations

import abc
import bz2
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import BadSampleError
from .core import (
    DEFAULT_MAX_SAMPLE_BYTES,
    IMAGE_FILE_SUFFIXES,
    Bad,
    Part,
    decode_json,
    image_member_ext,
)
from .jsonio import BOM, bounded_lines, oversized, scan_json_array, scan_jsonl
from .tario import STREAM_ERRORS, scan_tar

Row = tuple  # (key | None, offset, raw | None, Bad | None)

STREAM_BUFFER = 1 << 20


def open_stream(part: Part, buffering: int = STREAM_BUFFER) -> BinaryIO:
    """The part's bytes, decompressed when it is compressed (offsets are then positions in the
    decompressed stream and seeking to one decompresses everything before it)."""
    if part.compression is None:
        return open(part.path, "rb", buffering=buffering)
    if part.compression == "gz":
        return gzip.open(part.path, "rb")
    if part.compression == "bz2":
        return bz2.open(part.path, "rb")
    if part.compression == "xz":
        import lzma

        return lzma.open(part.path, "rb")
    raise ValueError(f"unknown compression {part.compression!r}")


def _id_key(obj: dict[str, Any]) -> str | None:
    """The record's own key: its ``id`` field, else its ``key`` field (a string or integer)."""
    for name in ("id", "key"):
        value = obj.get(name)
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, str) and value):
            return str(value)
    return None


def _load_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Bad("missing_file", f"file not found: {path}") from None
    except OSError as exc:
        raise Bad("missing_file", f"cannot read {path} ({exc.strerror or exc})") from None


_MAY_MATTER = re.compile(rb'"(?:id|key|image)"|\\u')


def _needs_parse(data: bytes) -> bool:
    """Whether a JSON record may hold an id/key or image field (decode=False fast path)."""
    return _MAY_MATTER.search(data) is not None


def json_record_raw(
    data: bytes, base_dir: Path, decode: bool
) -> tuple[str | None, dict[str, bytes] | None, Bad | None]:
    """(own key or None, raw, bad) of one JSON record read from a .json/.jsonl file."""
    obj = None
    if decode or _needs_parse(data):
        try:
            obj = decode_json(data, "JSON record")
        except Bad as bad:
            return None, None, bad
        if not isinstance(obj, dict):
            return None, None, Bad("json", f"record is a JSON {type(obj).__name__}, not an object")
    raw: dict[str, bytes] = {"json": data}
    if obj is None:
        return None, raw, None
    key = _id_key(obj)
    image = obj.get("image")
    if isinstance(image, str) and image:
        if "://" in image:
            return (
                key,
                None,
                Bad("missing_file", f"image {image!r} is a URL; batctl reads local files only"),
            )
        path = Path(image) if os.path.isabs(image) else base_dir / image
        try:
            data_img = _load_file(path)
        except Bad as bad:
            return key, None, bad
        raw[image_member_ext(image, data_img)] = data_img
    return key, raw, None


class Reader(abc.ABC):
    """One part's format: streams its rows and reads one row back by offset."""

    def __init__(
        self, part: Part, *, paragraphs: bool = False, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
    ) -> None:
        self.part = part
        self.paragraphs = paragraphs
        self.max_bytes = max_bytes
        self.stem = _stem(part.path)

    #: whether keys are ``<stem>:<n>`` indices that read_one cannot know without an index
    index_keys = False

    @abc.abstractmethod
    def rows(self, decode: bool, warn: Callable[[str], None] | None = None) -> Iterator[Row]:
        """Every row of the part in order: (key, offset, raw, Bad or None)."""

    @abc.abstractmethod
    def read_one(self, offset: int) -> Row:
        """The row that starts at `offset`, parsed on its own."""


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix in (".tar", ".tgz", ".json", ".jsonl", ".ndjson", ".txt"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class TarReader(Reader):
    def rows(self, decode, warn=None):
        with open_stream(self.part) as f:
            yield from scan_tar(f, 0, warn=warn, max_bytes=self.max_bytes)

    def read_one(self, offset):
        with open_stream(self.part, buffering=1 << 16) as f:
            try:
                f.seek(offset)
            except STREAM_ERRORS as exc:
                return (
                    f"@{offset}",
                    offset,
                    None,
                    Bad("truncated", f"cannot seek to {offset} ({exc})"),
                )
            for row in scan_tar(f, offset, single=True, max_bytes=self.max_bytes):
                return row
        return (f"@{offset}", offset, None, Bad("corrupt", f"no sample at offset {offset}"))


class JsonArrayReader(Reader):
    index_keys = True

    def rows(self, decode, warn=None):
        base_dir = self.part.path.parent
        with open_stream(self.part) as f:
            n = 0
            for offset, data, bad in scan_json_array(f, max_bytes=self.max_bytes):
                default = f"{self.stem}:{n}"
                n += 1
                if bad is not None:
                    yield (default, offset, None, bad)
                    continue
                key, raw, bad = json_record_raw(data, base_dir, decode)
                yield (key or default, offset, raw, bad)

    def read_one(self, offset):
        with open_stream(self.part, buffering=1 << 16) as f:
            f.seek(offset)
            for off, data, bad in scan_json_array(f, offset, single=True, max_bytes=self.max_bytes):
                if bad is not None or data is None:
                    return (None, off, None, bad)
                key, raw, bad = json_record_raw(data, self.part.path.parent, True)
                return (key, off, raw, bad)
        return (None, offset, None, Bad("json", f"no JSON element at offset {offset}"))


class JsonlReader(Reader):
    index_keys = True

    def rows(self, decode, warn=None):
        base_dir = self.part.path.parent
        with open_stream(self.part) as f:
            for n, (offset, line) in enumerate(scan_jsonl(f, max_bytes=self.max_bytes)):
                if line is None:
                    yield (f"{self.stem}:{n}", offset, None, oversized(self.max_bytes))
                    continue
                key, raw, bad = json_record_raw(line, base_dir, decode)
                yield (key or f"{self.stem}:{n}", offset, raw, bad)

    def read_one(self, offset):
        with open_stream(self.part, buffering=1 << 16) as f:
            f.seek(offset)
            for off, line in scan_jsonl(f, offset, single=True, max_bytes=self.max_bytes):
                if line is None:
                    return (None, off, None, oversized(self.max_bytes))
                key, raw, bad = json_record_raw(line, self.part.path.parent, True)
                return (key, off, raw, bad)
        return (None, offset, None, Bad("json", f"no JSON line at offset {offset}"))


def scan_text(
    f: BinaryIO,
    start: int = 0,
    *,
    paragraphs: bool = False,
    single: bool = False,
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> Iterator[tuple[int, bytes | None]]:
    """(offset, bytes) of each non-blank line, or of each blank-line-separated paragraph;
    bytes is None for a line or paragraph longer than ``max_bytes`` (never held whole)."""
    off = start
    first = start == 0
    para_off = -1
    lines: list[bytes] = []
    para_size = 0
    too_big = False
    for line, n in bounded_lines(f, max_bytes):
        if line is None:
            first = False
            if not paragraphs:
                yield off, None
                if single:
                    return
            else:
                if para_off < 0:
                    para_off = off
                lines, too_big = [b"x"], True
            off += n
            continue
        if first:
            first = False
            if line.startswith(BOM):
                line = line[3:]
                off += 3
                n -= 3
        if line.strip():
            if not paragraphs:
                yield off, line.rstrip(b"\r\n")
                if single:
                    return
            else:
                if para_off < 0:
                    para_off = off
                para_size += n
                if too_big or para_size > max_bytes:
                    lines, too_big = [b"x"], True  # keep only the fact that there is one
                else:
                    lines.append(line)
        elif lines:
            yield para_off, None if too_big else b"".join(lines).rstrip(b"\r\n")
            if single:
                return
            para_off, lines, para_size, too_big = -1, [], 0, False
        off += n
    if lines:
        yield para_off, None if too_big else b"".join(lines).rstrip(b"\r\n")


class TextReader(Reader):
    index_keys = True

    def rows(self, decode, warn=None):
        with open_stream(self.part) as f:
            scan = scan_text(f, paragraphs=self.paragraphs, max_bytes=self.max_bytes)
            for n, (offset, data) in enumerate(scan):
                if data is None:
                    yield (f"{self.stem}:{n}", offset, None, oversized(self.max_bytes))
                else:
                    yield (f"{self.stem}:{n}", offset, {"txt": data}, None)

    def read_one(self, offset):
        with open_stream(self.part, buffering=1 << 16) as f:
            f.seek(offset)
            scan = scan_text(
                f, offset, paragraphs=self.paragraphs, single=True, max_bytes=self.max_bytes
            )
            for off, data in scan:
                if data is None:
                    return (None, off, None, oversized(self.max_bytes))
                return (None, off, {"txt": data}, None)
        return (None, offset, None, Bad("fields", f"no text at offset {offset}"))


class ImageFolderReader(Reader):
    """Images with same-stem ``.txt``/``.json`` sidecars (offset = index in the sorted listing),
    or a ``metadata.jsonl`` with ``file_name`` (offset = byte offset of the line)."""

    def __init__(self, part, **kw):
        super().__init__(part, **kw)
        self.metadata = part.path / "metadata.jsonl"
        self._listing: list[str] | None = None

    @property
    def uses_metadata(self) -> bool:
        return self.metadata.is_file()

    def listing(self) -> list[str]:
        if self._listing is None:
            self._listing = list_images(self.part.path)
        return self._listing

    def _sidecar_row(self, index: int, rel: str) -> Row:
        path = self.part.path / rel
        key = rel.rsplit(".", 1)[0]
        try:
            data = _load_file(path)
        except Bad as bad:
            return (key, index, None, bad)
        raw = {image_member_ext(rel, data): data}
        for ext in ("txt", "json"):
            side = path.with_suffix("." + ext)
            if side.is_file():
                try:
                    raw[ext] = _load_file(side)
                except Bad as bad:
                    return (key, index, None, bad)
        return (key, index, raw, None)

    def _metadata_row(self, offset: int, line: bytes) -> Row:
        try:
            obj = decode_json(line, "metadata.jsonl line")
        except Bad as bad:
            return (f"@{offset}", offset, None, bad)
        name = obj.get("file_name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or not name:
            return (f"@{offset}", offset, None, Bad("fields", "metadata line has no file_name"))
        key = name.rsplit(".", 1)[0] if "." in Path(name).name else name
        try:
            data = _load_file(self.part.path / name)
        except Bad as bad:
            return (key, offset, None, bad)
        return (key, offset, {image_member_ext(name, data): data, "json": line}, None)

    def rows(self, decode, warn=None):
        if self.uses_metadata:
            with open(self.metadata, "rb") as f:
                for offset, line in scan_jsonl(f, max_bytes=self.max_bytes):
                    if line is None:
                        yield (f"@{offset}", offset, None, oversized(self.max_bytes))
                    else:
                        yield self._metadata_row(offset, line)
        else:
            for i, rel in enumerate(self.listing()):
                yield self._sidecar_row(i, rel)

    def read_one(self, offset):
        if self.uses_metadata:
            with open(self.metadata, "rb") as f:
                f.seek(offset)
                for off, line in scan_jsonl(f, offset, single=True, max_bytes=self.max_bytes):
                    if line is None:
                        return (f"@{off}", off, None, oversized(self.max_bytes))
                    return self._metadata_row(off, line)
            return (f"@{offset}", offset, None, Bad("json", f"no metadata line at {offset}"))
        listing = self.listing()
        if not 0 <= offset < len(listing):
            return (f"@{offset}", offset, None, Bad("missing_file", f"no image number {offset}"))
        return self._sidecar_row(offset, listing[offset])


def list_images(root: Path) -> list[str]:
    """Image files under ``root`` (recursive, hidden entries skipped), sorted, as posix paths."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            if name.rsplit(".", 1)[-1].lower() in IMAGE_FILE_SUFFIXES and "." in name:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                out.append(rel.replace(os.sep, "/"))
    out.sort()
    return out


class HFDatasetReader(Reader):
    """A ``datasets.Dataset.save_to_disk`` directory; offset = row index."""

    BATCH = 256

    def __init__(self, part, **kw):
        super().__init__(part, **kw)
        self._ds = None
        self._image_cols: list[str] = []

    def dataset(self):
        if self._ds is None:
            import datasets

            try:
                ds = datasets.load_from_disk(str(self.part.path))
            except Exception as exc:  # datasets raises many kinds for a damaged directory
                raise BadSampleError(
                    self.part.path,
                    None,
                    f"cannot load this datasets directory ({exc})",
                    "point at a directory written by Dataset.save_to_disk (one split)",
                ) from None
            if not isinstance(ds, datasets.Dataset):
                raise BadSampleError(
                    self.part.path,
                    None,
                    "holds several splits",
                    "point at one split's directory",
                )
            image_cols = [
                name for name, feat in ds.features.items() if isinstance(feat, datasets.Image)
            ]
            for name in image_cols:
                ds = ds.cast_column(name, datasets.Image(decode=False))
            self._image_cols = image_cols
            self._ds = ds
        return self._ds

    def _row(self, index: int, row: dict[str, Any]) -> Row:
        key = _id_key(row) or f"{self.stem}:{index}"
        raw: dict[str, bytes] = {}
        for name in self._image_cols:
            value = row.pop(name, None)
            if not raw and isinstance(value, dict):
                data = value.get("bytes")
                path = value.get("path") or ""
                if data is None and path:
                    try:
                        data = _load_file(Path(path))
                    except Bad as bad:
                        return (key, index, None, bad)
                if data is not None:
                    raw[image_member_ext(path, data)] = data
        try:
            text = json.dumps(row, ensure_ascii=False, default=str)
        except (TypeError, ValueError) as exc:
            return (key, index, None, Bad("json", f"row cannot be written as JSON ({exc})"))
        raw["json"] = text.encode("utf-8")
        return (key, index, raw, None)

    def rows(self, decode, warn=None):
        ds = self.dataset()
        n = len(ds)
        for start in range(0, n, self.BATCH):
            batch = ds[start : start + self.BATCH]
            cols = list(batch)
            for j, values in enumerate(zip(*(batch[c] for c in cols), strict=True)):
                yield self._row(start + j, dict(zip(cols, values, strict=True)))

    def read_one(self, offset):
        ds = self.dataset()
        if not 0 <= offset < len(ds):
            return (f"@{offset}", offset, None, Bad("fields", f"no row {offset}"))
        return self._row(offset, dict(ds[offset]))


READERS: dict[str, type[Reader]] = {
    "tar": TarReader,
    "json": JsonArrayReader,
    "jsonl": JsonlReader,
    "txt": TextReader,
    "imagefolder": ImageFolderReader,
    "hf_dataset": HFDatasetReader,
}


def make_reader(
    part: Part, *, paragraphs: bool = False, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
) -> Reader:
    """The reader for one pool or data part, by its kind (tar, jsonl, folder, ...); `paragraphs`
    splits text records into paragraphs, `max_bytes` caps one sample's size in bytes."""
    return READERS[part.kind](part, paragraphs=paragraphs, max_bytes=max_bytes)
