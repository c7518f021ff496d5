"""JSON array and JSON Lines scanning at the byte level, without loading the whole file.

``scan_json_array`` walks a top-level JSON array and yields each element's exact bytes and
byte offset.  Strings are skipped with one regular expression (escaped quotes and brackets
inside strings are handled by the regex engine, in C), brackets are counted, and the buffer only
ever holds the element being scanned plus one read-ahead chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from .core import DEFAULT_MAX_SAMPLE_BYTES, Bad

CHUNK = 1 << 20
# a whole string, or a bracket, or a lone quote (a string not terminated inside the buffer);
# possessive quantifiers (Python 3.11+) so that a failed match never backtracks
_STR = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_TOKEN = re.compile(_STR + rb'|[\[\]{}]|"', re.S)
_STRING = re.compile(_STR, re.S)
# an object with no nested object or array: one match for a whole (Alpaca-style) record
_FLAT_OBJECT = re.compile(rb'\{(?:[^"{}\[\]]++|' + _STR + rb")*+\}", re.S)
_SCALAR_END = re.compile(rb"[,\]\s]")
_WS = b" \t\r\n"
BOM = b"\xef\xbb\xbf"


class _Reader:
    """A sliding byte window over a file: ``buf`` starts at file offset ``base``."""

    __slots__ = ("f", "buf", "base", "eof", "limit")

    def __init__(self, f: BinaryIO, base: int, limit: int = DEFAULT_MAX_SAMPLE_BYTES) -> None:
        self.f = f
        self.buf = b""
        self.base = base
        self.eof = False
        self.limit = limit

    def more(self, keep_from: int) -> int:
        """Drop ``buf[:keep_from]`` and read a chunk; returns how far positions shifted.

        Raises ElementTooLarge when what must be kept (one element) outgrows ``limit``."""
        if len(self.buf) - keep_from > self.limit:
            raise ElementTooLarge
        chunk = self.f.read(CHUNK)
        if not chunk:
            self.eof = True
        self.buf = self.buf[keep_from:] + chunk
        self.base += keep_from
        return keep_from

    def skip_ws(self, pos: int) -> int:
        """Position of the next non-whitespace byte (reading more as needed); may shift buf."""
        while True:
            buf = self.buf
            n = len(buf)
            while pos < n and buf[pos] in _WS:
                pos += 1
            if pos < n or self.eof:
                return pos
            pos -= self.more(pos)


class JSONStructureError(Exception):
    pass


class ElementTooLarge(Exception):
    """One JSON array element is larger than the sample cap."""


def _element_end(r: _Reader, start: int) -> tuple[int, int]:
    """End (exclusive) of the JSON value starting at ``start`` in ``r.buf``.

    Returns (start, end) with positions relative to the possibly shifted buffer.
    Raises JSONStructureError when the file ends first.
    """
    buf = r.buf
    first = buf[start]
    if first == 0x7B:  # {
        m = _FLAT_OBJECT.match(buf, start)
        if m is not None:
            return start, m.end()
    if first == 0x7B or first == 0x5B:  # { or [: count brackets outside strings
        depth = 0
        scan = start
        search = _TOKEN.search
        while True:
            m = search(buf, scan)
            if m is None:  # nothing structural in the rest of the window: read more
                if r.eof:
                    raise JSONStructureError("file ends inside a value")
                shift = r.more(start)
                start -= shift
                scan = len(buf) - shift
                buf = r.buf
                continue
            tok = m.group()
            if tok[0] == 0x22:  # "
                if len(tok) == 1:  # string not terminated inside the buffer
                    if r.eof:
                        raise JSONStructureError("file ends inside a string")
                    shift = r.more(start)
                    start -= shift
                    scan = m.start() - shift
                    buf = r.buf
                    continue
                scan = m.end()
                continue
            if tok == b"{" or tok == b"[":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return start, m.end()
            scan = m.end()
    if first == 0x22:
        while True:
            m = _STRING.match(buf, start)
            if m is not None:
                return start, m.end()
            if r.eof:
                raise JSONStructureError("file ends inside a string")
            start -= r.more(start)
            buf = r.buf
    while True:  # number, true, false, null
        m = _SCALAR_END.search(buf, start)
        if m is not None:
            return start, m.start()
        if r.eof:
            return start, len(buf)
        start -= r.more(start)
        buf = r.buf


def scan_json_array(
    f: BinaryIO,
    start: int | None = None,
    *,
    single: bool = False,
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> Iterator[tuple[int, bytes | None, Bad | None]]:
    """Yield ``(offset, element_bytes, bad)`` for each element of a top-level JSON array.

    ``start=None`` reads from the beginning (BOM, whitespace, ``[``); ``start=N`` parses the one
    element at byte N (``single`` then stops after it).  A structural error (text that is not a
    JSON array, a missing comma, a file that ends inside an element) yields one bad row with
    ``element_bytes=None`` and ends the scan: nothing after it can be trusted.  So does an
    element larger than ``max_bytes`` (``oversized``): finding its end would mean holding it.
    """
    r = _Reader(f, start or 0, max_bytes)
    r.more(0)
    pos = 0
    if start is None:
        while len(r.buf) < len(BOM) and not r.eof:
            r.more(0)
        if r.buf.startswith(BOM):
            pos = 3
        pos = r.skip_ws(pos)
        if pos >= len(r.buf):
            return  # empty file: no samples
        if r.buf[pos] != 0x5B:
            yield r.base + pos, None, Bad("json", "not a JSON array (first byte is not '[')")
            return
        pos = r.skip_ws(pos + 1)
        if pos < len(r.buf) and r.buf[pos] == 0x5D:
            return  # []
    while True:
        if pos >= len(r.buf):
            yield r.base + pos, None, Bad("truncated", "file ends inside the JSON array")
            return
        try:
            s, e = _element_end(r, pos)
        except JSONStructureError as exc:
            yield r.base + pos, None, Bad("truncated", f"malformed JSON array: {exc}")
            return
        except ElementTooLarge:
            bad = oversized(max_bytes, "JSON array element")
            bad.reason += "; the rest of this array is not read (JSON Lines has no such limit)"
            yield r.base + pos, None, bad
            return
        offset = r.base + s
        data = r.buf[s:e]
        if e - s > max_bytes:  # found whole within the read-ahead: skipped, the scan goes on
            yield offset, None, oversized(max_bytes, "JSON array element")
        elif r.buf[s] != 0x7B:
            yield offset, data, Bad("json", "array element is not a JSON object")
        else:
            yield offset, data, None
        if single:
            return
        pos = r.skip_ws(e)
        buf = r.buf
        if pos >= len(buf):
            yield r.base + pos, None, Bad("truncated", "file ends inside the JSON array")
            return
        c = buf[pos]
        if c == 0x5D:  # ]
            return
        if c != 0x2C:  # ,
            yield (
                r.base + pos,
                None,
                Bad("json", f"malformed JSON array: expected ',' or ']' at byte {r.base + pos}"),
            )
            return
        pos = r.skip_ws(pos + 1)
        if pos < len(r.buf) and r.buf[pos] == 0x5D:  # trailing comma: tolerated
            return


def bounded_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """``(line, length in the file)`` for each line of ``f``; ``line`` is None for a line longer
    than ``max_bytes``, which is skipped in chunks and never held whole."""
    readline = f.readline
    while True:
        line = readline(max_bytes + 1)
        if not line:
            return
        n = len(line)
        if n > max_bytes and not line.endswith(b"\n"):
            while True:  # skip the rest of the line
                rest = readline(CHUNK)
                n += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None, n
        else:
            yield line, n


def scan_jsonl(
    f: BinaryIO, start: int = 0, *, single: bool = False, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(offset, line)`` for each non-blank line (stripped of whitespace and BOM);
    ``line`` is None for a line longer than ``max_bytes`` (see :func:`bounded_lines`)."""
    off = start
    first = start == 0
    for line, n in bounded_lines(f, max_bytes):
        if line is None:
            first = False
            yield off, None
            if single:
                return
            off += n
            continue
        if first:
            first = False
            if line.startswith(BOM):
                line = line[3:]
        s = line.strip()
        if s:
            yield off, s
            if single:
                return
        off += n


def oversized(max_bytes: int, what: str = "line") -> Bad:
    """The Bad of a sample skipped for its size."""
    return Bad("oversized", f"{what} longer than the {max_bytes}-byte cap (--max-sample-mib)")
