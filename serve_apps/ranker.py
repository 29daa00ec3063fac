"""Ray Serve app for a KARMA model: interest embeddings, recall top-K and ranking features.

    serve run serve_apps.ranker:app_builder export_path=/path/to/export
    serve run serve_apps.ranker:app_builder registered_name=karma alias=candidate
    serve deploy serve_apps/ranker.yaml

Startup-only settings come from the builder's args (limits, body limit, threads, replicas,
logging). The bearer token never does: it is read on each replica from $KARMA_SERVE_TOKEN_FILE
or $KARMA_SERVE_TOKEN, and a replica refuses to start when Serve listens beyond loopback without
one (unless allow_unauthenticated=true). What can change while serving lives in the
deployment's user_config:

    {"model": {"registered_name": ..., "alias": "champion"} | {"export_path": ...},
     "batching": {"enabled": true, "batch_wait_timeout_s": 0.02, "adaptive_wait": true,
                  "max_batch_size": 16},
     "revision": 3}

Pushing a changed user_config re-resolves the alias on every replica and, when it points at
another version, loads that version beside the old one and swaps it in: requests already
validated against the old model finish on it, so a version switch fails no request.
"""

# No `from __future__ import annotations`: FastAPI must see the real request types of the
# class-based routes.
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import ray
import torch
from fastapi import Depends, FastAPI, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)
from ray import serve
from starlette.exceptions import HTTPException

from karma.serving import (TOKEN_ENV, TOKEN_FILE_ENV, BusyWait, Job, ModelHandle, ModelSpec, NonFiniteError,
                           RequestError, ServingLimits, build_job, check_exposure, read_token, run_jobs, token_matches)

logger = logging.getLogger("ray.serve")

DEFAULT_BODY_BYTES = 256 * 1024
API_VERSION = "v1"


# ---- request / response schemas (they make the OpenAPI document) ------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


class InterestsRequest(_Strict):
    history: list[StrictInt] = Field(description="item ids the user interacted with, oldest first")
    query: StrictStr | None = Field(default=None, description="optional search query")


class RecallRequest(InterestsRequest):
    k: StrictInt = Field(default=100, description="how many items to return")
    exclude_history: StrictBool = Field(
        default=True, description="leave the history's items out; false keeps them, at their score plus the "
                                  "learned offset for a model trained with model.seen_offset")


class RankRequest(InterestsRequest):
    candidates: list[StrictInt] = Field(description="item ids to compute ranking features for")


class ReloadRequest(_Strict):
    force: StrictBool = Field(default=False, description="reload even if the version is unchanged")


class InterestsResponse(BaseModel):
    interests: list[list[float]] = Field(description="H interest embeddings of size d")
    model_version: str | None


class RecallResponse(BaseModel):
    item_ids: list[int] = Field(description="best first; the history's items left out unless exclude_history=false")
    scores: list[float] = Field(description="one per item_ids entry: max over heads of the inner product "
                                            "(+ the seen offset on a kept history item, model.seen_offset)")
    model_version: str | None


class UserFeatures(BaseModel):
    history_length: int
    n_heads: int
    interest_norm_mean: float
    interest_norm_min: float
    interest_norm_max: float
    mean_interest_norm: float
    head_pairwise_cosine: float = Field(description="mean cosine between heads (1 = identical heads)")
    mixture_weights: list[float] | None


class RankResponse(BaseModel):
    """Columns, one entry per candidate in request order: what a ranker reads as feature columns."""

    item_ids: list[int] = Field(description="the candidates, in request order")
    head_scores: list[list[float]] = Field(description="per candidate, the inner product with each interest head")
    max: list[float] = Field(description="max over heads of head_scores (what recall ranks by)")
    mixture: list[float] = Field(description="softmax(mixture logits)-weighted head scores; = max for a max-reduce model")
    cosine: list[float] = Field(description="cosine of the mean interest vector with the item")
    user: UserFeatures
    model_version: str | None


class ModelInfo(BaseModel):
    registered_name: str | None
    version: str | None
    alias: str | None
    config_digest: str | None
    n_items: int
    n_heads: int
    embed_dim: int
    head_reduce: str
    max_history: int
    karma_version: str | None
    source: str = Field(description="models:/<name>/<version> for a registry model, else 'export'")
    loaded_at: str
    replica: str
    auth: str = Field(description="'token', or why there is none: 'none (loopback)' or 'none (allow_unauthenticated)'")
    last_reload_error: str | None


class ReloadResponse(BaseModel):
    reloaded: bool
    model: ModelInfo


# ---- settings --------------------------------------------------------------------------------


class BatchingConfig(_Strict):
    enabled: StrictBool = True
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)  # default: limits.max_batch_requests
    # how long a batch may wait for more requests; with adaptive_wait only while recent batches
    # held more than one request (BusyWait), so a lone client never waits
    batch_wait_timeout_s: float = Field(default=0.02, ge=0.0, le=1.0)
    adaptive_wait: StrictBool = True


class UserConfig(_Strict):
    """The deployment's user_config: what may change while serving."""

    model: dict[str, Any]
    batching: BatchingConfig = BatchingConfig()
    revision: int | str = 0  # change it to make Serve call reconfigure (re-resolve the alias)


class RankerArgs(BaseModel):
    """The application builder's args (strings from `serve run ... key=value` are coerced)."""

    model_config = ConfigDict(extra="forbid")
    # model: one of export_path / registered_name (also settable through user_config)
    export_path: str | None = None
    registered_name: str | None = None
    alias: str | None = None
    version: str | None = None
    tracking_uri: str | None = None
    dtype: str | None = None
    index: str = "flat"
    # batching (the default user_config)
    batching: bool = True
    max_batch_size: int | None = None
    batch_wait_timeout_s: float = 0.02
    adaptive_wait: bool = True
    revision: int | str = 0
    # startup-only
    limits: dict[str, Any] = {}
    max_body_bytes: int = Field(default=DEFAULT_BODY_BYTES, ge=1024)
    # serve beyond loopback without a token, on purpose (logged as a warning on every replica)
    allow_unauthenticated: bool = False
    torch_threads: int = Field(default=1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the replica was given a GPU
    # deployment options
    num_replicas: int | str = 1
    max_ongoing_requests: int = Field(default=64, ge=1)
    ray_actor_options: dict[str, Any] = {"num_cpus": 1}
    access_log: bool = False
    log_level: str = "WARNING"

    @field_validator("num_replicas", mode="before")
    @classmethod
    def _replicas(cls, v: Any) -> Any:
        return int(v) if isinstance(v, str) and v.isdigit() else v

    @model_validator(mode="before")
    @classmethod
    def _no_token_in_args(cls, v: Any) -> Any:
        if isinstance(v, dict) and "auth_token" in v:
            raise ValueError(f"auth_token: a token in the builder args shows in the process list and in the Serve "
                             f"config; remove it and set {TOKEN_FILE_ENV} (a file holding the token) or {TOKEN_ENV} "
                             "in the replicas' environment instead")
        return v


# ---- errors as 4xx bodies that name the field ------------------------------------------------


def _field_of(loc: tuple | list) -> str:
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc)  # [where, *field]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _error(status: int, field: str, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"field": field, "detail": detail, **extra}, status_code=status, headers=headers)


app = FastAPI(title="KARMA ranker", version=API_VERSION,
              description="Interest embeddings, recall top-K and ranking features of a KARMA model.")


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": _field_of(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    first = errors[0] if errors else {"field": "body", "message": "invalid request", "type": ""}
    status = 400 if first["type"] == "json_invalid" else 422
    field = "body" if status == 400 else first["field"]
    return _error(status, field, f"{field}: {first['message']}", errors=jsonable_encoder(errors))


@app.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return _error(422, exc.field, str(exc))  # well-formed JSON with a bad value


@app.exception_handler(NonFiniteError)
async def _non_finite(_: Request, exc: NonFiniteError) -> JSONResponse:
    # The model, not the request, is at fault; JSON cannot carry NaN, and a bare 500 would hide why.
    return _error(503, "model", str(exc).removeprefix("model: "))


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    d = exc.detail if isinstance(exc.detail, dict) else {"field": "", "detail": str(exc.detail)}
    return _error(exc.status_code, d.get("field", ""), d.get("detail", ""), headers=exc.headers)


class BodyLimit:
    """Refuse request bodies over the replica's byte limit with 413, before any parsing.

    Bodies without a Content-Length (chunked) are read up to the limit and replayed."""

    def __init__(self, asgi_app) -> None:
        self.app = asgi_app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _replica().max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await self._too_large(scope, receive, send, limit)
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await self._too_large(scope, receive, send, limit)
        return await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}]), send)

    @staticmethod
    async def _too_large(scope, receive, send, limit: int) -> None:
        # Connection: close makes the HTTP server drop the connection after this answer instead of
        # reading (and discarding) the rest of an oversized body, which can be endless when chunked.
        resp = _error(413, "body", f"body: request body is larger than the limit of {limit} bytes",
                      headers={"connection": "close"})
        await resp(scope, receive, send)


def _replay(messages: list[dict]):
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


app.add_middleware(BodyLimit)
_bearer = HTTPBearer(auto_error=False, description="required when the server has an auth token")


def _replica() -> "Ranker":
    # The FastAPI app is copied into each replica; the replica's settings live on its instance.
    return serve.get_replica_context().servable_object  # type: ignore[return-value]


async def require_token(creds: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    token = _replica().auth_token
    if not token:
        return
    if creds is None:
        raise HTTPException(401, {"field": "Authorization", "detail": "Authorization: missing bearer token"},
                            headers={"WWW-Authenticate": "Bearer"})
    if not token_matches(creds.credentials, token):
        raise HTTPException(401, {"field": "Authorization", "detail": "Authorization: invalid bearer token"},
                            headers={"WWW-Authenticate": "Bearer"})


_auth = [Depends(require_token)]


# Defined above the class: serve.ingress freezes a copy of the class with the module names
# that exist when it is decorated.
async def _http_host() -> str | None:
    """The host Serve's HTTP proxies listen on (http_options.host; None: no HTTP proxy)."""
    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return (await controller.get_http_config.remote()).host
    except Exception as e:  # unknown counts as exposed: without a token, only the opt-out starts
        logger.warning("could not read Serve's http_options.host (%s: %s)", type(e).__name__, e)
        return "<unknown>"


# ---- the deployment --------------------------------------------------------------------------


@serve.deployment(name="Ranker", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class Ranker:
    async def __init__(self, limits: dict | None = None, max_body_bytes: int = DEFAULT_BODY_BYTES,
                       torch_threads: int = 1, device: str = "auto", allow_unauthenticated: bool = False) -> None:
        # The token comes from the replica's environment only (never args or config), and serving
        # beyond loopback without one needs the explicit opt-out.
        self.auth_token = read_token()
        self.auth = "token"
        if not self.auth_token:
            host = await _http_host()
            warning = check_exposure(host, False, allow_unauthenticated)
            if warning:
                logger.warning(warning)
            self.auth = "none (allow_unauthenticated)" if warning else "none (loopback)"
        torch.set_num_threads(torch_threads)  # replicas share few cores: no oversubscription
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.limits = ServingLimits.from_dict(limits)
        self.max_body_bytes = int(max_body_bytes)
        self.handle: ModelHandle | None = None
        self.spec: ModelSpec | None = None
        self.batching = True
        self.last_reload_error: str | None = None
        self._wait = BusyWait(0.0)
        # On CPU the model runs on the event loop: a thread hop per batch cost more than it
        # overlapped (p50 at one client about 7.6 vs 9.4 ms here). A GPU call mostly waits for
        # the device, so there it runs on one thread beside the loop, which keeps accepting
        # requests meanwhile. Another thread loads new versions so inference goes on during a reload.
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="karma-infer") if self.device != "cpu" else None
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="karma-load")
        self._reload_lock = asyncio.Lock()
        self._batched.set_max_batch_size(self.limits.max_batch_requests)

    # -- model lifecycle --

    async def reconfigure(self, user_config: dict) -> None:
        try:
            cfg = UserConfig.model_validate(user_config)
            spec = ModelSpec.from_dict(cfg.model)
        except (ValidationError, ValueError) as e:
            raise ValueError(f"invalid user_config: {e}") from e
        b = cfg.batching
        self.batching = b.enabled
        self._batched.set_max_batch_size(b.max_batch_size or self.limits.max_batch_requests)
        self._wait = BusyWait(b.batch_wait_timeout_s, threshold=BusyWait.threshold if b.adaptive_wait else 0.0)
        self._batched.set_batch_wait_timeout_s(self._wait.wait_s)
        await self._reload(spec, force=False)

    async def _reload(self, spec: ModelSpec, force: bool) -> bool:
        """Load `spec` if it names another model than the current one; swap it in atomically."""
        loop = asyncio.get_running_loop()
        async with self._reload_lock:
            try:
                version = await loop.run_in_executor(self._load_pool, spec.resolve_version)
                cur = self.handle
                if cur is not None and not force and cur.spec == spec and cur.version == version:
                    self.spec, self.last_reload_error = spec, None  # what is asked for is served
                    return False
                new = await loop.run_in_executor(self._load_pool, ModelHandle.load, spec, version, self.device)
            except Exception as e:
                if self.handle is None:
                    raise  # a replica without a model must not start
                # keep serving the old model; the failure is in /v1/model (without the registry's
                # address or local paths) and in full in the log
                self.last_reload_error = f"{type(e).__name__}: could not load {spec.describe()}; see the replica log"
                logger.error("model reload failed, still serving version %s: %s: %s", self.handle.version,
                             type(e).__name__, e)
                return False
            self.handle, self.spec, self.last_reload_error = new, spec, None
            return True

    def check_health(self) -> None:
        if self.handle is None:
            raise RuntimeError("no model loaded: the deployment needs user_config.model")

    # -- model calls --

    def _current(self) -> ModelHandle:
        if self.handle is None:
            raise HTTPException(503, {"field": "", "detail": "model not loaded yet"})
        return self.handle

    async def _answer(self, handle: ModelHandle, job: Job) -> dict:
        out = await self._batched((handle, job)) if self.batching else (await self._run([(handle, job)]))[0]
        if "error" in out:
            raise out["error"]  # NonFiniteError: answered 503 naming the model
        return out

    async def _run(self, work: list[tuple[ModelHandle, Job]]) -> list[dict]:
        if self._infer_pool is None:
            return run_jobs(work)
        return await asyncio.get_running_loop().run_in_executor(self._infer_pool, run_jobs, work)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, work: list[tuple[ModelHandle, Job]]) -> list[dict]:
        self._batched.set_batch_wait_timeout_s(self._wait.observe(len(work)))  # for the next batch
        return await self._run(work)

    def _job(self, kind: str, **fields) -> tuple[ModelHandle, Job]:
        handle = self._current()  # validate and answer on the same model, even across a swap
        return handle, build_job(kind, handle, self.limits, **fields)

    # -- endpoints --

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok" if self.handle is not None else "loading"}

    @app.get(f"/{API_VERSION}/model", response_model=ModelInfo, dependencies=_auth)
    async def model_info(self) -> dict:
        return self._info()

    def _info(self) -> dict:
        info = self._current().info()
        info.update(replica=serve.get_replica_context().replica_tag, auth=self.auth,
                    last_reload_error=self.last_reload_error)
        return info

    @app.post(f"/{API_VERSION}/interests", response_model=InterestsResponse, dependencies=_auth)
    async def interests(self, req: InterestsRequest) -> dict:
        handle, job = self._job("interests", history=req.history, query=req.query)
        out = await self._answer(handle, job)
        return JSONResponse({"interests": out["interests"].tolist(), "model_version": handle.version})

    @app.post(f"/{API_VERSION}/recall", response_model=RecallResponse, dependencies=_auth)
    async def recall(self, req: RecallRequest) -> dict:
        handle, job = self._job("recall", history=req.history, query=req.query, k=req.k,
                                exclude_history=req.exclude_history)
        out = await self._answer(handle, job)
        return JSONResponse({"item_ids": out["item_ids"].tolist(), "scores": out["scores"].tolist(),
                             "model_version": handle.version})

    @app.post(f"/{API_VERSION}/rank", response_model=RankResponse, dependencies=_auth)
    async def rank(self, req: RankRequest) -> dict:
        handle, job = self._job("rank", history=req.history, query=req.query, candidates=req.candidates)
        out = await self._answer(handle, job)
        cols = {k: out[k].tolist() for k in ("item_ids", "head_scores", "max", "mixture", "cosine")}
        return JSONResponse({**cols, "user": out["user"], "model_version": handle.version})

    @app.post(f"/{API_VERSION}/noop", dependencies=_auth)
    async def noop(self, req: RecallRequest) -> dict:
        """Same ingress, parsing and auth as /v1/recall, no model work: the latency floor."""
        return {"ok": True, "n": len(req.history)}

    @app.post(f"/{API_VERSION}/admin/reload", response_model=ReloadResponse, dependencies=_auth)
    async def admin_reload(self, req: ReloadRequest | None = None) -> dict:
        """Re-resolve this replica's model (e.g. after an alias move). Reaches only the replica
        that takes the request: with several replicas push a new user_config instead."""
        if not self.auth_token:
            raise HTTPException(403, {"field": "Authorization",
                                      "detail": "Authorization: admin endpoints need the server's auth token set"})
        if self.spec is None:
            raise HTTPException(503, {"field": "", "detail": "model not loaded yet"})
        reloaded = await self._reload(self.spec, force=bool(req and req.force))
        if self.last_reload_error:
            raise HTTPException(500, {"field": "", "detail": f"reload failed: {self.last_reload_error}"})
        return {"reloaded": reloaded, "model": self._info()}


# ---- application builder ---------------------------------------------------------------------


def user_config_of(a: RankerArgs) -> dict | None:
    model = {k: v for k, v in (("export_path", a.export_path), ("registered_name", a.registered_name),
                                ("alias", a.alias), ("version", a.version), ("tracking_uri", a.tracking_uri),
                                ("dtype", a.dtype), ("index", a.index)) if v is not None}
    if not (a.export_path or a.registered_name):
        return None  # the deploy config's user_config must name the model
    spec = ModelSpec.from_dict(model)  # fail at build time, not on the replicas
    spec.resolve_version()  # ModelNotFoundError naming the model and alias, and listing the aliases
    batching = {"enabled": a.batching, "batch_wait_timeout_s": a.batch_wait_timeout_s,
                "adaptive_wait": a.adaptive_wait}
    if a.max_batch_size is not None:
        batching["max_batch_size"] = a.max_batch_size
    return {"model": model, "revision": a.revision, "batching": batching}


def app_builder(args: dict) -> serve.Application:
    """Build the app from a dict of args (see RankerArgs); usable by `serve run` / `serve deploy`."""
    a = RankerArgs.model_validate(dict(args or {}))
    ServingLimits.from_dict(a.limits)
    options: dict[str, Any] = {
        "num_replicas": a.num_replicas, "max_ongoing_requests": a.max_ongoing_requests,
        "ray_actor_options": a.ray_actor_options,
        "logging_config": {"enable_access_log": a.access_log, "log_level": a.log_level},
    }
    uc = user_config_of(a)
    if uc is not None:
        options["user_config"] = uc
    return Ranker.options(**options).bind(a.limits, a.max_body_bytes, a.torch_threads, a.device,
                                          a.allow_unauthenticated)
