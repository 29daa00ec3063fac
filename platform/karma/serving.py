"""What a model server needs that is not HTTP: request validation, model loading (from an
export folder or the MLflow registry), batched inference and the ranking-feature maths.

The web layer (serve_apps/ranker.py) turns `RequestError` into a 4xx response and the plain
dicts returned by `run_jobs` into JSON; nothing here knows about either.

Feature definitions (per user, H interest heads z_h, unit-norm; per candidate item e):
- head_scores[h] = <z_h, e>                      the raw inner products, one per head
- max            = max_h head_scores[h]          the score retrieval (faiss) ranks by
- mixture        = sum_h softmax(mix)_h * head_scores[h] for a model trained with a mixture
                   head; for a max-reduce model it equals `max`, so `mixture` is always
                   "the score the model was trained to rank by"
- cosine         = cos(mean_h z_h, e)            one summary vector, length-independent
User features: history_length, n_heads, interest_norm_{mean,min,max} (norms of z_h),
mean_interest_norm (|mean_h z_h|: 1 when all heads agree, smaller when they spread),
head_pairwise_cosine (mean cosine over head pairs, the head-diversity measure: 1 = identical
heads; defined as 1.0 for H=1) and mixture_weights (softmax(mix); null without a mixture head).
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from karma.export import InferenceModel, load_export
from karma.retrieval import ItemIndex

__all__ = [
    "RequestError",
    "ModelNotFoundError",
    "NonFiniteError",
    "ExposureError",
    "read_token",
    "token_matches",
    "is_loopback",
    "check_exposure",
    "ServingLimits",
    "ModelSpec",
    "ModelHandle",
    "Job",
    "build_job",
    "check_item_ids",
    "check_k",
    "check_query",
    "recall",
    "rank_features",
    "user_features",
    "run_jobs",
    "BusyWait",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SHOW_UNKNOWN = 20  # unknown ids listed in an error message, at most
TOKEN_ENV = "KARMA_SERVE_TOKEN"
TOKEN_FILE_ENV = "KARMA_SERVE_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
_NEW_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A client mistake in one request field (the web layer answers it with a 4xx naming `field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelNotFoundError(LookupError):
    """The registry has no such model, alias or version. The message names them, lists what the
    registry holds instead and how to list it."""

    def __init__(self, message: str, registered_name: str, ref: str):
        super().__init__(message)
        self.registered_name = registered_name
        self.ref = ref


class NonFiniteError(ArithmeticError):
    """A model gave NaN or infinite values: its item table at load, or one request's answer."""


class ExposureError(RuntimeError):
    """Serving beyond loopback without a token and without the explicit opt-out."""


# ---- authentication ---------------------------------------------------------------------------


def read_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The serving token from $KARMA_SERVE_TOKEN_FILE (a file holding it) or $KARMA_SERVE_TOKEN,
    never from arguments or a config file (which show in `ps`, logs and the Serve config).
    None when neither is set; ValueError naming the variable when one is set but unusable."""
    env = os.environ if environ is None else environ
    value, path = env.get(TOKEN_ENV, ""), env.get(TOKEN_FILE_ENV, "")
    if value and path:
        raise ValueError(f"both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set; set only one "
                         f"({TOKEN_FILE_ENV} keeps the token out of the process environment)")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise ValueError(f"{TOKEN_FILE_ENV}={path}: cannot read the token file ({e.strerror or e}); "
                             "mount it readable by the replicas or unset the variable") from e
        source = f"{TOKEN_FILE_ENV}={path}: the token file"
    else:
        token, source = value.strip(), TOKEN_ENV
    if path and not token:
        raise ValueError(f"{source} is empty; write a token into it, e.g. the output of {_NEW_TOKEN}")
    if token and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{source} holds a token of {len(token)} characters; use at least {MIN_TOKEN_CHARS}, "
                         f"e.g. the output of {_NEW_TOKEN}")
    return token or None


def token_matches(given: str, token: str) -> bool:
    """Compare a presented token with the server's in constant time (no early exit on a prefix)."""
    return hmac.compare_digest(given.encode(), token.encode())


def is_loopback(host: str | None) -> bool:
    """Whether a listen address is reachable from this host only. None: Serve runs no HTTP proxy."""
    if host is None:
        return True
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name or an unparsable address: assume reachable


def check_exposure(host: str | None, has_token: bool, allow_unauthenticated: bool) -> str | None:
    """Refuse to serve beyond loopback without a token unless `allow_unauthenticated` is set.

    Returns a warning to log when serving beyond loopback without a token on purpose (None when
    there is nothing to warn about); raises ExposureError when it must not start."""
    if has_token or is_loopback(host):
        return None
    if allow_unauthenticated:
        return (f"serving WITHOUT authentication on http_options.host={host!r}, beyond loopback, because "
                "allow_unauthenticated=true: anyone who reaches the port can query the model")
    raise ExposureError(
        f"Serve's HTTP proxy listens on {host!r} (http_options.host), beyond loopback, and no serving token "
        f"is set, so anyone who reaches the port could query the model. Set {TOKEN_FILE_ENV} (a file "
        f"holding the token) or {TOKEN_ENV} in the replicas' environment, or bind http_options.host to "
        "127.0.0.1 behind a gateway, or pass allow_unauthenticated=true to serve without a token on purpose"
    )


@dataclass(frozen=True)
class ServingLimits:
    """Bounds on one request. `max_history=None` means the model's own cfg.data.max_history;
    a larger value accepts longer histories, of which the model reads the most recent items.
    `max_batch_requests` is the most requests one model call answers together."""

    max_batch_requests: int = 16
    max_history: int | None = None
    max_candidates: int = 1000
    max_k: int = 1000
    max_query_chars: int = 512

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "max_history":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"limits.{f.name} must be a positive integer, got {v!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ServingLimits:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown limits keys {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**d)

    def history_limit(self, model_max: int) -> int:
        return self.max_history if self.max_history is not None else model_max


# ---- request validation ---------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    # bool is an int subclass and numpy ints are not ints: accept exactly the integer kinds
    return (isinstance(v, (int, np.integer))) and not isinstance(v, (bool, np.bool_))


def check_item_ids(value: Any, field: str, max_len: int) -> np.ndarray:
    """A non-empty list of integer item ids, at most `max_len` long -> int64 array.

    Floats (even 3.0), booleans, strings and out-of-int64 values are refused: ids are names,
    and a silent cast would look up a different item."""
    if value is None:
        raise RequestError(field, "is required and must be a list of integer item ids, got null")
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise RequestError(field, f"must be a list of integer item ids, got {type(value).__name__}")
    if len(value) == 0:
        raise RequestError(field, "must not be empty")
    if len(value) > max_len:
        raise RequestError(field, f"has {len(value)} items; the limit is {max_len}")
    for i, v in enumerate(value):
        if not _is_int(v):
            raise RequestError(f"{field}[{i}]", f"must be an integer item id, got {type(v).__name__} {v!r}")
        if not INT64_MIN <= int(v) <= INT64_MAX:
            raise RequestError(f"{field}[{i}]", f"item id {v} is outside the 64-bit integer range")
    return np.asarray([int(v) for v in value], dtype=np.int64)


def check_k(k: Any, max_k: int) -> int:
    if not _is_int(k):
        raise RequestError("k", f"must be an integer, got {type(k).__name__} {k!r}")
    if not 1 <= int(k) <= max_k:
        raise RequestError("k", f"must be in [1, {max_k}], got {k}")
    return int(k)


def check_query(query: Any, max_chars: int) -> str | None:
    if query is None:
        return None
    if not isinstance(query, str):
        raise RequestError("query", f"must be a string or null, got {type(query).__name__}")
    if len(query) > max_chars:
        raise RequestError("query", f"has {len(query)} characters; the limit is {max_chars}")
    return query or None


def _rows(model: InferenceModel, ids: np.ndarray, field: str) -> np.ndarray:
    rows = model.rows_of(ids)
    bad = ids[rows < 0]
    if bad.size:
        shown = list(dict.fromkeys(int(i) for i in bad))
        more = f" (and {len(shown) - _SHOW_UNKNOWN} more)" if len(shown) > _SHOW_UNKNOWN else ""
        raise RequestError(field, f"unknown item ids {shown[:_SHOW_UNKNOWN]}{more}")
    return rows.astype(np.int64)


@dataclass
class Job:
    """One validated request: item ROWS of the model it was validated against."""

    kind: str  # "interests" | "recall" | "rank"
    rows: np.ndarray
    query: str | None = None
    k: int = 0
    exclude_history: bool = True
    cand_ids: np.ndarray | None = None
    cand_rows: np.ndarray | None = None


def build_job(kind: str, handle: ModelHandle, limits: ServingLimits, history: Any, query: Any = None,
              k: Any = 100, exclude_history: Any = True, candidates: Any = None) -> Job:
    """Validate one request against `handle`'s item table; raises RequestError."""
    if kind not in ("interests", "recall", "rank"):
        raise ValueError(f"kind must be interests, recall or rank, got {kind!r}")
    ids = check_item_ids(history, "history", limits.history_limit(handle.max_history))
    job = Job(kind, _rows(handle.model, ids, "history"), check_query(query, limits.max_query_chars))
    if kind == "recall":
        job.k = check_k(k, limits.max_k)
        if not isinstance(exclude_history, (bool, np.bool_)):
            raise RequestError("exclude_history", f"must be true or false, got {exclude_history!r}")
        job.exclude_history = bool(exclude_history)
    elif kind == "rank":
        job.cand_ids = check_item_ids(candidates, "candidates", limits.max_candidates)
        job.cand_rows = _rows(handle.model, job.cand_ids, "candidates")
    return job


# ---- feature maths (numpy, no model) --------------------------------------------------------


def recall(index: ItemIndex, z: np.ndarray, k: int, exclude: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ROWS for interests z [B,H,d] (max over heads), `exclude` [B,L] rows padded
    with -1. Returns (scores [B,k], rows [B,k]); empty slots hold -inf / -1."""
    return index.search(np.asarray(z, dtype=np.float32), k, exclude)


def with_seen(rows: np.ndarray, scores: np.ndarray, z: np.ndarray, item_emb: np.ndarray, history: np.ndarray,
              offset: float) -> tuple[np.ndarray, np.ndarray]:
    """A recall answer (best first, the history's rows left out of it) with those rows put back
    at their score + `offset` (model.seen_offset): the exact top of the shifted scores, since no
    other item's score moves. z [H,d]; returns (rows, scores) best first."""
    h = np.unique(np.asarray(history, dtype=np.int64))
    hs = (np.asarray(item_emb[h], np.float32) @ np.asarray(z, np.float32).T).max(axis=1) + np.float32(offset)
    all_rows, all_s = np.concatenate([rows, h]), np.concatenate([scores, hs.astype(scores.dtype)])
    order = np.argsort(-all_s, kind="stable")
    return all_rows[order], all_s[order]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def rank_features(z: np.ndarray, mix: np.ndarray | None, cand_emb: np.ndarray) -> dict[str, np.ndarray]:
    """Per-candidate features for one user (see the module docstring for definitions).

    z [H,d], mix [H] mixture logits or None, cand_emb [C,d] ->
    head_scores [C,H], max [C], mixture [C], cosine [C] (float32)."""
    z = np.asarray(z, dtype=np.float32)
    e = np.asarray(cand_emb, dtype=np.float32)
    if z.ndim != 2 or e.ndim != 2 or z.shape[1] != e.shape[1]:
        raise ValueError(f"z must be [H,d] and cand_emb [C,d] with the same d, got {z.shape} and {e.shape}")
    heads = e @ z.T  # [C,H]
    best = heads.max(axis=1)
    if mix is None:
        mixture = best.copy()
    else:
        w = _softmax(np.asarray(mix, dtype=np.float64)).astype(np.float32)
        if w.shape != (z.shape[0],):
            raise ValueError(f"mix must be [H]=[{z.shape[0]}], got {np.shape(mix)}")
        mixture = heads @ w
    mean = z.mean(axis=0)
    denom = np.linalg.norm(e, axis=1) * np.linalg.norm(mean)
    cosine = np.divide(e @ mean, denom, out=np.zeros(len(e), np.float32), where=denom > 1e-12)
    return {"head_scores": heads, "max": best, "mixture": mixture.astype(np.float32),
            "cosine": cosine.astype(np.float32)}


def user_features(z: np.ndarray, mix: np.ndarray | None, history_length: int) -> dict[str, Any]:
    """User-level features of one interest set z [H,d] (see the module docstring)."""
    z = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(z, axis=1)
    H = z.shape[0]
    if H > 1:
        u = z / np.maximum(norms, 1e-12)[:, None]
        sim = u @ u.T
        pair = float(sim[np.triu_indices(H, 1)].mean())
    else:
        pair = 1.0
    return {
        "history_length": int(history_length),
        "n_heads": H,
        "interest_norm_mean": float(norms.mean()),
        "interest_norm_min": float(norms.min()),
        "interest_norm_max": float(norms.max()),
        "mean_interest_norm": float(np.linalg.norm(z.mean(axis=0))),
        "head_pairwise_cosine": pair,
        "mixture_weights": None if mix is None else _softmax(np.asarray(mix, np.float64)).tolist(),
    }


# ---- model loading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: an export folder, or a registered model by alias or version."""

    export_path: str | None = None
    registered_name: str | None = None
    alias: str | None = None
    version: str | None = None
    tracking_uri: str | None = None
    dtype: str | None = None  # default: the export's trained dtype
    index: str = "flat"  # faiss index kind: flat | ivf

    def __post_init__(self) -> None:
        if bool(self.export_path) == bool(self.registered_name):
            raise ValueError("model: set exactly one of export_path or registered_name")
        if self.export_path and (self.alias or self.version):
            raise ValueError("model: alias/version only apply with registered_name, not export_path")
        if self.alias and self.version:
            raise ValueError("model: set alias or version, not both")
        if self.version is not None and not str(self.version).isdigit():
            raise ValueError(f"model.version must be a version number, got {self.version!r}")
        if self.index not in ("flat", "ivf"):
            raise ValueError(f"model.index must be 'flat' or 'ivf', got {self.index!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; known: {names}")
        vals = {k: (str(v) if k == "version" and v is not None else v) for k, v in d.items()}
        return cls(**vals)

    @property
    def ref(self) -> str | None:
        """The registry reference: the version number, else the alias (default champion)."""
        if not self.registered_name:
            return None
        return self.version or self.alias or "champion"

    def resolved_uri(self) -> str:
        from karma.tracking import resolve_tracking_uri

        return resolve_tracking_uri(self.tracking_uri, "runs")

    def resolve_version(self) -> str | None:
        """The registry version this spec points at now (None for an export folder)."""
        if not self.registered_name:
            return None
        from karma.registry import alias_version

        uri = self.resolved_uri()
        if self.version:
            if not _has_version(self.registered_name, self.version, uri):
                raise _not_found(self.registered_name, self.version, uri)
            return self.version
        v = alias_version(self.registered_name, self.ref, uri)
        if v is None:
            raise _not_found(self.registered_name, self.ref, uri)
        return v

    def describe(self, version: str | None = None) -> str:
        """What this spec names, for messages (no local paths)."""
        if not self.registered_name:
            return "the export folder"
        ref = f"version {self.version}" if self.version else f"alias {self.ref!r}"
        got = f" (version {version})" if version and not self.version else ""
        return f"registered model {self.registered_name!r} {ref}{got}"


def _registry(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _has_version(name: str, version: str, uri: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _registry(uri).get_model_version(name, str(version))
        return True
    except MlflowException:
        return False


def _not_found(name: str, ref: str, uri: str) -> ModelNotFoundError:
    """A ModelNotFoundError for `name` at `ref` (an alias or a version number) that lists what
    the registry at `uri` holds instead."""
    from mlflow.exceptions import MlflowException

    client = _registry(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
        except MlflowException:
            names = []
        return ModelNotFoundError(
            f"model.registered_name: there is no registered model {name!r} in {uri} (registered models "
            f"there: {names or 'none'}). A training job registers its model under tracking.registered_model "
            "(default: the experiment's name) when tracking.register=true; serve one of the names listed or "
            "check model.tracking_uri", name, ref)
    if ref.isdigit():
        try:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            versions = []
        return ModelNotFoundError(
            f"model.version: registered model {name!r} has no version {ref} in {uri}; its versions: "
            f"{versions or 'none'}", name, ref)
    aliases = {a: str(v) for a, v in sorted(model.aliases.items())}
    return ModelNotFoundError(
        f"model.alias: registered model {name!r} has no alias {ref!r} in {uri}; its aliases: "
        f"{aliases or 'none'} (list them with `mlflow.MlflowClient({uri!r}).get_registered_model({name!r})"
        f".aliases`). Serve one of those, pin model.version, or point the alias at a version with "
        f"karma.registry.set_alias({name!r}, {ref!r}, VERSION, {uri!r})", name, ref)


@dataclass
class ModelHandle:
    """A loaded model, its retrieval index and where it came from. Immutable once built, so
    a server can swap handles atomically while requests still run on the old one."""

    model: InferenceModel
    index: ItemIndex
    spec: ModelSpec | None
    registered_name: str | None
    version: str | None
    alias: str | None
    source: str  # what answered, without local paths: models:/<name>/<version>, or "export"
    loaded_at: str
    path: str = ""  # the local export folder (kept out of answers)
    _ids: np.ndarray = field(init=False, repr=False)
    _seen: float | None = field(init=False, repr=False)  # model.seen_offset, fixed once loaded

    def __post_init__(self) -> None:
        self._ids = self.model.items["item_id"].to_numpy(np.int64)
        self._seen = self.model.model.seen_offset()

    @classmethod
    def from_export(cls, path: str | Path, spec: ModelSpec | None = None, version: str | None = None,
                    device: str = "cpu") -> ModelHandle:
        spec = spec or ModelSpec(export_path=str(path))
        model = load_export(path, device=device, dtype=spec.dtype)
        finite = np.isfinite(model.item_emb).all(axis=1)
        if not finite.all():
            raise NonFiniteError(
                f"{spec.describe(version)}: {int((~finite).sum())} of {len(finite)} item embeddings hold NaN "
                "or infinite values, so recall would rank garbage; the export is broken: export the model "
                "again from a good checkpoint")
        index = ItemIndex(model.item_emb, kind=spec.index, use_gpu=device != "cpu")
        source = f"models:/{spec.registered_name}/{version}" if spec.registered_name else "export"
        return cls(model, index, spec, spec.registered_name, version,
                   spec.alias or ("champion" if spec.registered_name and not spec.version else None),
                   source, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), str(path))

    @classmethod
    def load(cls, spec: ModelSpec, version: str | None = None, device: str = "cpu") -> ModelHandle:
        """Load `spec`; for a registry spec, `version` pins what the alias resolved to (so a
        concurrent alias move cannot mix two versions in one load)."""
        if spec.export_path:
            return cls.from_export(spec.export_path, spec, None, device)
        from karma.registry import export_dir_of

        uri = spec.resolved_uri()
        version = version or spec.resolve_version()
        path = export_dir_of(spec.registered_name, version, uri)
        return cls.from_export(path, spec, version, device)

    @property
    def max_history(self) -> int:
        return int(self.model.cfg.data.max_history)

    def info(self) -> dict[str, Any]:
        m = self.model
        return {
            "registered_name": self.registered_name, "version": self.version, "alias": self.alias,
            "config_digest": m.meta.get("config_digest"), "n_items": int(len(m.items)),
            "n_heads": int(m.cfg.model.n_interest), "embed_dim": int(m.item_emb.shape[1]),
            "head_reduce": m.cfg.model.head_reduce, "max_history": self.max_history,
            "karma_version": m.meta.get("karma_version"), "source": self.source, "loaded_at": self.loaded_at,
        }

    def encode(self, histories: Sequence[np.ndarray], queries: Sequence[str | None]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Interests z [B,H,d] float32 and mixture logits [B,H] (None for a max-reduce model)."""
        return self.model.encode(list(histories), list(queries))

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Answer validated jobs in one forward pass (and one index search for the recalls).

        A job whose interests or features come out NaN or infinite is answered with
        {"error": NonFiniteError} instead (the others in the batch are unaffected)."""
        if not jobs:
            return []
        z, mix = self.encode([j.rows for j in jobs], [j.query for j in jobs])
        ok = np.isfinite(z.reshape(len(jobs), -1)).all(axis=1)
        if mix is not None:
            ok &= np.isfinite(np.asarray(mix).reshape(len(jobs), -1)).all(axis=1)
        out: list[dict[str, Any]] = [{} for _ in jobs]
        rec = [i for i, j in enumerate(jobs) if j.kind == "recall" and ok[i]]
        if rec:
            # model.seen_offset: a history kept in the answer (exclude_history=false) is scored
            # with the learned offset on the items the model reads, as it was trained and evaluated
            seen = self._seen
            left_out = [jobs[i].rows if jobs[i].exclude_history else
                        jobs[i].rows[-self.max_history:] if seen is not None else jobs[i].rows[:0] for i in rec]
            ex = np.full((len(rec), max(max(len(x) for x in left_out), 1)), -1, np.int64)
            for r, x in enumerate(left_out):
                ex[r, : len(x)] = x
            scores, rows = recall(self.index, z[rec], max(jobs[i].k for i in rec), ex)
            for r, i in enumerate(rec):
                keep = rows[r] >= 0
                top_rows, top_s = rows[r][keep], scores[r][keep]
                if seen is not None and not jobs[i].exclude_history:
                    top_rows, top_s = with_seen(top_rows, top_s, z[i], self.model.item_emb, left_out[r], seen)
                out[i] = {"item_ids": self._ids[top_rows[: jobs[i].k]], "scores": top_s[: jobs[i].k]}
        for i, job in enumerate(jobs):
            m_i = None if mix is None else mix[i]
            if not ok[i]:
                continue
            if job.kind == "interests":
                out[i] = {"interests": z[i]}
            elif job.kind == "rank":
                feats = rank_features(z[i], m_i, self.model.item_emb[job.cand_rows])
                out[i] = {"item_ids": job.cand_ids, **feats,
                          "user": user_features(z[i], m_i, len(job.rows))}
            ok[i] = _all_finite(out[i])
        for i in np.flatnonzero(~ok):
            out[i] = {"error": self._non_finite()}
        return out

    def _non_finite(self) -> NonFiniteError:
        what = self.spec.describe(self.version) if self.spec else "the model"
        dtype = (self.spec.dtype if self.spec else None) or self.model.meta.get("dtype", "its dtype")
        logger.warning("%s produced NaN or infinite values for a request; answered with an error", what)
        return NonFiniteError(
            f"model: {what} produced NaN or infinite values for this request, so there is no valid answer. "
            f"The model is faulty or overflows in {dtype}: serve another version (move the alias "
            "back) or load this one with dtype float32")


def _all_finite(answer: Mapping[str, Any]) -> bool:
    for v in answer.values():
        if isinstance(v, Mapping):
            if not _all_finite(v):
                return False
        elif isinstance(v, np.ndarray) and v.dtype.kind == "f":
            if not np.isfinite(v).all():
                return False
        elif isinstance(v, float) and not np.isfinite(v):
            return False
        elif isinstance(v, list) and v and isinstance(v[0], float) and not np.isfinite(v).all():
            return False
    return True


def run_jobs(work: Sequence[tuple[ModelHandle, Job]]) -> list[dict[str, Any]]:
    """Answer (handle, job) pairs, each on the handle it was validated against: during a model
    swap one batch may hold requests for both the old and the new model."""
    out: list[dict[str, Any] | None] = [None] * len(work)
    groups: dict[int, list[int]] = {}
    for i, (h, _) in enumerate(work):
        groups.setdefault(id(h), []).append(i)
    for idx in groups.values():
        handle = work[idx[0]][0]
        for i, res in zip(idx, handle.run([work[i][1] for i in idx])):
            out[i] = res
    return out  # type: ignore[return-value]


@dataclass
class BusyWait:
    """How long the next batch waits for more requests: `max_wait_s` while recent batches held
    more than one request, 0 otherwise.

    Under load a short wait fills batches, and one forward pass per batch is what makes batching
    pay (a model call costs about the same for 1 request as for 16). A lone client, whose next
    request only comes after this one's answer, would gain nothing from waiting: its batches
    hold one request, the average stays at 1 and it never waits. Batch sizes are averaged with
    weight `1 - decay` on the newest."""

    max_wait_s: float
    threshold: float = 1.25
    decay: float = 0.8
    mean_batch: float = 1.0

    def __post_init__(self) -> None:
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")

    def observe(self, batch_size: int) -> float:
        """Record a batch that just formed; return the wait for the next one."""
        self.mean_batch = self.decay * self.mean_batch + (1.0 - self.decay) * batch_size
        return self.wait_s

    @property
    def wait_s(self) -> float:
        return self.max_wait_s if self.mean_batch >= self.threshold else 0.0
