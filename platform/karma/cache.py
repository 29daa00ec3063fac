"""Files computed once and then shared by many processes (Tune trials, the workers of several
jobs, nodes over shared storage): the process that computes one holds a lock the others wait
on, and a file appears whole or not at all."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `<path>.lock` while the body runs; the system releases it when
    the process dies, so a crash never leaves others waiting. Where the file system has no locks
    (some FUSE mounts) the body runs unlocked: atomic writes keep the files whole, and at worst
    two processes do the same work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock


def temp_sibling(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process on this host (nodes share storage)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write` into a temporary sibling, then rename it to `path`: readers see the old file or
    the whole new one, never part of it."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
