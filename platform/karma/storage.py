"""The job's storage root (dist.storage_path) as a path or a URI, through `pyarrow.fs`.

A local folder or shared mount is used in place. An object store (`s3://bucket/prefix`, with
dist.storage_endpoint for S3-compatible stores; credentials from the usual AWS_* variables) is
written by the task that makes a folder, which puts a `_COMPLETE` marker last; a process on
any node reads a folder through a node-local cache ($KARMA_NODE_CACHE) keyed by the marker's
content digest, so every worker on a node shares one download and memory-maps it as it would a
local folder. Transient object-store errors are retried with backoff, then raise `StorageError`
naming the URI.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

COMPLETE = "_COMPLETE"  # written last into a finished folder: its files and their digest
CACHE_ENV = "KARMA_NODE_CACHE"
# Seconds slept between tries of one object-store call (len + 1 tries); about 15 s in all, so a
# store that restarts or throttles briefly is ridden out and a dead one fails within a minute.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
_CHUNK = 1 << 20
T = TypeVar("T")


class StorageError(OSError):
    """The storage root cannot be read or written (after retries)."""


def is_uri(location: str) -> bool:
    """An object-store URI (`s3://...`), as opposed to a local path or mount (`file://` too)."""
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def join(base: str, *parts: str) -> str:
    """`base` joined with `parts` by '/': for URIs and POSIX paths alike."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None) -> pafs.S3FileSystem:
    kwargs = {}
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        # an S3-compatible store ignores regions, but the signer needs one
        kwargs["region"] = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    # Few tries inside Arrow (seconds apart at most); the backoff that rides out an outage is ours.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=30,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2), **kwargs)


def filesystem(location: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) of a local path or URI; the form Ray Train's
    RunConfig(storage_filesystem=..., storage_path=...) takes (the URI's scheme stripped)."""
    if not is_uri(location):
        path = urlparse(location).path if str(location).startswith("file://") else location
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    url = urlparse(location)
    if url.scheme != "s3":
        return pafs.FileSystem.from_uri(location)
    if not url.netloc:
        raise StorageError(f"{location}: no bucket; write it as s3://bucket/prefix")
    return _s3(endpoint), join(url.netloc, url.path)


def retry(what: str, location: str, fn: Callable[[], T], delays: tuple[float, ...] | None = None) -> T:
    """fn(), tried again after each of `delays` seconds on an I/O error; a missing file is no
    transient error and raises at once."""
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except (FileNotFoundError, StorageError):
            raise
        except OSError as err:
            if attempt == len(delays):
                raise StorageError(
                    f"{what} {location} failed after {attempt + 1} tries: {err}. Check that the store is "
                    "reachable from this node (dist.storage_endpoint for an S3-compatible store), that the "
                    "bucket exists and that AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY allow it; then rerun "
                    "the job under the same tracking.run_name to resume") from err
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def write_bytes(location: str, data: bytes, endpoint: str | None = None) -> None:
    fs, path = filesystem(location, endpoint)

    def put() -> None:
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to make
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)

    retry("writing", location, put)


def read_bytes(location: str, endpoint: str | None = None) -> bytes:
    fs, path = filesystem(location, endpoint)

    def get() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retry("reading", location, get)


def exists(location: str, endpoint: str | None = None) -> bool:
    fs, path = filesystem(location, endpoint)
    return retry("checking", location, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def list_names(location: str, endpoint: str | None = None) -> list[str]:
    """Names of the entries directly under `location` ([] when it does not exist)."""
    fs, path = filesystem(location, endpoint)
    infos = retry("listing", location, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return sorted(i.base_name for i in infos)


def remove(location: str, endpoint: str | None = None) -> None:
    """Delete a file, if it exists."""
    fs, path = filesystem(location, endpoint)

    def rm() -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    retry("deleting", location, rm)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def put_dir(local: str | Path, location: str, endpoint: str | None = None) -> str:
    """Upload the files under `local` to `location`, then its `_COMPLETE` marker (the file list,
    sizes and a digest of their content); returns the digest. A reader never sees a half-written
    folder as finished: an earlier marker is removed before any file is replaced."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE)
    remove(join(location, COMPLETE), endpoint)
    fs, root = filesystem(location, endpoint)
    listing = {}
    for p in files:
        rel = p.relative_to(local).as_posix()
        listing[rel] = [p.stat().st_size, _sha256(p)]
        retry("uploading to", join(location, rel),
              lambda p=p, rel=rel: pafs.copy_files(str(p), join(root, rel), destination_filesystem=fs))
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    write_bytes(join(location, COMPLETE), json.dumps({"digest": digest, "files": listing}).encode(), endpoint)
    return digest


def marker(location: str, endpoint: str | None = None) -> dict | None:
    """A finished folder's `_COMPLETE` content ({"digest", "files"}), or None while unfinished."""
    try:
        return json.loads(read_bytes(join(location, COMPLETE), endpoint))
    except FileNotFoundError:
        return None


def node_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "karma-node-cache")


def local_dir(location: str, endpoint: str | None = None) -> Path:
    """A folder on this node's disk holding what `location` holds: a local path or mount as it
    is; an object-store folder downloaded once per node and content (its `_COMPLETE` digest)
    into the node cache, reused by every later reader there."""
    if not is_uri(location):
        return Path(filesystem(location)[1])
    done = marker(location, endpoint)
    if done is None:
        raise StorageError(f"{location} has no {COMPLETE} marker: the task that writes it did not finish. "
                           "Rerun the job; it prepares the folder again")
    target = node_cache() / done["digest"][:32]
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fs, root = filesystem(location, endpoint)
        for rel, (size, _) in done["files"].items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            retry("downloading", join(location, rel),
                  lambda rel=rel: pafs.copy_files(join(root, rel), str(tmp / rel), source_filesystem=fs))
            if (tmp / rel).stat().st_size != size:
                raise StorageError(f"{join(location, rel)}: {(tmp / rel).stat().st_size} bytes, its "
                                   f"{COMPLETE} marker says {size}; the folder changed while read, rerun")
        (tmp / COMPLETE).write_text(json.dumps(done))
        try:
            os.rename(tmp, target)  # atomic: a concurrent reader on this node sees all or nothing
        except OSError:  # another process got there first: its copy holds the same content
            if not (target / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
