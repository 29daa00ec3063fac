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


class RequestError(ValueError):
    """A client mistake in one request field (the web layer answers it with a 4xx naming `field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
        if self.version:
            return self.version
        from karma.tracking import alias_version

        uri = self.resolved_uri()
        v = alias_version(self.registered_name, self.ref, uri)
        if v is None:
            raise LookupError(f"registered model {self.registered_name!r} has no alias {self.ref!r} in {uri}")
        return v


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
    source: str
    loaded_at: str
    _ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = self.model.items["item_id"].to_numpy(np.int64)

    @classmethod
    def from_export(cls, path: str | Path, spec: ModelSpec | None = None, version: str | None = None,
                    device: str = "cpu") -> ModelHandle:
        spec = spec or ModelSpec(export_path=str(path))
        model = load_export(path, device=device, dtype=spec.dtype)
        index = ItemIndex(model.item_emb, kind=spec.index, use_gpu=device != "cpu")
        return cls(model, index, spec, spec.registered_name, version,
                   spec.alias or ("champion" if spec.registered_name and not spec.version else None),
                   str(path), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def load(cls, spec: ModelSpec, version: str | None = None, device: str = "cpu") -> ModelHandle:
        """Load `spec`; for a registry spec, `version` pins what the alias resolved to (so a
        concurrent alias move cannot mix two versions in one load)."""
        if spec.export_path:
            return cls.from_export(spec.export_path, spec, None, device)
        from karma.tracking import export_dir_of

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
        """Answer validated jobs in one forward pass (and one index search for the recalls)."""
        if not jobs:
            return []
        z, mix = self.encode([j.rows for j in jobs], [j.query for j in jobs])
        out: list[dict[str, Any]] = [{} for _ in jobs]
        rec = [i for i, j in enumerate(jobs) if j.kind == "recall"]
        if rec:
            width = max(len(jobs[i].rows) if jobs[i].exclude_history else 0 for i in rec)
            ex = np.full((len(rec), max(width, 1)), -1, np.int64)
            for r, i in enumerate(rec):
                if jobs[i].exclude_history:
                    ex[r, : len(jobs[i].rows)] = jobs[i].rows
            scores, rows = recall(self.index, z[rec], max(jobs[i].k for i in rec), ex)
            for r, i in enumerate(rec):
                keep = rows[r] >= 0
                top_rows, top_s = rows[r][keep][: jobs[i].k], scores[r][keep][: jobs[i].k]
                out[i] = {"item_ids": self._ids[top_rows], "scores": top_s}
        for i, job in enumerate(jobs):
            m_i = None if mix is None else mix[i]
            if job.kind == "interests":
                out[i] = {"interests": z[i]}
            elif job.kind == "rank":
                feats = rank_features(z[i], m_i, self.model.item_emb[job.cand_rows])
                out[i] = {"item_ids": job.cand_ids, **feats,
                          "user": user_features(z[i], m_i, len(job.rows))}
        return out


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
