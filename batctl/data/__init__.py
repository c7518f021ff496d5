"""Pool and adaptation-set readers: streaming, constant memory, random access by (part, offset).

    pool = open_pool(["laion-{000..009}.tar", "extra/*.tar"])
    for sample in pool:                      # good samples, pool order
        sample.key, sample.part, sample.offset, sample.raw, sample.record
    for row in pool.iter_rows():             # Sample or BadSample, one row per sample, in order
        ...
    pool.read(sample.part, sample.offset)    # one sample back without a scan
    pool.iter_parts([3, 7])                  # only these parts (score --shard)
    pool.row_counts()                        # rows per part, fast (decode=False scan)

Every reader produces ``raw``, the sample in webdataset layout (extension -> bytes), and
``record`` is decoded from ``raw`` by one function for all formats
(:func:`~batctl.data.core.record_from_raw`).  So writing ``{"__key__": key, **raw}`` with
``webdataset.TarWriter`` and reading that tar back gives the same key, raw and record
(``Sample.same_content``) whatever format the sample came from.

Records: ``text``; ``instruction``/``input``/``output`` (Alpaca); ``caption`` + ``image`` (a
loaded RGB PIL image); ``meta`` (the dict of the ``.json`` member, whenever there is one).  The
image is the first of the jpg, jpeg, png, webp (then bmp, gif, tif, tiff) members; the caption is
the ``.txt`` member, else a ``.caption`` member, else the json's ``caption`` or ``text`` field.
Without an image: Alpaca fields, else the ``.txt`` member as text, else the json's ``text``.

Per-format keys and offsets
---------------------------
tar (``.tar``; ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``)
    Consecutive members with the same key form a sample.  Key rule: the extension is the
    longest known suffix of the member name, i.e. the part after the LAST dot, or the last two
    parts for the compound extensions ``json.gz``, ``txt.gz``, ... (``core.COMPOUND_EXTENSIONS``);
    the key is everything before it, dots included.  ``photo.v2.jpg`` + ``photo.v2.txt`` is
    one sample with key ``photo.v2`` and extensions ``jpg``, ``txt`` (webdataset itself splits at
    the first dot and would give key ``photo``, extensions ``v2.jpg``, ``v2.txt``).
    ``TarWriter`` writes ``key + "." + ext``, so any key survives the round trip.  Extensions
    are lower-cased; members without an extension, directories and webdataset ``__meta__``
    members are skipped; link members are counted as bad samples (see below).  webdataset-style compound extensions that are not in
    the list (``seg.png``) end up in the key.  A key that comes back later in the same tar, or
    a repeated extension, starts a new sample with the same key.
    Offset: byte offset of the sample's first header block (its GNU longname/PAX header when
    it has one).  For compressed tars the offset is a position in the DECOMPRESSED stream and
    ``read`` decompresses from the start of the file up to it (cost grows with the offset;
    prefer plain ``.tar`` for pools that are read back often).
JSON array (``.json`` whose first byte is ``[``)
    Scanned incrementally at the byte level (the file is never loaded whole).  Offset: byte
    offset of the element's ``{``.  Key: the record's ``id`` field, else its ``key`` field
    (string or integer), else ``<file stem>:<n>`` with n the 0-based element index.
    ``raw = {"json": <the element's exact bytes>}``, plus the image file's bytes under its
    extension when the record has an ``image`` path (relative to the JSON file's directory).
    A ``.json`` file whose first byte is ``{`` is read as JSON Lines (``Dataset.to_json``
    writes those) when it holds two or more one-line records; a single top-level object
    (one line or pretty-printed, e.g. ``{"data": [...]}``) is a UsageError naming the file.
JSON Lines (``.jsonl``, ``.ndjson``)
    One object per non-blank line; offset = byte offset of the line; keys and raw as for JSON
    arrays, n counting non-blank lines.
text (``.txt``)
    One sample per non-blank line, or per blank-line-separated paragraph with
    ``paragraphs=True``; offset = byte offset of the line / paragraph's first line (after a
    UTF-8 BOM); key ``<stem>:<n>``; ``raw = {"txt": bytes without the final newline}``.
image folder (a directory with images)
    Sidecar style: every image (recursive, sorted by relative path, hidden entries skipped)
    with optional same-stem ``.txt`` (caption) and ``.json`` members; key = relative path
    without extension; offset = index in that sorted listing.  ``metadata.jsonl`` style
    (diffusers / HF ImageFolder): one line per image with ``file_name`` and a ``caption`` or
    ``text`` column; key = ``file_name`` without extension; offset = byte offset of the line in
    ``metadata.jsonl``; raw = image + ``{"json": the line}``.  ``require_caption=False`` accepts
    caption-less images (DreamBooth).
``datasets.save_to_disk`` directory (``state.json`` / ``dataset_info.json``)
    Needs ``pip install 'batctl[datasets]'`` (imported lazily).  Offset = row index; key = the
    ``id``/``key`` column, else ``<dir name>:<row>``; raw = the first Image column's bytes under
    their extension + ``{"json": the other columns as JSON}``.

For ``<stem>:<n>`` keys, ``read`` looks n up in a table of the part's sample offsets
(8 bytes a sample, built by one fast scan on first use, kept for the last two parts read).
When no key can be derived (an unparseable tar header or metadata line) the key is
``@<offset>``.  Keys are unique within a part for well-formed data; duplicate ``id`` fields,
duplicate tar members or two images with the same stem (``a.jpg``, ``a.png``) in an image folder
are not checked (that would need memory that grows with the pool).

Hostile input
-------------
A sample larger than ``max_sample_bytes`` (default 16 MiB of raw bytes: a JSONL or text line,
a paragraph, a JSON array element, the members of one tar sample) is skipped without being
read whole and counted as ``oversized`` (a JSON array cannot be resynchronised after one, so
its scan ends there).  Tar members whose names hold ``..`` components, absolute paths or NUL
bytes (``unsafe_name``) and symbolic or hard link members (``link``) make their sample bad;
such names never reach ``select``'s ``samples.tar``.  A file whose magic bytes say gzip, bzip2
or xz is read decompressed whatever its name (with a warning to rename it); zstd is a
UsageError.

Bad samples
-----------
An undecodable image, a missing caption (when required), non-UTF-8 text, malformed JSON, a
record with none of the known fields, a missing image file, a truncated or damaged part: each
is logged on ``logging.getLogger("batctl.data")`` as one line ``FILE [KEY] @OFFSET: REASON``
(the first 20 per pass, then only counted, with a summary at the end of the pass), counted in
``pool.stats`` (``good``, ``bad``, ``by_code``), kept in ``pool.bad`` (first 1000) and skipped;
``iter_rows`` yields it in place as a :class:`BadSample`.  With ``strict=True`` the first one
raises :class:`~batctl.errors.BadSampleError` naming the file, key and fix.  A truncated tar
yields the samples before the cut, one bad row for the sample cut off, and ends that part.  A
part with no samples is a warning (``stats.empty_parts``), not an error.  With ``decode=False``
only what is needed for keys is checked (tar structure, JSON of records that may carry an
``id``/``key``/``image``), so fewer rows are bad, but the rows, keys and offsets are the same.
"""

from __future__ import annotations

from .core import (
    COMPOUND_EXTENSIONS,
    IMAGE_EXTENSIONS,
    KNOWN_EXTENSIONS,
    BadSample,
    Part,
    PoolStats,
    Sample,
    record_from_raw,
    split_member_name,
)
from .pool import Pool, open_pool
from .specs import detect_part, expand_braces, expand_specs

__all__ = [
    "COMPOUND_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "KNOWN_EXTENSIONS",
    "BadSample",
    "Part",
    "Pool",
    "PoolStats",
    "Sample",
    "detect_part",
    "expand_braces",
    "expand_specs",
    "open_pool",
    "record_from_raw",
    "split_member_name",
]
