"""Streaming tar reader: 512-byte headers parsed here, no per-member state kept.

Python's ``tarfile`` in stream mode appends every ``TarInfo`` to ``TarFile.members``, so its
memory grows with the pool.  This reader parses each header itself (a fast path for plain
ustar/GNU headers, ``tarfile.TarInfo.frombuf`` for anything unusual, such as base-256 sizes or
signed checksums), follows GNU longname (``L``) and PAX (``x``) extended headers, and forgets
each member once it has been added to its sample.

Rows are ``(key, offset, raw, bad)``: ``offset`` is the byte offset of the first header block
of the sample's first member (its extended header when it has one); ``bad`` is None or a
:class:`~batctl.data.core.Bad`.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from .core import DEFAULT_MAX_SAMPLE_BYTES, Bad, split_member_name

BLOCK = 512
_NUL_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_LONGNAME = b"L"
_LONGLINK = b"K"
_PAX = b"x"
_PAX_GLOBAL = b"g"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __key__-style members

try:  # lzma is optional in some Python builds
    import lzma

    _LZMA_ERRORS: tuple[type[BaseException], ...] = (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    _LZMA_ERRORS = ()

#: errors a (possibly compressed) stream raises when its data is damaged.
STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, *_LZMA_ERRORS)

Row = tuple  # (key, offset, raw | None, Bad | None)


_BIG = 64 << 20


def _read_big(f: BinaryIO, size: int) -> bytes:
    """Read a large member in chunks, so a damaged size field cannot allocate it up front."""
    chunks = []
    left = size
    while left:
        chunk = f.read(min(left, _BIG))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _code(exc: BaseException) -> str:
    """A stream that ends early is truncated; anything else is corrupt."""
    return "truncated" if isinstance(exc, EOFError) else "corrupt"


def _header(buf: bytes) -> tuple[str, int, bytes]:
    """(name, size, type) of a header block; raises tarfile.HeaderError when it is invalid."""
    chk = buf[148:156]
    size_field = buf[124:136]
    try:
        if size_field[0] & 0x80:
            raise ValueError("base-256 size")
        stored = int(chk.split(b"\0", 1)[0].strip() or b"0", 8)
        if stored != sum(buf) - sum(chk) + 256:
            raise ValueError("checksum")
        size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        name = buf[:100].split(b"\0", 1)[0]
        if buf[257:263] == b"ustar\0":  # POSIX ustar: a name prefix may be set
            prefix = buf[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        typ = buf[156:157]
        return name.decode("utf-8", "surrogateescape"), size, typ
    except ValueError:
        info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")  # raises HeaderError
        return info.name, info.size, info.type


def _parse_pax(data: bytes) -> dict[str, str]:
    """Records of a PAX extended header: ``"%d %s=%s\\n"`` each."""
    out: dict[str, str] = {}
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad PAX record length")
        record = data[space + 1 : pos + length - 1]
        name, _, value = record.partition(b"=")
        out[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


_LINKS = (b"1", b"2")


def unsafe_member_name(name: str) -> str | None:
    """Why a member name could escape the directory a tar is extracted to, or None.

    ``..`` components, absolute paths and NUL bytes: Python 3.11's ``tarfile.extractall()``
    without a filter, and many other tools, would write such a member outside the target.
    """
    if "\0" in name:
        return "its name holds a NUL byte"
    if name.startswith("/"):
        return f"its name {name!r} is an absolute path"
    if ".." in name.split("/"):
        return f"its name {name!r} has a '..' component"
    return None


def scan_tar(
    f: BinaryIO,
    start: int = 0,
    *,
    single: bool = False,
    warn: Callable[[str], None] | None = None,
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> Iterator[Row]:
    """Group the members of the tar stream ``f`` (positioned at ``start``) into samples.

    Consecutive members with the same key (see :func:`split_member_name`) form one sample; a
    repeated extension starts a new sample with the same key.  Directories, links, members
    without an extension and webdataset ``__meta__`` members are skipped.  With ``single`` the
    scan stops after the first sample (used by ``Pool.read``).

    Damage: a cut inside a header or inside member data yields one bad row for the sample in
    progress (``truncated``) and ends the part; an invalid header yields a ``corrupt`` bad row
    and ends the part.  A stream that ends exactly on a block boundary without the end-of-archive
    blocks keeps its last sample and calls ``warn``.

    Hostile members make their sample one bad row and are never read into memory: a name that
    could escape an extraction directory (``unsafe_name``), a symbolic or hard link (``link``),
    and a sample whose members add up to more than ``max_bytes`` (``oversized``; its data is
    skipped by seeking, so memory stays flat whatever the member's size).
    """
    read = f.read
    pos = start
    key: str | None = None
    raw: dict[str, bytes] = {}
    raw_size = 0
    sample_bad: Bad | None = None  # the sample in progress is bad (its members are skipped)
    sample_off = start

    def done_row() -> Row:
        if sample_bad is not None:
            return (key, sample_off, None, sample_bad)
        return (key, sample_off, raw, None)

    ext_name: str | None = None  # from a GNU longname or PAX header
    ext_size: int | None = None
    ext_off: int | None = None  # offset of the first extended header of the current member

    def flush_bad(code: str, why: str, member_key: str | None, member_off: int) -> Row:
        if member_key is not None and member_key != key:
            return (member_key, member_off, None, Bad(code, why))
        if key is not None:
            return (key, sample_off, None, Bad(code, why))
        return (member_key or f"@{member_off}", member_off, None, Bad(code, why))

    while True:
        hdr_off = pos
        try:
            buf = read(BLOCK)
        except STREAM_ERRORS as exc:
            yield flush_bad(_code(exc), f"compressed stream is damaged at {pos} ({exc})", None, pos)
            return
        n = len(buf)
        if n < BLOCK:
            if n == 0 and ext_off is None:
                if key is not None:
                    if warn is not None and not single:
                        warn("ends without the end-of-archive blocks (cut at a block boundary?)")
                    yield done_row()
                return
            yield flush_bad(
                "truncated", f"tar is truncated: cut inside the header at {hdr_off}", None, hdr_off
            )
            return
        pos += BLOCK
        if buf == _NUL_BLOCK:
            if key is not None:
                yield done_row()
            return
        try:
            name, size, typ = _header(buf)
        except tarfile.HeaderError as exc:
            yield flush_bad("corrupt", f"invalid tar header at {hdr_off} ({exc})", None, hdr_off)
            return
        pad = -size % BLOCK

        if typ in (_LONGNAME, _PAX, _LONGLINK, _PAX_GLOBAL):
            if ext_off is None:
                ext_off = hdr_off
            if size > max(max_bytes, 1 << 20):
                yield flush_bad(
                    "corrupt", f"extended header of {size} bytes at {hdr_off}", None, ext_off
                )
                return
            try:
                data = read(size + pad) if size <= _BIG else _read_big(f, size + pad)
            except STREAM_ERRORS as exc:
                yield flush_bad(_code(exc), f"damaged stream at {pos} ({exc})", None, ext_off)
                return
            if len(data) < size:
                yield flush_bad(
                    "truncated",
                    f"tar is truncated: cut inside a header at {hdr_off}",
                    None,
                    ext_off,
                )
                return
            pos += size + pad
            if typ == _LONGNAME:
                ext_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif typ == _PAX:
                try:
                    pax = _parse_pax(data[:size])
                    if "size" in pax:
                        ext_size = int(pax["size"])
                except ValueError as exc:
                    yield flush_bad(
                        "corrupt", f"invalid PAX header at {hdr_off} ({exc})", None, ext_off
                    )
                    return
                if "path" in pax:
                    ext_name = pax["path"]
            continue

        member_off = ext_off if ext_off is not None else hdr_off
        if ext_name is not None:
            name = ext_name
        if ext_size is not None:
            size = ext_size
            pad = -size % BLOCK
        ext_name = ext_size = ext_off = None

        split = None
        hostile: Bad | None = None
        if typ in _LINKS:
            hostile = Bad(
                "link", f"member {name!r} is a {'symbolic' if typ == b'2' else 'hard'} link"
            )
        elif typ in _REGULAR and not name.endswith("/") and not _META.match(name):
            why = unsafe_member_name(name)
            if why is not None:
                hostile = Bad("unsafe_name", f"member {name!r}: {why}")
            split = split_member_name(name)
        if hostile is not None:
            split = split_member_name(name)
            if split is None or "\0" in split[0]:
                split = (f"@{member_off}", "")
        if split is None or hostile is not None:  # not read: skip its data
            if size + pad:
                try:
                    f.seek(size + pad, 1)
                except STREAM_ERRORS as exc:
                    yield flush_bad(_code(exc), f"damaged stream in {name} ({exc})", None, pos)
                    return
                pos += size + pad
            if hostile is None:
                continue
        mkey, ext = split
        if mkey != key or ext in raw:
            if key is not None:
                yield done_row()
                if single:
                    return
            key, raw, raw_size, sample_bad, sample_off = mkey, {}, 0, None, member_off
        if hostile is not None:
            sample_bad = sample_bad or hostile
            raw[ext] = b""  # a repeated extension still starts a new sample
            continue
        if sample_bad is not None or raw_size + size > max_bytes:
            if sample_bad is None:
                sample_bad = Bad(
                    "oversized",
                    f"member {name} makes the sample {raw_size + size} bytes, more than the "
                    f"{max_bytes}-byte cap (--max-sample-mib)",
                )
            try:
                f.seek(size + pad, 1)
            except STREAM_ERRORS as exc:
                yield (key, sample_off, None, Bad(_code(exc), f"damaged stream in {name} ({exc})"))
                return
            raw[ext] = b""
            pos += size + pad
            continue
        raw_size += size
        try:
            data = read(size) if size <= _BIG else _read_big(f, size)
            if pad:
                read(pad)
        except STREAM_ERRORS as exc:
            yield (
                key,
                sample_off,
                None,
                Bad(_code(exc), f"damaged stream in member {name} ({exc})"),
            )
            return
        if len(data) < size:
            yield (
                key,
                sample_off,
                None,
                Bad("truncated", f"tar is truncated: member {name} cut at {pos + len(data)}"),
            )
            return
        raw[ext] = data
        pos += size + pad
