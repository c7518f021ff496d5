"""Pool specs: brace expansion, globs, directories, and the detection of each part's format."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import BatctlError, UsageError
from .core import DEFAULT_MAX_SAMPLE_BYTES, IMAGE_FILE_SUFFIXES, Part
from .tario import STREAM_ERRORS

log = logging.getLogger("batctl.data")

_RANGE_INT = re.compile(r"^([+-]?\d+)\.\.([+-]?\d+)(?:\.\.([+-]?\d+))?$")
_RANGE_CHR = re.compile(r"^([a-zA-Z])\.\.([a-zA-Z])(?:\.\.([+-]?\d+))?$")
_MAX_EXPANSION = 1_000_000

#: file suffixes a part may have (after an optional .gz/.bz2/.xz)
DATA_SUFFIXES = (".tar", ".tgz", ".tbz2", ".txz", ".json", ".jsonl", ".ndjson", ".txt")
_COMPRESSION = {".gz": "gz", ".bz2": "bz2", ".xz": "xz"}


def _range_values(inner: str) -> list[str] | None:
    m = _RANGE_INT.match(inner)
    if m:
        a_s, b_s, step_s = m.groups()
        a, b = int(a_s), int(b_s)
        step = abs(int(step_s)) if step_s else 1
        step = step or 1
        width = 0
        if any(len(s.lstrip("+-")) > 1 and s.lstrip("+-").startswith("0") for s in (a_s, b_s)):
            width = max(len(a_s), len(b_s))
        if abs(b - a) // step + 1 > _MAX_EXPANSION:
            raise UsageError(f"brace range {{{inner}}} expands to too many values")
        seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [f"{v:0{width}d}" if width else str(v) for v in seq]
    m = _RANGE_CHR.match(inner)
    if m:
        a, b = ord(m.group(1)), ord(m.group(2))
        step = abs(int(m.group(3))) if m.group(3) else 1
        step = step or 1
        seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [chr(v) for v in seq]
    return None


def expand_braces(text: str) -> list[str]:
    """Bash-style brace expansion: ``{a,b}``, ``{000..099}`` (zero padding kept), ``{1..9..2}``,
    ``{a..e}``, nested and several per string.  Braces that are not an expansion (no comma, no
    range, unbalanced) stay literal."""
    search_from = 0
    while True:
        start = text.find("{", search_from)
        if start < 0:
            return [text]
        depth = 0
        commas: list[int] = []
        end = -1
        for j in range(start, len(text)):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    end = j
                    break
            elif c == "," and depth == 1:
                commas.append(j)
        if end < 0:
            return [text]
        inner = text[start + 1 : end]
        if commas:
            bounds = [start, *commas, end]
            alternatives = [text[bounds[i] + 1 : bounds[i + 1]] for i in range(len(bounds) - 1)]
        else:
            alternatives = _range_values(inner)
            if alternatives is None:
                search_from = start + 1
                continue
        prefix, suffix = text[:start], text[end + 1 :]
        out: list[str] = []
        for alt in alternatives:
            out.extend(expand_braces(prefix + alt + suffix))
            if len(out) > _MAX_EXPANSION:
                raise UsageError(f"{text!r} expands to too many paths")
        return out


def _dedupe_key(path: Path) -> str:
    try:
        return str(path.resolve())
    except OSError:
        return os.path.abspath(path)


def hf_dataset_dir(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' save_to_disk."""
    return (path / "state.json").is_file() or (path / "dataset_info.json").is_file()


def dir_kind(path: Path) -> str | None:
    """ "hf_dataset", "imagefolder", or None for a plain directory of data files."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError):
            splits = []
        hint = ", ".join(str(path / s) for s in splits) or f"{path}/<split>"
        raise UsageError(f"{path} holds several dataset splits; give one of: {hint}")
    if hf_dataset_dir(path):
        return "hf_dataset"
    if (path / "metadata.jsonl").is_file():
        return "imagefolder"
    for _dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_FILE_SUFFIXES:
                return "imagefolder"
    return None


def _is_data_file(name: str) -> bool:
    low = name.lower()
    for suffix in _COMPRESSION:
        if low.endswith(suffix):
            low = low[: -len(suffix)]
            break
    return low.endswith(DATA_SUFFIXES)


def expand_specs(specs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Expand pool specs into part paths, in order, without duplicates.

    Each spec is brace-expanded inside batctl (make and sh pass ``{000..099}`` through), then
    globbed (``*``, ``?``, ``[...]``, ``**``; matches sorted).  A directory that is neither an
    image folder nor a ``datasets`` directory stands for the data files directly inside it
    (sorted).  A spec, or one of its brace expansions, that matches nothing is a UsageError
    naming it.  ``~`` is expanded.  Duplicates (same resolved path) keep their first place.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    out: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        k = _dedupe_key(path)
        if k not in seen:
            seen.add(k)
            out.append(path)

    for spec in specs:
        spec_s = os.fspath(spec)
        if not spec_s.strip():
            raise UsageError("empty data spec")
        if "://" in spec_s:
            raise UsageError(
                f"{spec_s!r}: remote pools are not read directly; download the shards first"
            )
        for pattern in expand_braces(spec_s):
            pattern = os.path.expanduser(pattern)
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern, recursive=True))
                if not matches:
                    raise UsageError(f"data spec {spec_s!r} matches no files ({pattern!r})")
                paths = [Path(m) for m in matches]
            else:
                path = Path(pattern)
                if not path.exists():
                    if pattern == spec_s:
                        raise UsageError(f"data spec {spec_s!r} matches no files")
                    raise UsageError(f"data spec {spec_s!r}: part {pattern!r} does not exist")
                paths = [path]
            for path in paths:
                if path.is_dir() and dir_kind(path) is None:
                    files = sorted(
                        p for p in path.iterdir() if p.is_file() and _is_data_file(p.name)
                    )
                    if not files:
                        raise UsageError(
                            f"data spec {spec_s!r}: directory {path} holds no images, no "
                            f"datasets files and no data files ({', '.join(DATA_SUFFIXES)})"
                        )
                    for p in files:
                        add(p)
                else:
                    add(path)
    return out


def _sniff_json(path: Path, compression: str | None) -> str:
    """ "json" for a top-level array, "jsonl" for one object per line (``Dataset.to_json``).

    A file whose first value is an object but that is not JSON Lines of two or more records
    (one object, pretty-printed or not, e.g. ``{"data": [...]}``) is a UsageError naming it:
    reading it as one record would silently train or score on the wrong thing.
    """
    from .formats import open_stream
    from .jsonio import bounded_lines

    part = Part(path, "json", 0, compression)
    try:
        with open_stream(part, buffering=1 << 14) as f:
            head = f.read(1 << 14)
        head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if head[:1] != b"{":
            return "json"
        records: list[bytes | None] = []
        with open_stream(part, buffering=1 << 14) as f:
            for line, _ in bounded_lines(f, DEFAULT_MAX_SAMPLE_BYTES):
                if line is None or line.strip(b"\xef\xbb\xbf \t\r\n"):
                    records.append(line)
                    if len(records) == 2:
                        break
    except (*STREAM_ERRORS, ValueError):
        return "json"  # unreadable: the scan reports it, with the file name
    if len(records) == 2 and (records[1] is None or records[1].lstrip().startswith(b"{")):
        return "jsonl"
    raise UsageError(
        f"{path}: holds a single JSON object, not an array of records or JSON Lines; put the "
        "records in a top-level array [...], or one object per line (a one-record set: name it "
        ".jsonl)"
    )


#: magic bytes of the compressions a part may use without saying so in its name
_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
_ZSTD = b"\x28\xb5\x2f\xfd"


def _sniff_compression(path: Path) -> str | None:
    """The compression a file's magic bytes announce (gz, bz2, xz), None for none.

    A gzip file named ``.tar`` would otherwise read as a damaged tar ("truncated ... fetch it
    again"); zstd, which the standard library cannot read, is a UsageError naming the file.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None  # the reader reports it, with the path
    if head.startswith(_ZSTD):
        raise UsageError(
            f"{path}: is zstd-compressed; decompress it first (zstd -d), batctl reads plain, "
            ".gz, .bz2 and .xz files"
        )
    for magic, compression in _MAGIC:
        if head.startswith(magic):
            log.warning(
                "%s: is %s-compressed though its name does not say so; read as compressed "
                "(rename it to %s)",
                path,
                compression,
                f"{path.name}.{compression}",
            )
            return compression
    return None


def detect_part(path: Path, index: int) -> Part:
    """The Part for one expanded path: its kind from its suffix or its directory content."""
    if path.is_dir():
        kind = dir_kind(path)
        if kind is None:
            raise UsageError(f"{path}: a directory of data files, not a part (expand it first)")
        if kind == "hf_dataset" and importlib.util.find_spec("datasets") is None:
            raise BatctlError(
                f"{path} is a Hugging Face datasets directory; reading it needs the datasets "
                "package: pip install 'batctl[datasets]'"
            )
        return Part(path, kind, index)
    name = path.name.lower()
    if name.endswith(".tgz"):
        return Part(path, "tar", index, "gz")
    if name.endswith((".tbz2", ".tbz")):
        return Part(path, "tar", index, "bz2")
    if name.endswith(".txz"):
        return Part(path, "tar", index, "xz")
    compression = None
    for suffix, comp in _COMPRESSION.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    if compression is None and name.endswith((".tar", ".jsonl", ".ndjson", ".json", ".txt")):
        compression = _sniff_compression(path)
    if name.endswith(".tar"):
        return Part(path, "tar", index, compression)
    if name.endswith((".jsonl", ".ndjson")):
        return Part(path, "jsonl", index, compression)
    if name.endswith(".json"):
        return Part(path, _sniff_json(path, compression), index, compression)
    if name.endswith(".txt"):
        return Part(path, "txt", index, compression)
    raise UsageError(
        f"{path}: unknown data format (expected .tar[.gz], .json, .jsonl, .txt, an image "
        "folder or a datasets save_to_disk directory)"
    )
