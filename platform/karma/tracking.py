"""MLflow run tracking for training jobs and sweeps: runs found again by name, params,
metrics, artifacts, and the metric logger of the training workers. The model registry
(versions, aliases, promotion, the serving cache) is `karma.registry`.

Used only on rank 0 / the driver. Everything goes through an explicit `MlflowClient` and
explicit run ids, so it is safe from any thread and nested runs never depend on MLflow's
global "active run" state.

MLflow names (metric, param and tag keys) may not contain "@", so "HR@10" is stored as
"HR_at_10" (see `mlflow_key`); `log_metrics` and `log_params` apply this for you.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

# MLflow 3 limits (mlflow.utils.validation): longer values are refused, not truncated.
PARAM_VALUE_MAX = 6000
TAG_VALUE_MAX = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

_INVALID_KEY_CHARS = re.compile(r"[^\w./\- ]")
_TERMINAL = {"FINISHED", "FAILED", "KILLED"}


class ParamConflictError(ValueError):
    """A param already logged on the run has a different value (MLflow params are immutable)."""


def mlflow_key(name: str) -> str:
    """Make `name` a legal MLflow metric/param/tag key: "@" -> "_at_", other odd chars -> "_"."""
    return _INVALID_KEY_CHARS.sub("_", str(name).replace("@", "_at_"))


def resolve_tracking_uri(explicit: str | None, default_dir: str | Path) -> str:
    """`explicit`, else $MLFLOW_TRACKING_URI, else a sqlite store under `default_dir`."""
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    folder = Path(default_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", ...}; lists as JSON; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
            continue
        if isinstance(value, Mapping):
            text = "{}"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value), default=str)
        else:
            text = str(value)
        out[name] = text[:PARAM_VALUE_MAX]
    return out


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _sqlite_artifact_root(tracking_uri: str) -> Path | None:
    """Artifacts of a sqlite store go next to the .db file. MLflow's own default is ./mlruns
    under the current directory, which scatters artifacts wherever a job happened to start."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = tracking_uri[len("sqlite:///"):]
    if not db_path or db_path == ":memory:":
        return None
    return Path(db_path).resolve().parent / "mlartifacts"


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = _sqlite_artifact_root(tracking_uri)
        location = None
        if root is not None:
            tag = hashlib.sha1(name.encode()).hexdigest()[:8]
            location = (root / f"{_slug(name)}-{tag}").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another process created it between our get and create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ValueError(
            f"tracking.experiment {name!r} exists but is deleted in {tracking_uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or choose "
            "another experiment name"
        )
    return exp.experiment_id


def _quoted(value: str, field: str) -> str:
    """Quote a string for an MLflow filter; the grammar has no escape for embedded quotes."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{field} {value!r} contains both ' and \"; use at most one kind of quote")


def _as_float(value: Any) -> float | None:
    """A finite float, or None for non-numbers (bools, strings, arrays) and NaN/inf."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        f = float(value)
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d numpy / torch
        item = value.item()
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            return None
        f = float(item)
    else:
        return None
    return f if math.isfinite(f) else None


def _metric_value(value: Any) -> float | None:
    """A float for any real number, NaN and +-inf included (a diverging loss must show in
    MLflow); None for non-numbers (bools, strings, arrays)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d numpy / torch
        item = value.item()
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            return None
        return float(item)
    return None


def _metric_items(metrics: Mapping[str, Any], step: int) -> list[Metric]:
    """MLflow metrics at `step`, stamped now; keys made legal, non-numbers left out."""
    now = int(time.time() * 1000)
    kept: dict[str, float] = {}
    for key, value in metrics.items():
        f = _metric_value(value)
        if f is not None:
            kept[mlflow_key(key)] = f
    return [Metric(k, v, now, int(step)) for k, v in kept.items()]


def set_global_uris(tracking_uri: str) -> None:
    """Point MLflow's process-global tracking and registry URIs at `tracking_uri`.

    MLflow 3 also writes them into the environment, where a later job's resolve_tracking_uri
    would find this store: the environment is put back as it was."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _newest_run(client: MlflowClient, experiment_id: str, run_name: str, parent_run_id: str | None):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.run_name = {_quoted(run_name, 'tracking.run_name')}",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    for run in runs:
        # A top-level job must not resume a same-named trial nested under a sweep.
        if run.data.tags.get("mlflow.parentRunId") == parent_run_id:
            return run
    return None


def find_run(experiment: str, run_name: str, tracking_uri: str, parent_run_id: str | None = None):
    """The run `RunTracker` would resume (the newest active run of that name and parent), or
    None; reads only (creates no experiment, changes no status)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        return None
    return _newest_run(client, exp.experiment_id, run_name, parent_run_id)


class RunTracker:
    """One MLflow run, found again by name on resume, closed by `end` or the `with` block."""

    def __init__(
        self,
        experiment: str,
        run_name: str,
        tracking_uri: str,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        resume: bool = True,
    ) -> None:
        if not experiment:
            raise ValueError("tracking.experiment is empty; set an experiment name")
        if not run_name:
            raise ValueError("tracking.run_name is empty; set a run name")
        self.tracking_uri = tracking_uri
        self.run_name = run_name
        # The fluent API (used by pyfunc.log_model) reads the global URIs.
        set_global_uris(tracking_uri)
        self.client = _client(tracking_uri)
        self._experiment_id = _experiment_id(self.client, experiment, tracking_uri)
        self._lock = threading.Lock()
        self._ended = False

        existing = self._find_run(run_name, parent_run_id) if resume else None
        if existing is not None:
            self._run_id = existing.info.run_id
            self._logged = dict(existing.data.params)
            self.resumed = True
            self.client.update_run(self._run_id, status="RUNNING")
        else:
            run_tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            run = self.client.create_run(self._experiment_id, run_name=run_name, tags=run_tags)
            self._run_id = run.info.run_id
            self._logged = {}
            self.resumed = False
        if tags:
            self.set_tags(tags)

    def _find_run(self, run_name: str, parent_run_id: str | None):
        return _newest_run(self.client, self._experiment_id, run_name, parent_run_id)

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    def log_params(
        self, params: Mapping[str, Any], on_conflict: Literal["raise", "tag"] = "raise"
    ) -> dict[str, str]:
        """Log a nested dict as flat params; keys already logged with the same value are skipped.

        A key that already holds a different value (MLflow refuses changing a param, e.g. a
        resumed job given more epochs) raises ParamConflictError, or with on_conflict="tag"
        keeps the first value and records the new one as tag `param_changed.<key>`.
        Returns what was newly logged as params.
        """
        if on_conflict not in ("raise", "tag"):
            raise ValueError(f"on_conflict={on_conflict!r}: must be 'raise' or 'tag'")
        flat = {mlflow_key(k): v for k, v in flatten(params).items()}
        with self._lock:
            new: dict[str, str] = {}
            changed: dict[str, str] = {}
            for key, value in flat.items():
                old = self._logged.get(key)
                if old is None:
                    new[key] = value
                elif old != value:
                    if on_conflict == "tag":
                        changed[f"param_changed.{key}"] = value
                        continue
                    raise ParamConflictError(
                        f"param {key!r} of run {self.run_name!r} ({self._run_id}) was logged as "
                        f"{old!r}, now {value!r}; MLflow params cannot change: give the job a new "
                        "tracking.run_name, keep the original value when resuming, or pass "
                        "on_conflict='tag'"
                    )
            items = [Param(k, v) for k, v in new.items()]
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self.client.log_batch(self._run_id, params=items[i : i + _PARAMS_PER_BATCH])
            self._logged.update(new)
        if changed:
            self.set_tags(changed)
        return new

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Log numeric values at `step`, NaN and +-inf included (MLflow's SQL stores keep NaN
        and store +-inf as +-1.8e308, the largest float); non-numbers are left out.

        Returns what was logged (keys as stored in MLflow)."""
        items = _metric_items(metrics, step)
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self._run_id, metrics=items[i : i + _METRICS_PER_BATCH])
        return {m.key: m.value for m in items}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents, under `artifact_path`."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self._run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self._run_id, str(p), artifact_path)
        else:
            raise FileNotFoundError(f"artifact path {str(p)!r} does not exist")

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """`name` ending in .json writes JSON, .yaml/.yml writes YAML."""
        self.client.log_dict(self._run_id, dict(d), name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self._run_id, text, name)

    def log_figure(self, fig: Any, name: str) -> None:
        self.client.log_figure(self._run_id, fig, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(mlflow_key(k), str(v)[:TAG_VALUE_MAX]) for k, v in tags.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=items[i : i + _PARAMS_PER_BATCH])

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated (FINISHED, FAILED or KILLED); a second call does nothing."""
        if status not in _TERMINAL:
            raise ValueError(f"end(status={status!r}): status must be one of {sorted(_TERMINAL)}")
        with self._lock:
            if self._ended:
                return
            self.client.set_terminated(self._run_id, status=status)
            self._ended = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")
        return False


# Errors that no retry can fix (a bad key or value, a deleted run): the batch is given up.
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
                     "PERMISSION_DENIED", "UNAUTHENTICATED"}


class _Rejected(Exception):
    """The store refused a batch for good (4xx other than 408/429)."""


class RunLogger:
    """Metrics into an existing run by id: what rank 0 of a training job uses, while the
    driver owns the run (creates, tags and closes it).

    `log_metrics` only queues: it never waits on the network and never raises, so a tracking
    server that is down or slow costs the training loop nothing. A background thread sends the
    queue in batches and retries failed sends with exponential backoff (`retry_initial_s`
    doubling up to `retry_max_s`), so what was logged during an outage arrives once the server
    is back. `close` sends what is left, waiting at most `close_timeout_s`, and reports in the
    log how many values could not be delivered: still queued at the deadline, refused by the
    store (a bad key, a deleted run), or beyond `max_queue` values waiting during a long outage.
    Against an HTTP server every attempt is one request bounded by `request_timeout_s` (MLflow's
    own minutes-long retry loop is bypassed); the thread does the retrying.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, close_timeout_s: float = 60.0,
                 max_queue: int = 200_000, retry_initial_s: float = 0.5, retry_max_s: float = 10.0,
                 request_timeout_s: float = 10.0, log: Any = None) -> None:
        import collections
        import logging

        self.tracking_uri = tracking_uri
        self.client = _client(tracking_uri)
        self._run_id = run_id
        self._close_timeout_s = close_timeout_s
        self._max_queue = max_queue
        self._retry = (retry_initial_s, retry_max_s)
        self._request_timeout_s = request_timeout_s
        self._log = log or logging.getLogger("karma.tracking").warning
        self._rest = None
        if _scheme(tracking_uri) in ("http", "https"):
            from mlflow.protos.service_pb2 import LogBatch
            from mlflow.store.tracking.rest_store import RestStore

            store = self.client._tracking_client.store
            if isinstance(store, RestStore):
                self._rest = (store, RestStore._METHOD_TO_INFO[LogBatch][0])
        self._queue: collections.deque[Metric] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = math.inf
        self.delivered = 0  # values the store accepted
        self.rejected = 0  # values the store refused for good
        self.overflowed = 0  # values not queued (queue full, logger closed, unusable input)
        self.failed_attempts = 0  # sends that failed and were retried
        self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ---- the training side: never blocks on the network, never raises

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Queue numeric values at `step` (NaN/inf included, non-numbers left out); returns
        what was queued (keys as stored in MLflow)."""
        try:
            items = _metric_items(metrics, step)
        except Exception as err:  # noqa: BLE001 -- logging must never stop training
            self._note_overflow(len(metrics), f"unusable metrics at step {step}: {err!r}")
            return {}
        with self._cond:
            if self._closing:
                self._note_overflow(len(items), "log_metrics after close")
                return {}
            room = self._max_queue - len(self._queue)
            if room < len(items):
                self._note_overflow(len(items) - max(room, 0), f"more than {self._max_queue} values waiting "
                                    "for the tracking server")
                items = items[: max(room, 0)]
            self._queue.extend(items)
            self._cond.notify_all()
        return {m.key: m.value for m in items}

    def _note_overflow(self, n: int, why: str) -> None:
        if self.overflowed == 0:
            self._log(f"RunLogger: dropping metric values for run {self._run_id}: {why} (counted; more "
                      "drops are reported at close)")
        self.overflowed += n

    # ---- the sender thread

    def _send(self, batch: list[Metric]) -> None:
        if self._rest is None:
            try:
                self.client.log_batch(self._run_id, metrics=batch)
            except MlflowException as err:
                if err.error_code in _PERMANENT_ERRORS:
                    raise _Rejected(str(err)) from err
                raise
            return
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request

        store, endpoint = self._rest
        body = json.loads(message_to_json(LogBatch(run_id=self._run_id, metrics=[m.to_proto() for m in batch])))
        response = http_request(store.get_host_creds(), endpoint, "POST", max_retries=0, backoff_factor=0,
                                timeout=self._request_timeout_s, json=body)
        code = response.status_code
        if code == 200:
            return
        if 400 <= code < 500 and code not in (408, 429):
            raise _Rejected(f"HTTP {code}: {response.text[:300]}")
        raise ConnectionError(f"HTTP {code}: {response.text[:300]}")

    def _send_loop(self) -> None:
        delay = self._retry[0]
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or time.monotonic() >= self._deadline:
                    return
                batch = [self._queue[i] for i in range(min(len(self._queue), _METRICS_PER_BATCH))]
            try:
                self._send(batch)
            except _Rejected as err:
                self._log(f"RunLogger: the tracking store refused {len(batch)} metric values for run "
                          f"{self._run_id}; they are dropped: {err}")
                self.rejected += len(batch)
            except Exception as err:  # noqa: BLE001 -- an outage: keep the batch, try again later
                if self.failed_attempts == 0 or delay >= self._retry[1]:
                    self._log(f"RunLogger: sending metrics to {self.tracking_uri} failed ({err!r}); "
                              f"{len(self._queue)} values queued, retrying in {delay:g}s")
                self.failed_attempts += 1
                with self._cond:
                    self._cond.wait(min(delay, max(self._deadline - time.monotonic(), 0)))
                delay = min(delay * 2, self._retry[1])
                continue
            else:
                self.delivered += len(batch)
                delay = self._retry[0]
            with self._cond:
                for _ in batch:  # only this thread removes from the left
                    self._queue.popleft()
                self._cond.notify_all()

    # ---- the end

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was sent (or refused); False on timeout."""
        end = time.monotonic() + (self._close_timeout_s if timeout is None else timeout)
        with self._cond:
            while self._queue and self._thread.is_alive():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return not self._queue

    @property
    def pending(self) -> int:
        return len(self._queue)

    def close(self, timeout: float | None = None) -> int:
        """Send what is queued, waiting at most `timeout` (default `close_timeout_s`) seconds;
        log and return how many values were not delivered. A second call only reports."""
        wait = self._close_timeout_s if timeout is None else timeout
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + wait
            self._cond.notify_all()
        self._thread.join(max(self._deadline - time.monotonic(), 0) + 1.0)
        with self._cond:
            unsent = len(self._queue)
        lost = unsent + self.rejected + self.overflowed
        if lost:
            self._log(f"RunLogger: {lost} metric values for run {self._run_id} were not delivered to "
                      f"{self.tracking_uri} ({unsent} still queued after {wait:g}s, {self.rejected} refused "
                      f"by the store, {self.overflowed} dropped); {self.delivered} delivered")
        return lost

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self.close()
        return False
