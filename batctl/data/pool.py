"""The Pool: every part of a pool spec, streamed in order, with random access by (part, offset)."""

from __future__ import annotations

import logging
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from os import PathLike

from ..errors import BadSampleError, UsageError
from .core import DEFAULT_MAX_SAMPLE_BYTES, Bad, BadSample, Part, PoolStats, Sample, record_from_raw
from .formats import Reader, make_reader
from .specs import detect_part, expand_specs
from .tario import STREAM_ERRORS

log = logging.getLogger("batctl.data")

#: bad samples logged in full per pass; the rest are counted (and logged at DEBUG level)
MAX_LOGGED = 20
#: bad samples kept in ``Pool.bad``
MAX_BAD = 1000
#: parts whose offset -> index table ``read`` keeps (only formats with ``<stem>:<n>`` keys)
INDEX_CACHE = 2


class Pool:
    """The samples of one or more parts, in pool order (parts in spec order, samples in file
    order).

    Iteration streams: memory does not grow with the pool.  ``stats`` and ``bad`` describe the
    current (or last) pass and are reset when a new pass starts.
    """

    def __init__(
        self,
        parts: Sequence[Part],
        *,
        strict: bool = False,
        paragraphs: bool = False,
        require_caption: bool = True,
        decode: bool = True,
        on_bad: Callable[[BadSample], object] | None = None,
        max_bad: int = MAX_BAD,
        max_logged: int = MAX_LOGGED,
        max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    ) -> None:
        self.parts: list[Part] = list(parts)
        self.max_sample_bytes = max_sample_bytes
        self.strict = strict
        self.paragraphs = paragraphs
        self.require_caption = require_caption
        self.decode = decode
        self.on_bad = on_bad
        self.max_bad = max_bad
        self.max_logged = max_logged
        self.stats = PoolStats()
        self.bad: list[BadSample] = []
        self._readers: dict[int, Reader] = {}
        self._indexes: OrderedDict[int, array] = OrderedDict()

    def __repr__(self) -> str:
        return f"Pool({len(self.parts)} parts, decode={self.decode}, strict={self.strict})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = {}
        state["_indexes"] = OrderedDict()
        return state

    # -- streaming --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Sample]:
        """Every good sample, in pool order; bad ones are reported and skipped."""
        return self.iter_parts(range(len(self.parts)))

    def iter_parts(self, indices: Iterable[int]) -> Iterator[Sample]:
        """The good samples of these parts only (in the order given), e.g. one score shard."""
        for row in self.iter_rows(indices):
            if type(row) is Sample:
                yield row

    def iter_rows(self, indices: Iterable[int] | None = None) -> Iterator[Sample | BadSample]:
        """Every sample, good (Sample) or not (BadSample), in pool order: one row per sample,
        the same rows with decode=True or decode=False, so a store can be laid out by a fast
        decode=False pass and filled by a decoding one."""
        idx = list(range(len(self.parts))) if indices is None else list(indices)
        for i in idx:
            if not isinstance(i, int) or not 0 <= i < len(self.parts):
                raise UsageError(f"part index {i!r} out of range (the pool has {len(self.parts)})")
        self.stats = PoolStats()
        self.bad = []
        for i in idx:
            yield from self._part_rows(i)
        self._summary()

    def row_counts(self, indices: Iterable[int] | None = None) -> list[int]:
        """Rows (good and bad samples) of each part, by a fast decode=False scan that neither
        logs nor touches ``stats``: what a store needs to lay out one row per sample, and
        the first row of every part for sharded scoring."""
        idx = list(range(len(self.parts))) if indices is None else list(indices)
        counts = []
        for i in idx:
            if not isinstance(i, int) or not 0 <= i < len(self.parts):
                raise UsageError(f"part index {i!r} out of range (the pool has {len(self.parts)})")
            try:
                counts.append(sum(1 for _ in self._reader(i).rows(False)))
            except STREAM_ERRORS as exc:
                raise BadSampleError(
                    self.parts[i].path,
                    None,
                    f"cannot read ({exc})",
                    "check that the file exists and is readable",
                ) from None
        return counts

    def _part_rows(self, i: int) -> Iterator[Sample | BadSample]:
        part = self.parts[i]
        reader = self._reader(i)
        decode, require_caption = self.decode, self.require_caption
        stats = self.stats
        path = str(part.path)
        count = 0
        rows = reader.rows(decode, warn=lambda msg: log.warning("%s: %s", path, msg))
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except STREAM_ERRORS as exc:
                raise BadSampleError(
                    part.path,
                    None,
                    f"cannot read ({exc})",
                    "check that the file exists and is readable",
                ) from None
            key, offset, raw, bad = row
            count += 1
            record: dict = {}
            if bad is None and decode:
                try:
                    record = record_from_raw(raw, require_caption=require_caption)
                except Bad as exc:
                    bad = exc
            if bad is None:
                stats.good += 1
                yield Sample(key, i, offset, raw, record)
            else:
                yield self._report(BadSample(path, i, key, offset, bad.reason, bad.code))
        if count == 0:
            log.warning("%s: no samples (empty %s part)", path, part.kind)
            stats.empty_parts.append(path)
        stats.parts_done += 1

    def _report(self, bad: BadSample) -> BadSample:
        stats = self.stats
        stats.bad += 1
        stats.by_code[bad.code] += 1
        if len(self.bad) < self.max_bad:
            self.bad.append(bad)
        if self.on_bad is not None:
            self.on_bad(bad)
        if self.strict:
            raise BadSampleError(
                bad.path, bad.key, f"{bad.reason} (at offset {bad.offset})", bad.fix
            )
        if stats.bad <= self.max_logged:
            log.warning("skipped %s", bad.line())
        else:
            log.debug("skipped %s", bad.line())
        return bad

    def _summary(self) -> None:
        stats = self.stats
        if stats.bad > self.max_logged:
            causes = ", ".join(f"{code}: {n}" for code, n in stats.by_code.most_common())
            log.warning(
                "%d bad samples skipped in total (%s); the first %d are listed above",
                stats.bad,
                causes,
                self.max_logged,
            )

    def decoded(self, row: Sample) -> Sample | BadSample:
        """Decode one row streamed with ``decode=False``, reported like a decoding pass would.

        Lets a resumed or sharded scorer stream the cheap raw rows and decode only the rows it
        still has to score.
        """
        try:
            record = record_from_raw(row.raw, require_caption=self.require_caption)
        except Bad as bad:
            self.stats.good -= 1  # the raw pass counted it good
            path = str(self.parts[row.part].path)
            return self._report(
                BadSample(path, row.part, row.key, row.offset, bad.reason, bad.code)
            )
        return Sample(row.key, row.part, row.offset, row.raw, record)

    # -- random access ------------------------------------------------------------------------

    def read(self, part: int, offset: int) -> Sample:
        """The sample that starts at ``offset`` in part ``part`` (as given by a Sample or the
        score store), parsed on its own; BadSampleError when it is unreadable."""
        if not 0 <= part < len(self.parts):
            raise UsageError(f"part index {part} out of range (the pool has {len(self.parts)})")
        p = self.parts[part]
        reader = self._reader(part)
        try:
            key, off, raw, bad = reader.read_one(offset)
        except STREAM_ERRORS as exc:
            raise BadSampleError(
                p.path,
                None,
                f"cannot read at offset {offset} ({exc})",
                "check that the file exists and is readable",
            ) from None
        if key is None:
            key = f"{reader.stem}:{self._index_of(part, offset)}"
        if bad is None and self.decode:
            try:
                record = record_from_raw(raw, require_caption=self.require_caption)
            except Bad as exc:
                bad = exc
        else:
            record = {}
        if bad is not None:
            fix = BadSample(str(p.path), part, key, offset, bad.reason, bad.code).fix
            raise BadSampleError(p.path, key, f"{bad.reason} (at offset {offset})", fix)
        return Sample(key, part, off, raw, record)

    def _index_of(self, part: int, offset: int) -> int:
        """The sample number of ``offset`` in a part whose keys are ``<stem>:<n>``: a table of
        the part's sample offsets (8 bytes a sample) is built by one scan on first use."""
        table = self._indexes.get(part)
        if table is None:
            reader = self._reader(part)
            table = array("q", (row[1] for row in reader.rows(False)))
            self._indexes[part] = table
            while len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(part)
        n = bisect_left(table, offset)
        if n >= len(table) or table[n] != offset:
            raise BadSampleError(
                self.parts[part].path,
                None,
                f"no sample starts at offset {offset}",
                "offsets must come from this pool's samples or its score store",
            )
        return n

    def _reader(self, i: int) -> Reader:
        reader = self._readers.get(i)
        if reader is None:
            reader = make_reader(
                self.parts[i], paragraphs=self.paragraphs, max_bytes=self.max_sample_bytes
            )
            self._readers[i] = reader
        return reader


def open_pool(
    specs: Sequence[str | PathLike] | str | PathLike,
    *,
    strict: bool = False,
    paragraphs: bool = False,
    require_caption: bool = True,
    decode: bool = True,
    on_bad: Callable[[BadSample], object] | None = None,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> Pool:
    """Open a pool or adaptation set from one or more specs (see :func:`expand_specs`).

    ``strict``: the first bad sample raises BadSampleError (file, key, fix) instead of being
    reported and skipped.  ``paragraphs``: ``.txt`` parts give one sample per blank-line
    separated paragraph instead of per line.  ``require_caption=False``: images without a
    caption are good samples (DreamBooth instance sets).  ``decode=False``: no image decoding
    and no record validation, ``record`` is ``{}`` (fast index passes).  ``on_bad``: called
    with every BadSample.  ``max_sample_bytes``: a larger sample (line, element, tar sample) is
    skipped without being read whole and reported as ``oversized``.
    """
    paths = expand_specs(specs)
    if not paths:
        raise UsageError("no data given")
    parts = [detect_part(p, i) for i, p in enumerate(paths)]
    return Pool(
        parts,
        strict=strict,
        paragraphs=paragraphs,
        require_caption=require_caption,
        decode=decode,
        on_bad=on_bad,
        max_sample_bytes=max_sample_bytes,
    )
