"""Chosen samples back from the pool, and the selection's samples.tar (select's outputs).

`Fetcher` reads a selection's rows by (part, offset) from the score store, with no scan of the
pool; `write_tars` writes every value's samples.tar in one pass over the chosen rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batctl.errors import BatctlError
from batctl.selection_files import SAMPLES_TAR


class Fetcher:
    """Chosen samples back from the pool by (part, offset): no scan, each sample checked
    against the store's key (a pool edited since scoring is an error, not a wrong sample)."""

    def __init__(self, source: Any, pool_paths: list[str]) -> None:
        from batctl.data import open_pool

        self.source = source
        self.store = source.store
        self.pool = open_pool(
            pool_paths,
            paragraphs=bool(source.params.get("paragraphs", False)),
            decode=False,
            max_sample_bytes=int(source.params.get("max_sample_mib", 16)) << 20,  # as scored
        )
        self._part: Any = None
        self._offset: Any = None
        self._keys: Any = None
        self._locations: dict[int, tuple[int, int, str]] = {}
        self._cache: dict[int, Any] = {}

    def load_all_locations(self, keys: Any) -> None:
        """Read the part and offset columns whole (for --dedupe, which reads rows one by one);
        `keys` is the store's key column."""
        self._part = self.store.column("part")
        self._offset = self.store.column("offset")
        self._keys = keys

    def locate(self, rows: Any, keys: Any) -> None:
        """Read part and offset of `rows` only; `keys` is the store's key column."""
        from batctl.selection import read_locations

        if self._part is not None:
            return
        part, offset = read_locations(self.store, rows)
        self._locations = {
            int(r): (int(p), int(o), str(keys[r]))
            for r, p, o in zip(rows.tolist(), part.tolist(), offset.tolist(), strict=True)
        }

    def where(self, row: int) -> tuple[int, int, str]:
        """(part, offset, key) of store row `row`."""
        if self._part is not None:
            return int(self._part[row]), int(self._offset[row]), str(self._keys[row])
        return self._locations[row]

    def raw_row(self, row: int, keep: bool = False) -> Any:
        """The sample of store row `row` (raw bytes, not decoded)."""
        sample = self._cache.get(row)
        if sample is not None:
            return sample
        part, offset, key = self.where(row)
        sample = self.pool.read(part, offset)
        if sample.key != key:
            raise BatctlError(
                f"{self.pool.parts[part].path}: the sample at offset {offset} is {sample.key!r}, "
                f"but the score store expects {key!r}: the pool changed since it was scored; "
                "rescore it (batctl score --force)"
            )
        if keep:
            self._cache[row] = sample
        return sample

    def decoded(self, row: int) -> Any:
        """The decoded sample of `row` (for previews and gradients)."""
        from batctl.data import BadSample

        sample = self.pool.decoded(self.raw_row(row, keep=True))
        if isinstance(sample, BadSample):
            raise BatctlError(
                f"{sample.path} [{sample.key}]: {sample.reason}; it was readable when scored, so "
                "the pool changed: rescore it (batctl score --force)"
            )
        return sample


class SampleTar:
    """Writes samples as `webdataset.TarWriter` does (one member `KEY.EXT` per raw member, in
    sorted extension order, user and group "bigdata", mode 0o444), with a fixed mtime so the
    same selection gives the same bytes. Members are written verbatim: TarWriter would gzip a
    `json.gz` member a second time. Plain tarfile, because importing webdataset imports torch
    and select's default path must start fast."""

    def __init__(self, path: Path, mtime: float = 0.0) -> None:
        import tarfile

        self._tarfile = tarfile
        # PAX writes plain ustar headers for ordinary names (TarWriter's bytes exactly) and
        # extended headers only for long or non-ASCII keys, which ustar cannot hold.
        self.tar = tarfile.open(str(path), "w", format=tarfile.PAX_FORMAT)
        self.mtime = mtime

    def write(self, key: str, raw: dict[str, bytes]) -> None:
        import io

        from batctl.data.tario import unsafe_member_name

        for ext in sorted(raw):
            data = raw[ext]
            why = unsafe_member_name(f"{key}.{ext}")
            if why is not None:  # the readers never yield such a sample; refuse, never write it
                raise BatctlError(f"sample {key!r} cannot go into samples.tar: {why}")
            info = self._tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def write_tars(work: Path, plan: Any, fetch: Fetcher | None, top_level: bool) -> None:
    """Every value's samples.tar in one pass over the stream: each chosen sample is read once
    (by part and offset) and written to the tar of every value whose prefix holds it."""
    from batctl.console import progress_bar

    dirs = [(work, 0)] if top_level else [(work / v.name, v.count) for v in plan.values]
    writers: list[tuple[SampleTar, int]] = []
    try:
        for directory, count in dirs:
            directory.mkdir(exist_ok=True)
            writers.append((SampleTar(directory / SAMPLES_TAR), count))
        longest = max((count for _, count in dirs), default=0)
        if longest:
            with progress_bar("fetching selected samples", longest) as advance:
                for j, row in enumerate(plan.stream[:longest].tolist()):
                    sample = fetch.raw_row(row)  # type: ignore[union-attr]
                    for writer, count in writers:
                        if j < count:
                            writer.write(sample.key, sample.raw)
                    advance(1)
    finally:
        for writer, _ in writers:
            writer.close()
