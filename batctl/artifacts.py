"""Output directories that are complete or absent, never half-written.

Every stage writes one output directory through `open_output`:

1. take an advisory lock (`.NAME.lock` beside the output), so two processes never write one output;
2. compare the existing output's manifest with this run's stage, params and input fingerprints:
   the same -> `UpToDate` (do nothing); different, or a directory batctl did not write ->
   refuse unless `force`;
3. hand the stage a temporary sibling (`.NAME.tmp-PID`), or for resumable stages a persistent
   `.NAME.partial` whose `partial.json` must match this run's inputs to be resumed;
4. on success write `manifest.json` last (fsynced), then rename the sibling into place.

A run killed at any point leaves either the previous output or nothing at the output path; the
temporary sibling is cleaned by the next run that takes the lock. `describe()` is what
`batctl info` prints.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batctl import __version__
from batctl.errors import BatctlError, UpToDate, UsageError
from batctl.metrics.report import jsonable

MANIFEST = "manifest.json"
PARTIAL = "partial.json"
PROGRESS = "progress.json"
MIB = 1 << 20


# --------------------------------------------------------------------------- fingerprints


def fingerprint_file(path: Path, strict: bool = False, content_only: bool = False) -> str:
    """Fingerprint of one data file, as a hex sha256.

    Default: size + mtime + the first and last MiB, so a multi-GB LAION shard costs two reads.
    `strict`: size + the whole content, no mtime (a copied file keeps its fingerprint).
    `content_only`: size + the first and last MiB, no mtime: what score shards on several nodes
    use, since each node's own download of a pool file has its own mtime.
    """
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        if strict:
            h.update(f"size={st.st_size};".encode())
            for block in iter(lambda: fh.read(4 * MIB), b""):
                h.update(block)
        else:
            stamp = "" if content_only else f"mtime={st.st_mtime_ns};"
            h.update(f"size={st.st_size};{stamp}".encode())
            h.update(fh.read(MIB))
            if st.st_size > MIB:
                fh.seek(max(MIB, st.st_size - MIB))
                h.update(fh.read(MIB))
    return h.hexdigest()


def fingerprint_dir(path: Path, strict: bool = False, content_only: bool = False) -> str:
    """Fingerprint of a data directory (image folder, model dir): its files' names and
    fingerprints (`fingerprint_file`'s modes)."""
    h = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # locks, caches and our own temporary siblings are not content
        h.update(f"{rel}={fingerprint_file(file, strict, content_only)};".encode())
    return h.hexdigest()


def fingerprint_artifact(path: Path) -> str:
    """Fingerprint of a batctl output: the hash of its manifest (it names every input and param)."""
    return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()


def describe_input(
    ref: str | Path, strict: bool = False, content_only: bool = False
) -> dict[str, str]:
    """What a manifest records for one input: path, kind and fingerprint.

    `ref` is a file, a directory (a batctl artifact if it holds manifest.json) or, when nothing
    exists at that path, a hub id such as `runwayml/stable-diffusion-v1-5`. `strict` and
    `content_only` are `fingerprint_file`'s modes.
    """
    path = Path(ref)
    if path.is_file():
        return {
            "path": str(path.resolve()),
            "kind": "file",
            "fingerprint": fingerprint_file(path, strict, content_only),
        }
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return {
                "path": str(path.resolve()),
                "kind": "artifact",
                "fingerprint": fingerprint_artifact(path),
            }
        return {
            "path": str(path.resolve()),
            "kind": "dir",
            "fingerprint": fingerprint_dir(path, strict, content_only),
        }
    return {"path": str(ref), "kind": "hub", "fingerprint": f"hub:{ref}"}


def describe_model(ref: str | Path, strict: bool = False) -> dict[str, str]:
    """What every stage records for --model: `describe_input` by content, never mtime, so
    `check_same_model` compares like with like across stages and each node's own copy of the
    backbone (a sharded score run) is the same model."""
    return describe_input(ref, strict, content_only=True)


# --------------------------------------------------------------------------- manifests


def utcnow() -> str:
    """Now, as an ISO 8601 UTC timestamp with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of output `path`, or None when it has none (absent, partial or foreign)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BatctlError(
            f"{Path(path) / MANIFEST} is not valid JSON ({exc}); it is not a batctl output: "
            "choose another path"
        ) from None
    if not isinstance(manifest, dict):
        raise BatctlError(
            f"{Path(path) / MANIFEST} holds a JSON {type(manifest).__name__}, not a batctl "
            "manifest; choose another path"
        )
    return manifest


def is_complete(path: Path) -> bool:
    """True when `path` is a finished batctl output (its manifest exists)."""
    return (Path(path) / MANIFEST).is_file()


def _write_json_durably(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(jsonable(payload), fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def diff_runs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between an existing manifest and this run (stage, params, inputs)."""
    out: list[str] = []
    if old.get("stage") != new["stage"]:
        out.append(f"stage {old.get('stage')!r} -> {new['stage']!r}")
    old_params, new_params = old.get("params", {}), new["params"]
    for key in sorted(set(old_params) | set(new_params)):
        if old_params.get(key) != new_params.get(key):
            out.append(f"{key}: {old_params.get(key)!r} -> {new_params.get(key)!r}")
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            out.append(f"input {key} changed")
    return out


# --------------------------------------------------------------------------- locks


def acquire_lock(lock_path: Path, *, shared: bool = False, wait: bool = False) -> int:
    """An open fd holding flock on `lock_path` (created when absent).

    Raises BlockingIOError when `wait` is False and another process holds it. A holder removes
    the file when it lets go (`release_lock`), so after getting the lock we check that the path
    still names the inode we locked; if not, whoever we waited for has removed it and we start
    over on the new file. That is what makes removing lock files safe.
    """
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(exc.errno, "lock is held", str(lock_path)) from None
            raise
        if _same_file(lock_path, fd):
            return fd
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


def release_lock(lock_path: Path, fd: int) -> None:
    """Let go of a lock from `acquire_lock`, removing the file unless another process shares it.

    A shared holder removes it only when it can take the lock exclusively (no one else holds
    it); anyone blocked on the removed inode notices in `acquire_lock` and retries.
    """
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(lock_path, fd):
                os.unlink(lock_path)
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def output_lock(path: Path, name: str | None = None, wait: bool = False) -> Iterator[Path]:
    """Hold the advisory lock `.NAME.lock` beside output `path` for the duration.

    Raises BatctlError naming the holder's pid when another process has it, or with `wait`
    blocks until it is free (score shards queue for the store's set-up and publication). The
    lock file is removed when the run ends (short of SIGKILL; a killed run's file is simply
    locked again by the next run, since flock dies with its process).
    """
    path = Path(path)
    lock_path = path.parent / f".{name or path.name}.lock"
    try:
        fd = acquire_lock(lock_path, wait=wait)
    except BlockingIOError:
        holder = "unknown"
        with contextlib.suppress(OSError):
            holder = lock_path.read_text(errors="replace").strip() or "unknown"
        raise BatctlError(
            f"{path} is being written by another batctl process (pid {holder}); "
            "wait for it to finish or stop it"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        release_lock(lock_path, fd)


# --------------------------------------------------------------------------- output dirs


@dataclass
class Output:
    """A stage's output being written. Write files under `work`; they appear at `path` on success."""

    path: Path
    work: Path
    stage: str
    params: dict[str, Any]
    inputs: dict[str, Any]
    started: str
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def progress(self, done: int, total: int, unit: str) -> None:
        """Record how far a long stage has got (shown by `batctl info` while it runs or after a kill)."""
        _write_json_durably(
            self.work / PROGRESS, {"done": done, "total": total, "unit": unit, "updated": utcnow()}
        )


def run_identity(
    stage: str, params: Mapping[str, Any], inputs: Mapping[str, Any]
) -> dict[str, Any]:
    """What makes two runs the same run: the stage, its effective params and its inputs'
    descriptions (as a manifest records them; `diff_runs` compares two)."""
    return {"stage": stage, "params": dict(params), "inputs": dict(inputs)}


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _input_paths(inputs: Mapping[str, Any]) -> Iterator[tuple[str, Path]]:
    """(flag, resolved local path) of every input a manifest records; hub ids have none."""
    for name, value in sorted(inputs.items()):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Mapping) and item.get("kind") != "hub" and item.get("path"):
                yield "--" + name.replace("_", "-"), Path(item["path"]).resolve()


def check_out_path(path: Path, inputs: Mapping[str, Any]) -> None:
    """UsageError when writing `path` could destroy something that is not ours to replace.

    Publishing renames the old output aside and deletes it, and a failed run removes its work
    dir, so `--out` must not be, hold, or lie inside any input of the run (the model, the data,
    pool parts, upstream artifacts), nor be or hold the current directory, $HOME or /.
    """
    out = Path(path).resolve()
    if out == Path(out.anchor):
        raise UsageError(
            f"--out {path}: is the filesystem root; choose a new directory for the output"
        )
    for what, place in (
        ("the current directory", Path.cwd()),
        ("your home directory", Path.home()),
    ):
        with contextlib.suppress(OSError, RuntimeError):
            place = place.resolve()
            if out == place or place.is_relative_to(out):
                raise UsageError(
                    f"--out {path}: is or holds {what} ({place}); choose a new directory for the output"
                )
    for flag, source in _input_paths(inputs):
        if out == source:
            raise UsageError(f"--out {path}: is the {flag} input itself; choose another --out")
        if source.is_relative_to(out):
            raise UsageError(f"--out {path}: holds the {flag} input {source}; choose another --out")
        if out.is_relative_to(source):
            raise UsageError(
                f"--out {path}: lies inside the {flag} input {source}; choose another --out"
            )


def check_existing(path: Path, identity: Mapping[str, Any], force: bool) -> None:
    """Decide what an existing output means for this run: UpToDate, refusal, or go ahead.

    `force` replaces only what batctl may replace: an output of the same stage (or an empty
    directory); a file, a folder batctl did not write and another stage's output never are.
    """
    check_out_path(path, identity.get("inputs", {}))
    if not path.exists() or _is_empty_dir(path):
        return
    if not path.is_dir():
        raise BatctlError(
            f"{path} exists and is a file, not an output directory; batctl never replaces it: "
            "choose another --out"
        )
    manifest = read_manifest(path)
    if manifest is None:
        raise BatctlError(
            f"{path} exists and was not written by batctl (no {MANIFEST}); batctl never deletes "
            "a folder it did not write, even with --force: choose another --out"
        )
    if manifest.get("stage") != identity["stage"]:
        raise BatctlError(
            f"{path} holds a {manifest.get('stage', '?')} output, not a {identity['stage']} "
            "output; --force replaces only an output of the same stage: choose another --out"
        )
    differences = diff_runs(manifest, identity)
    if not differences and not force:
        raise UpToDate(path)
    if differences and not force:
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise BatctlError(
            f"{path} holds a different {manifest.get('stage', '?')} output ({shown}); "
            "pass --force to replace it or choose another --out"
        )


def _remove_stale_siblings(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def partial_dir(path: Path) -> Path:
    """Where a resumable stage keeps its unfinished work for output `path`."""
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def open_partial(path: Path, identity: Mapping[str, Any], force: bool) -> tuple[Path, bool]:
    """The `.NAME.partial` work dir for this run: resumed when its partial.json matches `identity`,
    created when absent, refused (or wiped with `force`) when it belongs to another run."""
    work = partial_dir(path)
    if work.exists():
        try:
            recorded = json.loads((work / PARTIAL).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            recorded = None
        if recorded is not None and not diff_runs(recorded, identity):
            return work, True
        if not force:
            differences = diff_runs(recorded, identity) if recorded else ["no partial.json"]
            raise BatctlError(
                f"{work} holds unfinished work from a run with other inputs or params "
                f"({'; '.join(differences[:4])}); pass --force to discard it and start over"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _write_json_durably(work / PARTIAL, {**identity, "started": utcnow()})
    return work, False


def _publish(work: Path, path: Path) -> None:
    """Move a finished work dir to `path`, replacing what is there (already checked or forced)."""
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
    os.rename(work, path)
    _fsync_dir(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _list_outputs(work: Path) -> dict[str, int]:
    return {
        p.relative_to(work).as_posix(): p.stat().st_size
        for p in sorted(work.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, PARTIAL, PROGRESS)
    }


#: errors of a write that has no path to report: the disk, a quota or a file-size limit is full
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
    if hasattr(errno, "EDQUOT")
    else {errno.ENOSPC, errno.EFBIG}
)


@contextlib.contextmanager
def naming_os_errors(path: Path) -> Iterator[None]:
    """Re-raise a path-less write error (a full disk, a quota, a file-size limit: the write call
    knows no path) as the same error naming `path`, the output being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _WRITE_ERRNOS:
            raise
        raise OSError(exc.errno, f"{exc.strerror or exc} (while writing)", str(path)) from exc


@contextlib.contextmanager
def open_output(
    path: str | Path,
    *,
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, Any],
    force: bool = False,
    resumable: bool = False,
) -> Iterator[Output]:
    """Write one stage output atomically; see the module docstring for the protocol.

    Inputs: the output path, the stage name, the effective params (JSON-ready) and the inputs
    (name -> `describe_input` dict, or a list of them). Yields an `Output` whose `work` directory
    the stage fills. Raises `UpToDate` when nothing needs doing and `BatctlError` when the output
    must not be touched. With `resumable`, work survives a crash in `.NAME.partial` and is
    resumed only by a run with identical params and inputs (`Output.resumed` says so).
    """
    path = Path(path).absolute()
    identity = run_identity(stage, params, inputs)
    check_out_path(path, inputs)  # before the lock file: it must not land inside an input
    with naming_os_errors(path), output_lock(path):
        check_existing(path, identity, force)
        _remove_stale_siblings(path)
        if resumable:
            work, resumed = open_partial(path, identity, force)
        else:
            work, resumed = path.parent / f".{path.name}.tmp-{os.getpid()}", False
            work.mkdir(parents=True)
            # Lets `batctl info` say what a running or killed stage was doing.
            _write_json_durably(work / PARTIAL, {**identity, "started": utcnow()})
        output = Output(path, work, stage, dict(params), dict(inputs), utcnow(), resumed)
        try:
            yield output
        except BaseException:
            if not resumable:
                shutil.rmtree(work, ignore_errors=True)
            raise
        finish_output(work, path, identity, output.started, output.extra)


def canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's header with sorted keys, so equal tensors and metadata give
    equal bytes: the library serialises the metadata from a hash map, whose order changes from
    process to process. The tensors' bytes and offsets are untouched."""
    import struct

    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
        header = json.loads(raw)
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        canonical += b" " * (-(8 + len(canonical)) % 8)  # the library aligns data to 8 bytes
        if canonical == raw:
            return
        staging = path.with_name(path.name + ".tmp")
        with staging.open("wb") as out:
            out.write(struct.pack("<Q", len(canonical)) + canonical)
            shutil.copyfileobj(fh, out, 4 * MIB)
    os.replace(staging, path)


#: adapter_config.json fields peft fills from a set (their order varies between runs)
_SET_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")


def canonical_adapter_config(path: Path) -> None:
    """Sort the set-valued lists of a peft adapter_config.json (peft writes `target_modules`
    in a set's order) and rewrite it strictly (no NaN), keys sorted as peft writes them."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for name in _SET_FIELDS:
        value = config.get(name)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[name] = sorted(value)
    text = json.dumps(jsonable(config), indent=2, sort_keys=True, allow_nan=False)
    if text != path.read_text(encoding="utf-8"):
        path.write_text(text, encoding="utf-8")


def canonicalize_outputs(work: Path) -> None:
    """Make a finished work dir's bytes depend only on its content: two identical runs then
    write identical files (the manifest's times and host aside)."""
    for file in sorted(work.rglob("*.safetensors")):
        canonical_safetensors(file)
    for file in sorted(work.rglob("adapter_config.json")):
        canonical_adapter_config(file)


def finish_output(
    work: Path,
    path: Path,
    identity: Mapping[str, Any],
    started: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the manifest into a finished work dir (last, fsynced) and rename it to `path`.

    The caller holds the output lock. `identity` is `run_identity(...)`; `extra` adds entries
    such as a summary to the manifest.
    """
    canonicalize_outputs(work)
    manifest = {
        **identity,
        "version": __version__,
        "outputs": _list_outputs(work),
        "started": started,
        "finished": utcnow(),
        "host": socket.gethostname(),
        **(extra or {}),
    }
    _write_json_durably(work / MANIFEST, manifest)
    _fsync_dir(work)
    _publish(work, path)
    # Removed only now: a kill before the rename must leave a partial dir that still says
    # which run it belongs to (it would otherwise be refused, and --force would discard it).
    for leftover in (PARTIAL, PROGRESS):
        (path / leftover).unlink(missing_ok=True)


# --------------------------------------------------------------------------- batctl info


def describe(path: str | Path) -> dict[str, Any]:
    """What is at `path`, for `batctl info`: a finished output, unfinished work, or neither.

    Returns a JSON-ready dict with `state` one of complete, partial, running, absent, foreign.
    """
    path = Path(path).absolute()
    if path.name.endswith(".partial") and path.name.startswith("."):
        path = path.parent / path.name[1 : -len(".partial")]
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        return {"path": str(path), "state": "complete", **manifest}
    work = partial_dir(path)
    running = sorted(path.parent.glob(f".{path.name}.tmp-*"))
    if work.is_dir() or running:
        holder = work if work.is_dir() else running[0]
        info: dict[str, Any] = {"path": str(path), "state": "partial", "work": str(holder)}
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            info.update(json.loads((holder / PARTIAL).read_text(encoding="utf-8")))
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            info["progress"] = json.loads((holder / PROGRESS).read_text(encoding="utf-8"))
        if _lock_is_held(path):
            info["state"] = "running"
        return info
    if path.exists():
        return {"path": str(path), "state": "foreign"}
    return {"path": str(path), "state": "absent"}


def _lock_is_held(path: Path) -> bool:
    lock_path = path.parent / f".{path.name}.lock"
    if not lock_path.exists():
        return False
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# --------------------------------------------------------------------------- lineage


def upstream_input(
    path: Path, name: str, _seen: frozenset[str] = frozenset()
) -> dict[str, Any] | None:
    """The input called `name` (e.g. "model") of output `path` or of the nearest artifact upstream.

    Walks the manifests' artifact inputs breadth-first, so a selection finds the model its
    score store was computed with. None when no manifest on the way records one.
    """
    queue = [Path(path)]
    seen = set(_seen)
    while queue:
        current = queue.pop(0)
        if str(current) in seen:
            continue
        seen.add(str(current))
        manifest = read_manifest(current) if current.is_dir() else None
        if manifest is None:
            continue
        inputs = manifest.get("inputs", {})
        if name in inputs and isinstance(inputs[name], dict):
            return inputs[name]
        for value in inputs.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict) and item.get("kind") == "artifact":
                    queue.append(Path(item["path"]))
    return None


def check_same_model(artifact: Path, model: Mapping[str, Any], flag: str) -> None:
    """Refuse an artifact built on another backbone than `model` (a describe_input dict)."""
    recorded = upstream_input(artifact, "model")
    if recorded is None:
        return
    if recorded.get("fingerprint") != model.get("fingerprint"):
        raise BatctlError(
            f"{flag} {artifact} was built on model {recorded.get('path')}, not {model.get('path')}; "
            "rerun the upstream stages with this --model, or pass the --model they used"
        )


def require_stage(path: Path | None, stage: str, flag: str) -> Path:
    """`path` must be a complete output of `stage`; returns it. One clear error otherwise."""
    if path is None:
        raise BatctlError(f"{flag} is required")
    manifest = read_manifest(Path(path)) if Path(path).is_dir() else None
    if manifest is None:
        state = describe(path)["state"]
        hint = (
            "it is still running or was interrupted"
            if state in ("partial", "running")
            else "no manifest.json"
        )
        raise BatctlError(f"{flag} {path}: not a finished batctl {stage} output ({hint})")
    if manifest.get("stage") != stage:
        raise BatctlError(
            f"{flag} {path}: a {manifest.get('stage')} output, expected a {stage} output"
        )
    return Path(path)
