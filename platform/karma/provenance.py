"""Where a result came from, as plain data for its JSON: the command, the code's git commit,
the resolved config and the hash of every data file the config reads. A result file then
says on its own what made it, without the git history or the shell that ran it."""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["provenance", "with_provenance", "hash_folder", "git_state"]

PACKAGE = Path(__file__).resolve().parent


def provenance(config: Any = None, command: str | None = None) -> dict:
    """{"command", "git_commit", "git_dirty", "config", "data_files"} for a result JSON.

    `config`: a karma Config (or its `data` section alone, or any dataclass or dict); its data
    folder (`data.path`) is hashed unless `data.source` is "synthetic", whose generator settings
    are the config itself. `data_files` maps each file under that folder (relative path) to
    the sha256 of its bytes; None when the folder is not there. `command` defaults to this
    process's command line. `git_commit` / `git_dirty` describe the checkout this package was
    imported from, both None when it is not one (an installed copy, or no git)."""
    cfg = _as_dict(config)
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else cfg
    files: dict[str, str] | None = {}
    if data.get("path") and data.get("source", "synthetic") != "synthetic":
        folder = Path(data["path"])
        files = hash_folder(folder) if folder.is_dir() else None
    commit, dirty = git_state()
    return {"command": command or shlex.join(["python", *sys.argv]), "git_commit": commit, "git_dirty": dirty,
            "config": cfg or None, "data_files": files}


def with_provenance(result: dict, prov: dict) -> dict:
    """`result` as its JSON is written: the commit it ran on and its resolved config at the top,
    where a reader looks first, and the whole `provenance(...)` (command, dirty flag, data
    hashes) under "provenance"."""
    return {"git_commit": prov["git_commit"], "config_resolved": prov["config"], **result, "provenance": prov}


def hash_folder(folder: str | Path, block: int = 1 << 20) -> dict[str, str]:
    """sha256 of every file under `folder` (recursively, sorted by path), read `block` bytes at
    a time: a file of any size costs that much memory."""
    root = Path(folder)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(block):
                digest.update(chunk)
        out[path.relative_to(root).as_posix()] = digest.hexdigest()
    return out


def git_state(folder: str | Path = PACKAGE) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether any file differs from it or is new and not ignored) of the git
    checkout that tracks `folder`, or (None, None) when none does: a pip-installed copy (even
    one inside some other repository, e.g. a virtual environment in a checkout) or a host
    without git."""
    try:
        tracked = _git(folder, "ls-files", "--error-unmatch", "--", ".")
        commit = _git(folder, "rev-parse", "HEAD") if tracked else None
        status = _git(folder, "status", "--porcelain") if commit else None
    except (OSError, subprocess.SubprocessError):  # no git executable, or it hung
        return None, None
    if status is None:
        return None, None
    return commit.strip(), bool(status.strip())


def _git(folder: str | Path, *args: str) -> str | None:
    run = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    return run.stdout if run.returncode == 0 else None


def _as_dict(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)
