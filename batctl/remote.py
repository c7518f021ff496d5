"""URLs for score stores and pools: s3:// (s3fs), gs:// (gcsfs), az:// (adlfs) through fsspec.

Only `score --out`, `score --pool`, `select --scores` and the pool parts a selection fetches
accept URLs; every other path flag is local, and a URL there (or an unsupported scheme such as
`memory://` or `file://`) is refused with one line, so nothing ever writes a local directory
named `s3:`. Credentials and endpoints come from the usual places of each library (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for MinIO or another
S3-compatible server, ~/.aws).

Remote pool parts are copied once into a local cache (`$BATCTL_CACHE`, default
`~/.cache/batctl`) keyed by URL, size and ETag, because the pool readers seek by byte offset; a
remote store that `select` reads is mirrored there the same way (its manifest decides whether
the copy is current).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batctl.errors import BatctlError

SCHEMES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Path() folds "s3://b/x" into "s3:/b/x": a leading "scheme:" is a URL given to a path flag.
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def is_url(text: Any) -> bool:
    """Whether `text` is written as a URL (scheme://...)."""
    return isinstance(text, str) and bool(_URL.match(text))


def url_problem(text: Any, flag: str, remote_ok: bool) -> str | None:
    """Why `text` cannot be used for `flag`, or None. `remote_ok`: the flag takes store URLs."""
    text = str(text)
    match = _URL.match(text) or _SCHEME_PREFIX.match(text)
    if match is None:
        return None
    scheme = match.group(1).lower()
    if not remote_ok:
        return (
            f"{flag} {text}: a URL, but this flag takes local paths only "
            "(score --out/--pool and select --scores accept s3://, gs://, az:// URLs)"
        )
    if scheme not in SCHEMES or not _URL.match(text):
        return f"{flag} {text}: unsupported URL; give a local path or an s3://, gs:// or az:// URL"
    package = SCHEMES[scheme]
    if importlib.util.find_spec(package) is None:
        return f"{flag} {text}: {scheme}:// needs the {package} package (pip install {package})"
    return None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path without the scheme) for `url`, its listing cache dropped so other
    processes' writes are seen."""
    import fsspec

    fs, path = fsspec.url_to_fs(url)
    fs.invalidate_cache()
    return fs, path


def join(root: str | Path, name: str) -> str:
    """`root/name` for a local path or a URL."""
    if is_url(str(root)):
        return str(root).rstrip("/") + "/" + name
    return str(Path(root) / name)


def exists(url: str) -> bool:
    """Whether an object exists at `url`."""
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def read_json(url: str) -> dict[str, Any] | None:
    """The JSON object at `url`, or None when there is none."""
    fs, path = filesystem(url)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_json(url: str, payload: dict[str, Any]) -> None:
    """Write `payload` at `url` in one PUT (an object appears whole or not at all)."""
    fs, path = filesystem(url)
    fs.pipe_file(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def cache_root() -> Path:
    """Where remote pool parts and mirrored stores are kept."""
    return Path(os.environ.get("BATCTL_CACHE") or Path.home() / ".cache" / "batctl")


def expand_url_spec(spec: str) -> list[str]:
    """One --pool URL spec: braces expanded by batctl, wildcards listed on the server."""
    from batctl.data.specs import expand_braces

    urls: list[str] = []
    for text in expand_braces(spec):
        fs, path = filesystem(text)
        if any(c in path for c in "*?["):
            scheme = _URL.match(text).group(1)  # type: ignore[union-attr]
            urls += [f"{scheme}://{p}" for p in sorted(fs.glob(path))]
        else:
            urls.append(text)
    return urls


def local_copy(url: str) -> Path:
    """A local copy of the object at `url`, downloaded once (re-downloaded when it changes)."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise BatctlError(f"--pool {url}: no such object") from None
    tag = f"{url}|{info.get('size')}|{info.get('ETag') or info.get('etag') or info.get('mtime')}"
    target = cache_root() / "pool" / hashlib.sha256(tag.encode()).hexdigest()[:24]
    local = target / Path(path).name
    if not local.is_file():
        target.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + f".tmp-{os.getpid()}")
        fs.get_file(path, str(partial))
        os.replace(partial, local)
    return local


def localize(specs: str | Sequence[str]) -> list[tuple[str, str]]:
    """(what the user named, local path to read) for every pool part `specs` expand to: URL parts
    are fetched into the cache, local specs are passed through unexpanded."""
    items = [specs] if isinstance(specs, str) else list(specs)
    out: list[tuple[str, str]] = []
    for spec in items:
        if is_url(str(spec)):
            out += [(url, str(local_copy(url))) for url in expand_url_spec(str(spec))]
        else:
            out.append((str(spec), str(spec)))
    return out


def local_specs(specs: str | Sequence[str]) -> list[str]:
    """`specs` with every URL part replaced by its local copy."""
    return [local for _, local in localize(specs)]


def mirror_store(url: str) -> Path:
    """A local copy of the score directory at `url` (manifest, target, scores.zarr), refreshed
    when the remote manifest differs from the copy's or the store is unfinished."""
    import shutil

    fs, path = filesystem(url)
    if not fs.exists(path):
        raise BatctlError(f"--scores {url}: nothing there")
    local = cache_root() / "stores" / hashlib.sha256(url.encode()).hexdigest()[:24]
    remote_manifest = read_json(join(url, "manifest.json"))
    try:
        cached = json.loads((local / "manifest.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        cached = None
    if remote_manifest is not None and cached == remote_manifest:
        return local
    staging = local.with_name(local.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in fs.ls(path, detail=False):
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if fs.isdir(name):
            fs.get(name.rstrip("/") + "/", str(staging / base), recursive=True)
        else:
            fs.get_file(name, str(staging / base))
    shutil.rmtree(local, ignore_errors=True)
    os.replace(staging, local)
    return local
