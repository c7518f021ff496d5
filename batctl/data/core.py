"""Data model shared by every reader: Sample, BadSample, Part, the member-name rule, records.

Every reader turns its format into ``(key, offset, raw)`` where ``raw`` is the sample in
webdataset layout (extension -> bytes).  The decoded ``record`` is then built from ``raw`` alone
by :func:`record_from_raw`, the same function for every format, so a sample written into a tar
by ``select`` (``{"__key__": key, **raw}`` through ``webdataset.TarWriter``) decodes to the same
record when that tar is read back.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Largest sample a reader takes (raw bytes): one hostile line or member must not exhaust memory.
DEFAULT_MAX_SAMPLE_BYTES = 16 << 20

#: Image members, in the order in which a sample's image is looked for (the first present wins).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

#: Members that webdataset.TarWriter gzips when their extension gets a ".gz" suffix.
GZIPPABLE_EXTENSIONS: tuple[str, ...] = (
    "txt", "text", "caption", "json", "jsonl", "cls", "cls2", "npy", "pth", "pt", "pickle",
    "pkl", "pyd", "ten", "cbor", "mp", "msgpack", "md", "html", "xml", "csv", "tsv", "yaml", "yml",
)  # fmt: skip

#: Extensions batctl knows (documentation, sniffing and image folders).  A member name is
#: split at its LAST dot, except that the two-part extensions in COMPOUND_EXTENSIONS are kept
#: whole, so this is also "strip the longest known suffix": any key may contain dots.
KNOWN_EXTENSIONS: frozenset[str] = frozenset(
    (*IMAGE_EXTENSIONS, *GZIPPABLE_EXTENSIONS, "ppm", "pgm", "pbm", "index", "idx", "npz",
     "wav", "flac", "mp3", "ogg", "mp4", "webm", "avi", "mkv")
)  # fmt: skip

#: Two-part extensions kept whole ("000001.json.gz" -> key "000001", extension "json.gz").
COMPOUND_EXTENSIONS: frozenset[str] = frozenset(f"{e}.gz" for e in GZIPPABLE_EXTENSIONS)

#: Image file suffixes recognised in image folders (lower case, without the dot).
IMAGE_FILE_SUFFIXES: frozenset[str] = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
)


def split_member_name(name: str) -> tuple[str, str] | None:
    """Split a tar member name into (key, extension), or None when it has no extension.

    The extension is the longest known suffix: the last dot-separated component, or the last
    two when they form one of :data:`COMPOUND_EXTENSIONS`.  Everything before it, dots
    included, is the key: ``photo.v2.jpg`` -> (``photo.v2``, ``jpg``), where webdataset itself
    splits at the first dot of the base name and gives (``photo``, ``v2.jpg``).  Because
    ``TarWriter`` writes ``key + "." + ext``, every (key, ext) this returns is given back by
    reading what ``TarWriter`` wrote for it.  The extension is lower-cased (as webdataset does).
    A name whose base name starts with its only dot (``.DS_Store``) has no key and no extension.
    """
    slash = name.rfind("/")
    dot = name.rfind(".")
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    ext = name[dot + 1 :].lower()
    dot2 = name.rfind(".", slash + 2, dot)
    if dot2 > slash + 1:
        ext2 = name[dot2 + 1 :].lower()
        if ext2 in COMPOUND_EXTENSIONS:
            return name[:dot2], ext2
    return name[:dot], ext


@dataclass(frozen=True)
class Part:
    """One file or directory of a pool.

    ``kind`` is one of "tar", "json", "jsonl", "txt", "imagefolder", "hf_dataset";
    ``compression`` is None, "gz", "bz2" or "xz" (tar, json, jsonl and txt parts only; offsets
    are then positions in the decompressed stream).
    """

    path: Path
    kind: str
    index: int
    compression: str | None = None


@dataclass(frozen=True)
class Sample:
    """One good sample.

    ``key``: stable, unique within its part for well-formed data (see the per-format rules in
    :mod:`batctl.data`).  ``part``: index into ``Pool.parts``.  ``offset``: where the sample
    starts in its part, so ``Pool.read(part, offset)`` fetches it back without a scan.
    ``raw``: the sample in webdataset layout (extension -> bytes).  ``record``: decoded and
    normalised (``text``; ``instruction``/``input``/``output``; ``caption``; ``image`` as a
    loaded RGB ``PIL.Image``; ``meta``, the dict of the ``.json`` member); empty when the pool
    was opened with ``decode=False``.
    """

    key: str
    part: int
    offset: int
    raw: dict[str, bytes]
    record: dict[str, Any]

    def same_content(self, other: Sample) -> bool:
        """Same key, raw bytes and record (images compared by mode, size and pixels)."""
        if self.key != other.key or self.raw != other.raw:
            return False
        if self.record.keys() != other.record.keys():
            return False
        for name, value in self.record.items():
            theirs = other.record[name]
            if name == "image":
                if (value.mode, value.size, value.tobytes()) != (
                    theirs.mode,
                    theirs.size,
                    theirs.tobytes(),
                ):
                    return False
            elif value != theirs:
                return False
        return True


@dataclass(frozen=True)
class BadSample:
    """One unreadable sample, in its place in the pool's row order.

    ``key`` is the sample's key when it could be derived, else ``"@<offset>"``.  ``code`` is a
    short machine-readable cause (see :data:`FIXES`), ``reason`` the human one.
    """

    path: str
    part: int
    key: str
    offset: int
    reason: str
    code: str = "bad"

    @property
    def fix(self) -> str:
        return FIXES.get(self.code, FIXES["bad"])

    def line(self) -> str:
        """The one-line report: ``FILE [KEY] @OFFSET: REASON``."""
        return f"{self.path} [{self.key}] @{self.offset}: {self.reason}"


#: What to tell the user for each kind of bad sample (the ``fix`` of ``BadSampleError``).
FIXES: dict[str, str] = {
    "image": "the image bytes cannot be decoded: re-download or drop this sample, "
    "or run without --strict to skip it",
    "caption": "add a .txt member or a 'caption'/'text' field; for caption-less sets "
    "(DreamBooth) open the data with require_caption=False",
    "utf8": "text members must be UTF-8: re-encode the file, or run without --strict to skip it",
    "json": "fix the JSON of this record, or run without --strict to skip it",
    "fields": "a record needs 'text', Alpaca 'instruction'/'output', or an image with a "
    "caption; fix it or run without --strict to skip it",
    "missing_file": "the file this record names does not exist: fix the path, or run "
    "without --strict to skip it",
    "truncated": "the file is cut off (interrupted download or copy): fetch it again; the "
    "samples before the cut are still read without --strict",
    "corrupt": "the file's structure is damaged from here on: fetch it again; the samples "
    "before it are still read without --strict",
    "unsafe_name": "a tar member name with '..', an absolute path or a NUL byte could write "
    "outside the directory it is extracted to: rename the member, or run without --strict to "
    "skip it",
    "link": "symbolic and hard link members are not read (they could point anywhere): store "
    "the file itself, or run without --strict to skip it",
    "oversized": "the sample is larger than --max-sample-bytes: raise the cap if it is "
    "genuine, or run without --strict to skip it",
    "compressed": "the file is compressed though its name says otherwise: rename it "
    "(.tar.gz, .jsonl.gz, ...) so it is read as what it is",
    "bad": "fix or drop this sample, or run without --strict to skip it",
}


@dataclass
class PoolStats:
    """Counts for the current (or last) pass over a pool; reset when a pass starts."""

    good: int = 0
    bad: int = 0
    by_code: Counter = field(default_factory=Counter)
    parts_done: int = 0
    empty_parts: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.good + self.bad

    def as_dict(self) -> dict[str, Any]:
        return {
            "good": self.good,
            "bad": self.bad,
            "by_code": dict(self.by_code),
            "parts_done": self.parts_done,
            "empty_parts": list(self.empty_parts),
        }


class Bad(Exception):
    """Raised inside readers and record building; becomes a BadSample."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# records


def decode_image(data: bytes):
    """Decode image bytes into a loaded RGB PIL image; Bad("image") when they cannot be."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Image.UnidentifiedImageError:
        raise Bad("image", "undecodable image (not a recognised image format)") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Bad("image", f"undecodable image ({msg})") from None


def decode_text(data: bytes, what: str) -> str:
    """`data` as UTF-8 text; a Bad record (naming `what`, the member) when it is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Bad("utf8", f"{what} is not UTF-8 (byte {exc.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


def decode_json(data: bytes, what: str = ".json member") -> Any:
    """The JSON value in UTF-8 `data`; a Bad record (naming `what`) when it does not parse."""
    text = decode_text(data, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Bad("json", f"malformed JSON in {what} ({exc.msg} at char {exc.pos})") from None


def image_ext_of(raw: dict[str, bytes]) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return ext
    return None


def record_from_raw(raw: dict[str, bytes], *, require_caption: bool = True) -> dict[str, Any]:
    """Decode and normalise one sample (raises Bad).

    - ``.json`` member: must be a JSON object; kept as ``meta``.
    - image: the first of jpg, jpeg, png, webp (then bmp, gif, tif, tiff); decoded to RGB.  Caption: the ``.txt`` member,
      else a ``.caption`` member, else the ``caption`` or ``text`` field of the json; required
      unless ``require_caption=False``.
    - no image: Alpaca (``instruction`` + ``output``, ``input`` defaulting to ""), else the
      ``.txt`` member as ``text``, else a ``text`` field of the json.
    """
    record: dict[str, Any] = {}
    meta = None
    if "json" in raw:
        meta = decode_json(raw["json"])
        if not isinstance(meta, dict):
            raise Bad("json", f".json member is a JSON {type(meta).__name__}, not an object")
        record["meta"] = meta
    img_ext = image_ext_of(raw)
    if img_ext is not None:
        caption = None
        if "txt" in raw:
            caption = decode_text(raw["txt"], "caption").strip()
        elif "caption" in raw:
            caption = decode_text(raw["caption"], "caption").strip()
        elif meta is not None:
            for name in ("caption", "text"):
                value = meta.get(name)
                if isinstance(value, str):
                    caption = value.strip()
                    break
        if caption:
            record["caption"] = caption
        elif require_caption:
            raise Bad("caption", "missing caption (no .txt member, no caption/text field)")
        record["image"] = decode_image(raw[img_ext])
        return record
    if (
        meta is not None
        and isinstance(meta.get("instruction"), str)
        and isinstance(meta.get("output"), str)
    ):
        inp = meta.get("input")
        record["instruction"] = meta["instruction"]
        record["input"] = inp if isinstance(inp, str) else ""
        record["output"] = meta["output"]
        return record
    if "txt" in raw:
        text = decode_text(raw["txt"], "text")
        if not text.strip():
            raise Bad("fields", "empty text")
        record["text"] = text
        return record
    if meta is not None and isinstance(meta.get("text"), str):
        if not meta["text"].strip():
            raise Bad("fields", "empty text")
        record["text"] = meta["text"]
        return record
    if meta is not None and isinstance(meta.get("caption"), str):
        raise Bad("fields", "record has a caption but no image")
    if meta is not None:
        # A known field of the wrong type: name it, rather than "none of the known fields".
        for name in ("text", "instruction", "output", "caption"):
            if name in meta and not isinstance(meta[name], str):
                raise Bad(
                    "fields",
                    f"field {name!r} must be a string, got {type(meta[name]).__name__}",
                )
    have = ", ".join(sorted(meta)) if meta is not None else ", ".join(sorted(raw))
    raise Bad(
        "fields",
        "record has none of the known fields (text, instruction+output, image+caption); "
        f"it has: {have or 'nothing'}",
    )


def sniff_image_ext(data: bytes) -> str | None:
    """The extension of encoded image bytes from their magic number (jpg, png, webp, gif, ...)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def image_member_ext(path_or_name: str, data: bytes | None = None) -> str:
    """The raw extension under which an image file is stored (jpeg -> jpeg, JPG -> jpg)."""
    suffix = Path(path_or_name).suffix.lower().lstrip(".")
    if suffix in IMAGE_FILE_SUFFIXES:
        return suffix
    sniffed = sniff_image_ext(data or b"")
    return sniffed or (suffix or "img")
