"""The MLflow model registry: model versions of training exports, aliases, promotion, and the
local cache serving loads versions through.

Used on the driver (registration, promotion) and in serving replicas (resolving an alias,
downloading a version). Runs themselves are `karma.tracking`'s.

Naming rules worth knowing:
- MLflow reserves the alias "latest": it always means the newest version. `register_export`
  therefore never sets it, and `alias_version` / `export_dir_of` resolve it to the newest
  version; `set_alias` and `promote_if_better` refuse it.
- A registered model version carries its headline metrics as tags `metric.<key>` (see
  `metric_tags`); `promote_if_better` compares those.
- A version is logged as MLflow "models from code": its code is the file `pyfunc_model.py`
  (`PYFUNC_CODE`), its weights the export folder (artifact "export"); nothing is pickled.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException

from karma.tracking import RunTracker, _as_float, _client, _quoted, _slug, mlflow_key, set_global_uris


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    """Model-version tags `metric.<key>` that `promote_if_better` reads."""
    return {f"metric.{mlflow_key(k)}": repr(float(v)) for k, v in metrics.items()}


# The registered model's code (MLflow "models from code"): logged by path, run at load time.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def _requirements() -> list[str]:
    # Explicit requirements: MLflow's inference would load the model in a subprocess.
    reqs = []
    for dist in ("mlflow", "numpy", "pandas", "torch"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def register_export(
    tracker: RunTracker,
    export_dir: str | Path,
    registered_name: str,
    alias: str | None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Log `export_dir` as a pyfunc model of the tracker's run, register it, set `alias`.

    `tags` become model-version tags (use `metric_tags` for the metrics that promotion
    compares). Returns the new version number as a string.
    """
    export = Path(export_dir)
    if not export.is_dir() or not any(export.iterdir()):
        raise FileNotFoundError(f"export_dir {str(export)!r} is missing or empty; export first")
    if not registered_name:
        raise ValueError("registered_name is empty; set tracking.registered_model")
    set_global_uris(tracker.tracking_uri)
    client = tracker.client
    # Create the logged model against the tracker's run and experiment ourselves: without an
    # active run, log_model would otherwise file it under the default experiment.
    logged = client.create_logged_model(
        experiment_id=tracker.experiment_id,
        name="model",
        source_run_id=tracker.run_id,
        model_type="karma-interest",
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),  # a code file, not a pickled object
        artifacts={"export": str(export.resolve())},
        registered_model_name=registered_name,
        model_id=logged.model_id,
        pip_requirements=_requirements(),
    )
    client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version, mlflow_key(key), str(value))
    if alias and not _is_latest(alias):  # "latest" already means this newest version
        client.set_registered_model_alias(registered_name, alias, version)
    tracker.set_tags({"registered_model": registered_name, "registered_version": version})
    return version


def _is_latest(alias: str) -> bool:
    return alias.lower() == "latest"


def _refuse_latest(alias: str) -> None:
    if _is_latest(alias):
        raise ValueError(
            f"alias {alias!r} is reserved by MLflow for the newest version and cannot be moved; "
            "use another alias name such as 'champion'"
        )


def _newest_version(client: MlflowClient, name: str) -> str | None:
    versions = client.search_model_versions(f"name = {_quoted(name, 'registered model name')}")
    numbers_ = [int(v.version) for v in versions]
    return str(max(numbers_)) if numbers_ else None


def alias_version(name: str, alias: str, tracking_uri: str) -> str | None:
    """The version that holds `alias` ("latest": the newest), or None when there is none."""
    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if _is_latest(alias):
        return _newest_version(client, name)
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: str) -> None:
    _refuse_latest(alias)
    client = _client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise LookupError(
            f"registered model {name!r} has no version {version!r} in {tracking_uri}"
        ) from e
    client.set_registered_model_alias(name, alias, str(version))


def _model_version(client: MlflowClient, name: str, alias_or_version: str, tracking_uri: str):
    ref = str(alias_or_version)
    if _is_latest(ref):
        ref = _newest_version(client, name) or ref
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as e:
        kind = "version" if ref.isdigit() else "alias"
        raise LookupError(
            f"registered model {name!r} has no {kind} {ref!r} in {tracking_uri}; check the name, "
            "train with tracking.register=true, or set the alias with karma.registry.set_alias"
        ) from e


_MARKER = ".karma-export-path"


def _cache_root() -> Path:
    """The model cache: $KARMA_MODEL_CACHE, else $XDG_CACHE_HOME/karma/models, else
    ~/.cache/karma/models. Per user, never a shared predictable path such as /tmp."""
    env = os.environ.get("KARMA_MODEL_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative = unset
    return base / "karma" / "models"


def _private_cache_dir(path: Path) -> Path:
    """`path` created 0700 if missing; refused when it is not a folder or another user owns it
    (whoever owns it could plant a model there); a folder of ours open to others becomes 0700."""
    import stat

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(
            f"model cache {str(path)!r} is not a folder owned by this user (uid {os.getuid()}); "
            "set KARMA_MODEL_CACHE to a private folder of yours"
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def _cached_export(entry: Path) -> Path | None:
    """The export folder of a finished cache entry, or None when the entry is missing or not to
    be trusted: a symlink, owned by another user, or a marker that is a symlink, not a plain
    file, or points outside the entry."""
    import stat

    uid = os.getuid()
    try:
        st = os.lstat(entry)
        marker = entry / _MARKER
        mst = os.lstat(marker)
    except FileNotFoundError:
        return None
    if not (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_ISREG(mst.st_mode) and mst.st_uid == uid):
        return None
    try:
        fd = os.open(marker, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd) as f:
        rel = Path(f.read(4096).strip())
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        return None
    export = entry / rel
    if not export.is_dir() or not export.resolve().is_relative_to(entry.resolve()):
        return None
    return export


def _discard(entry: Path) -> None:
    """Remove an untrusted cache entry (a symlink is removed, never followed)."""
    import logging

    logging.getLogger(__name__).warning("model cache entry %s is not trusted (symlink, other owner or "
                                        "bad marker); downloading the version again", entry)
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink()
    else:
        shutil.rmtree(entry)


def export_dir_of(
    registered_name: str,
    alias_or_version: str,
    tracking_uri: str,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download the export files of a model version (by alias or number); return their folder.

    Versions are immutable, so each is downloaded once into `cache_dir` (default
    $KARMA_MODEL_CACHE, else $XDG_CACHE_HOME/karma/models, else ~/.cache/karma/models; a
    folder private to the user, see `_private_cache_dir`) and reused afterwards. A cache entry
    that is not to be trusted (`_cached_export`) is replaced by a fresh download.
    """
    client = _client(tracking_uri)
    mv = _model_version(client, registered_name, alias_or_version, tracking_uri)
    root = _private_cache_dir(Path(cache_dir).expanduser() if cache_dir else _cache_root())
    key = hashlib.sha1(f"{tracking_uri}|{registered_name}|{mv.version}|{mv.source}".encode())
    target = root / f"{_slug(registered_name)}-v{mv.version}-{key.hexdigest()[:10]}"
    export = _cached_export(target)
    if export is not None:
        return export
    if os.path.lexists(target):
        _discard(target)
    staging = Path(tempfile.mkdtemp(prefix=".dl-", dir=root))
    # MLflow resolves models:/ URIs against the process-global registry, whatever is passed.
    set_global_uris(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{registered_name}/{mv.version}",
            dst_path=str(staging),
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
        rel = _export_subpath(Path(local))
        (staging / _MARKER).write_text(str((Path(local) / rel).relative_to(staging)))
        try:
            staging.rename(target)  # atomic; a concurrent downloader may have won
        except OSError:
            if _cached_export(target) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    export = _cached_export(target)
    if export is None:
        raise RuntimeError(f"model cache entry {target} was replaced while it was being filled; retry")
    return export


def _export_subpath(model_dir: Path) -> str:
    """Where pyfunc put the "export" artifact inside a downloaded model (read from MLmodel)."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get("export")
    if not entry:
        raise LookupError(
            f"model at {model_dir} has no 'export' artifact; it was not logged by register_export"
        )
    return entry["path"]


def _recorded_value(client: MlflowClient, mv, metric_key: str) -> float | None:
    """A version's metric: its `metric.<key>` tag, else the last value on its source run."""
    key = mlflow_key(metric_key)
    tag = mv.tags.get(f"metric.{key}")
    if tag is not None:
        try:
            value = float(tag)
        except ValueError:
            value = float("nan")
        return value if math.isfinite(value) else None
    if mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(key)
        except MlflowException:
            return None
        if value is not None and math.isfinite(value):
            return float(value)
    return None


def promote_if_better(
    name: str,
    alias: str,
    candidate_version: str | int,
    metric_key: str,
    candidate_value: float,
    mode: Literal["max", "min"],
    tracking_uri: str,
) -> dict[str, Any]:
    """Move `alias` to the candidate only if it beats the current holder strictly.

    A holder without a recorded value for the metric is replaced (it cannot be compared).
    Returns a record of the decision for the caller to log.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r}: must be 'max' or 'min'")
    _refuse_latest(alias)
    client = _client(tracking_uri)
    candidate_version = str(candidate_version)
    _model_version(client, name, candidate_version, tracking_uri)  # fail early if missing
    incumbent = alias_version(name, alias, tracking_uri)
    incumbent_value = None
    if incumbent is not None:
        holder = client.get_model_version(name, incumbent)
        incumbent_value = _recorded_value(client, holder, metric_key)
    cand = _as_float(candidate_value)

    if cand is None:
        promoted, reason = False, "candidate value is not a finite number"
    elif incumbent is None:
        promoted, reason = True, "no current holder"
    elif incumbent == candidate_version:
        promoted, reason = False, "candidate already holds the alias"
    elif incumbent_value is None:
        promoted, reason = True, "current holder has no recorded value for the metric"
    elif (cand > incumbent_value) if mode == "max" else (cand < incumbent_value):
        promoted, reason = True, "candidate is better"
    else:
        promoted, reason = False, "candidate is not strictly better"

    if promoted:
        tag = f"metric.{mlflow_key(metric_key)}"
        if tag not in client.get_model_version(name, candidate_version).tags:
            # Record the value so the next comparison does not depend on the run's metrics.
            client.set_model_version_tag(name, candidate_version, tag, repr(cand))
        client.set_registered_model_alias(name, alias, candidate_version)
    return {
        "promoted": promoted,
        "candidate_version": candidate_version,
        "candidate_value": cand if cand is not None else candidate_value,
        "incumbent_version": incumbent,
        "incumbent_value": incumbent_value,
        "metric": metric_key,
        "mode": mode,
        "alias": alias,
        "reason": reason,
    }
