"""The Serve app end to end: one real Ray + Serve session for the module, the app deployed with
`serve deploy` from serve_apps/ranker.yaml (its model in a real MLflow sqlite registry), HTTP on
127.0.0.1 through httpx. Two tiny trained models are registered as versions 1 and 2. The last
test restarts Serve listening beyond loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import torch
import yaml
from ray import serve
from safetensors.torch import load_file, save_file

from conftest import tiny_cfg
from karma.config import load_config
from karma.data import collate
from karma.export import export_model, load_export
from karma.losses import head_scores
from karma.retrieval import exact_topk
from karma.serving import TOKEN_FILE_ENV, ModelNotFoundError
from karma.batch import prepare_batch
from karma.registry import register_export, set_alias
from karma.tracking import RunTracker, resolve_tracking_uri
from karma.train.plain import train_plain
from karma.train.ray_job import storage_root

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # serve_apps, as the replicas import it
TOKEN = "serve-test-token-0123456789"
NAME = "karma-serve-test"
ATOL = 1e-5  # fp32 model on CPU; batched (padded) and lone forward passes agree to ~1e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory, cache_dir) -> list[Path]:
    """Version 1 and version 2: same architecture (2 heads, mixture), other seed and steps."""
    out = []
    for seed, steps in ((0, 20), (1, 10)):
        cfg = tiny_cfg(cache_dir, "model.n_interest=2", "model.head_reduce=mixture", f"train.seed={seed}",
                       f"train.max_steps={steps}", "train.eval_max_users=50")
        r = train_plain(cfg, log=lambda *_: None)
        out.append(export_model(r["model"], r["tokenizer"], cfg, r["prepared"].data.items,
                                tmp_path_factory.mktemp(f"export-v{seed + 1}")))
    return out


@pytest.fixture(scope="module")
def registry(exports, tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with RunTracker("serve-test", "v1", uri) as t:
        assert register_export(t, exports[0], NAME, "champion") == "1"
    with RunTracker("serve-test", "v2", uri) as t:
        assert register_export(t, exports[1], NAME, None) == "2"
    return uri


class Server:
    def __init__(self, cfg: dict, dashboard: str, url: str, uri: str, tmp: Path) -> None:
        self.cfg, self.dashboard, self.url, self.uri, self.tmp = cfg, dashboard, url, uri, tmp
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def deploy(self) -> None:
        """`serve deploy` of self.cfg (returns once the cluster accepted it)."""
        path = self.tmp / f"ranker-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(self.cfg))
        serve_cli = Path(sys.executable).parent / "serve"
        r = subprocess.run([str(serve_cli), "deploy", str(path), "-a", self.dashboard],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]

    def wait_running(self, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            app = serve.status().applications.get("ranker")
            if app is not None and app.status == "DEPLOY_FAILED":
                raise AssertionError(f"deploy failed: {app.message}")
            dep = app.deployments.get("Ranker") if app else None
            if app is not None and app.status == "RUNNING" and dep and dep.replica_states.get("RUNNING") == 2:
                return
            time.sleep(0.25)
        raise AssertionError(f"app not running after {timeout}s: {serve.status()}")


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform")]), "OMP_NUM_THREADS": "1",
           "KARMA_MODEL_CACHE": str(tmp / "model-cache")}
    token_file = tmp / "serve-token"
    token_file.write_text(TOKEN + "\n")
    port, dport = _free_port(), _free_port()
    # address="local": always a fresh cluster of our own, never one that happens to run here
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dport, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        cfg = yaml.safe_load((ROOT / "serve_apps" / "ranker.yaml").read_text())
        cfg["http_options"]["port"] = port
        app = cfg["applications"][0]
        app["runtime_env"] = {"env_vars": {**env, TOKEN_FILE_ENV: str(token_file)}}  # the path, not the token
        dep = app["deployments"][0]
        assert dep["num_replicas"] == 2
        dep["ray_actor_options"]["num_cpus"] = 0.5
        dep["user_config"]["model"] = {"registered_name": NAME, "alias": "champion", "tracking_uri": registry}
        dep["user_config"]["batching"]["batch_wait_timeout_s"] = 0.005
        s = Server(cfg, f"http://127.0.0.1:{dport}", f"http://127.0.0.1:{port}", registry, tmp)
        s.deploy()
        s.wait_running()
        yield s
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::ranker#"))


def _item_ids(export: Path) -> np.ndarray:
    return load_export(export).items["item_id"].to_numpy()


class Load:
    """A bounded closed-loop load: `threads` clients posting one request until stopped."""

    def __init__(self, url: str, path: str, body: dict, threads: int = 4) -> None:
        self.url, self.path, self.body, self.n = url, path, body, threads
        self.results: list[tuple[float, int | None, str | None]] = []  # (time, status, version)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            while not self._stop.is_set():
                t = time.time()
                try:
                    r = c.post(self.path, json=self.body)
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    rec = (t, r.status_code, version)
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    rec = (t, None, None)
                    self.errors.append(repr(e))
                with self._lock:
                    self.results.append(rec)
                time.sleep(0.005)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.n)]
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=60)

    def failed(self) -> int:
        return sum(1 for _, status, _ in self.results if status != 200)

    def versions(self) -> list[str | None]:
        with self._lock:
            return [v for _, _, v in self.results]


# ---- endpoints -------------------------------------------------------------------------------


def test_all_endpoints_answer(server, exports) -> None:
    from serve_apps.ranker import InterestsResponse, RankResponse, RecallResponse

    ids = _item_ids(exports[0])
    c = server.client
    assert c.get("/healthz").json() == {"status": "ok"}
    info = c.get("/v1/model").json()
    ref = load_export(exports[0])
    assert (info["registered_name"], info["version"], info["alias"]) == (NAME, "1", "champion")
    assert info["config_digest"] == ref.meta["config_digest"] and info["n_items"] == len(ids)
    assert info["n_heads"] == 2 and info["head_reduce"] == "mixture" and info["loaded_at"]
    assert info["source"] == f"models:/{NAME}/1" and info["auth"] == "token"
    hist = ids[:3].tolist()
    z = c.post("/v1/interests", json={"history": hist, "query": "gloves"}).json()
    assert np.asarray(z["interests"]).shape == (2, 32) and z["model_version"] == "1"
    rec = c.post("/v1/recall", json={"history": hist, "k": 7}).json()
    scores = rec["scores"]
    assert len(scores) == len(rec["item_ids"]) == 7 and scores == sorted(scores, reverse=True)
    assert not set(rec["item_ids"]) & set(hist)
    rank = c.post("/v1/rank", json={"history": hist, "candidates": ids[5:9].tolist()}).json()
    assert rank["item_ids"] == ids[5:9].tolist()
    assert np.asarray(rank["head_scores"]).shape == (4, 2)
    assert all(len(rank[col]) == 4 for col in ("max", "mixture", "cosine"))
    assert rank["user"]["history_length"] == 3 and len(rank["user"]["mixture_weights"]) == 2
    # the bodies are built by hand for speed: they must still be what the OpenAPI document says
    for model, body in ((InterestsResponse, z), (RecallResponse, rec), (RankResponse, rank)):
        assert model.model_validate(body).model_dump() == body
    assert c.post("/v1/noop", json={"history": hist}).json() == {"ok": True, "n": 3}
    paths = c.get("/openapi.json").json()["paths"]
    for p in ("/v1/interests", "/v1/recall", "/v1/rank", "/v1/model", "/v1/noop", "/v1/admin/reload", "/healthz"):
        assert p in paths
    assert "RankResponse" in c.get("/openapi.json").json()["components"]["schemas"]


def test_model_info_names_the_model_without_local_paths(server) -> None:
    text = server.client.get("/v1/model").text
    info = server.client.get("/v1/model").json()
    assert (info["registered_name"], info["version"], info["alias"]) == (NAME, "1", "champion")
    cache = str(server.tmp / "model-cache")
    assert cache not in text and str(server.tmp) not in text and server.uri not in text
    assert not any(isinstance(v, str) and v.startswith("/") for v in info.values()), info


def _reference(m, rows: list[int], query: str | None) -> tuple[np.ndarray, np.ndarray]:
    """z [H,d] and mixture logits [H] straight from the model, one request per forward pass."""
    batch = {"user_id": [0], "history": [np.asarray(rows)], "target": [0], "query": [query or ""],
             "shown": [np.zeros(0, np.int64)]}
    with torch.no_grad():
        out = m.model.interests(prepare_batch(collate(batch, m.cfg.data.max_history), m.model, m.tok, m.device))
    return out["z"][0].numpy(), out["mix_logits"][0].numpy()


def test_answers_equal_the_in_process_model(server, exports) -> None:
    """Interests, recall and rank features equal load_export's model on the same inputs within
    ATOL, with requests sent concurrently so the server batches several into one forward pass."""
    m = load_export(exports[0])
    ids = m.items["item_id"].to_numpy()
    rng = np.random.default_rng(0)
    cases = [(rng.choice(len(ids), size=int(rng.integers(1, 20)), replace=False).tolist(),
              "soldering iron" if i % 3 == 0 else None) for i in range(12)]
    cands = rng.choice(len(ids), size=10, replace=False)

    def ask(case):
        rows, q = case
        hist = ids[rows].tolist()
        c = server.client
        return (c.post("/v1/interests", json={"history": hist, "query": q}).json(),
                c.post("/v1/recall", json={"history": hist, "query": q, "k": 10}).json(),
                c.post("/v1/rank", json={"history": hist, "query": q, "candidates": ids[cands].tolist()}).json())

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases))
    emb = m.item_emb[cands]
    for (rows, q), (zi, rec, rank) in zip(cases, answers):
        z_ref = m.interests([rows], [q or ""])[0]
        np.testing.assert_allclose(zi["interests"], z_ref, atol=ATOL)
        z, mix = _reference(m, rows, q)
        np.testing.assert_allclose(z, z_ref, atol=ATOL)
        s, top = exact_topk(torch.from_numpy(z[None]), torch.tensor(m.item_emb), 10, torch.tensor([rows]))
        assert rec["item_ids"] == ids[top[0].numpy()].tolist()
        np.testing.assert_allclose(rec["scores"], s[0].numpy(), atol=ATOL)
        heads = emb @ z.T
        np.testing.assert_allclose(rank["head_scores"], heads, atol=ATOL)
        np.testing.assert_allclose(rank["max"], heads.max(1), atol=ATOL)
        mixture = head_scores(torch.from_numpy(z[None]), torch.from_numpy(emb), "mixture",
                              torch.from_numpy(mix[None]))[0].numpy()
        np.testing.assert_allclose(rank["mixture"], mixture, atol=ATOL)
        mean = z.mean(0)
        cos = emb @ mean / (np.linalg.norm(emb, axis=1) * np.linalg.norm(mean))
        np.testing.assert_allclose(rank["cosine"], cos, atol=ATOL)


# ---- bad requests ----------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
# (name, path, json body or raw bytes, headers, expected status, field the body must name)
BAD = [
    ("unknown item id", "/v1/recall", {"history": [1, 987654321]}, AUTH, 422, "history"),
    ("empty history", "/v1/recall", {"history": []}, AUTH, 422, "history"),
    ("history too long", "/v1/interests", {"history": [1] * 21}, AUTH, 422, "history"),
    ("k zero", "/v1/recall", {"history": [1], "k": 0}, AUTH, 422, "k"),
    ("k too large", "/v1/recall", {"history": [1], "k": 1001}, AUTH, 422, "k"),
    ("k as string", "/v1/recall", {"history": [1], "k": "5"}, AUTH, 422, "k"),
    ("candidates empty", "/v1/rank", {"history": [1], "candidates": []}, AUTH, 422, "candidates"),
    ("too many candidates", "/v1/rank", {"history": [1], "candidates": [1] * 1001}, AUTH, 422, "candidates"),
    ("unknown candidate", "/v1/rank", {"history": [1], "candidates": [2, -5]}, AUTH, 422, "candidates"),
    ("candidates missing", "/v1/rank", {"history": [1]}, AUTH, 422, "candidates"),
    ("string ids", "/v1/recall", {"history": ["1", "2"]}, AUTH, 422, "history[0]"),
    ("float ids", "/v1/recall", {"history": [1, 2.0]}, AUTH, 422, "history[1]"),
    ("boolean ids", "/v1/interests", {"history": [True]}, AUTH, 422, "history[0]"),
    ("id beyond int64", "/v1/interests", {"history": [2**70]}, AUTH, 422, "history[0]"),
    ("null history", "/v1/recall", {"history": None}, AUTH, 422, "history"),
    ("history an object", "/v1/recall", {"history": {"a": 1}}, AUTH, 422, "history"),
    ("missing history", "/v1/recall", {"k": 3}, AUTH, 422, "history"),
    ("misspelt field", "/v1/recall", {"history": [1], "histroy": [2]}, AUTH, 422, "histroy"),
    ("exclude_history not bool", "/v1/recall", {"history": [1], "exclude_history": "yes"}, AUTH, 422,
     "exclude_history"),
    ("query too long", "/v1/recall", {"history": [1], "query": "x" * 513}, AUTH, 422, "query"),
    ("query not a string", "/v1/interests", {"history": [1], "query": 5}, AUTH, 422, "query"),
    ("body a list", "/v1/recall", [1, 2], AUTH, 422, "body"),
    ("wrong JSON", "/v1/recall", b'{"history": [1,', {**AUTH, **JSON}, 400, "body"),
    ("body too large", "/v1/recall", b'{"history": [' + b"1," * 150_000 + b"1]}", {**AUTH, **JSON}, 413, "body"),
    ("no bearer token", "/v1/recall", {"history": [1]}, {}, 401, "Authorization"),
    ("bad bearer token", "/v1/recall", {"history": [1]}, {"Authorization": "Bearer nope"}, 401, "Authorization"),
    ("token on /v1/model", "/v1/model", None, {}, 401, "Authorization"),
    ("admin reload without token", "/v1/admin/reload", {}, {"Authorization": "Basic eDp5"}, 401, "Authorization"),
]


@pytest.mark.parametrize("name, path, body, headers, status, field", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_naming_the_field(server, name, path, body, headers, status, field) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        if body is None:
            r = c.get(path, headers=headers)
        elif isinstance(body, bytes):
            r = c.post(path, content=body, headers=headers)
        else:
            r = c.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    got = r.json()
    assert got["field"] == field, got
    assert field in got["detail"], got


def test_server_still_answers_after_the_bad_requests(server, exports) -> None:
    ids = _item_ids(exports[0])
    r = server.client.post("/v1/recall", json={"history": ids[:2].tolist(), "k": 3})
    assert r.status_code == 200 and len(r.json()["item_ids"]) == 3
    unknown = server.client.post("/v1/recall", json={"history": [1, 987654321]}).json()
    assert "987654321" in unknown["detail"]  # the unknown id is listed


def test_oversized_chunked_body_gets_413_and_the_rest_is_not_read(server) -> None:
    """A chunked body (no Content-Length) that never ends: 413 naming the limit as soon as it
    passes max_body_bytes, then the server closes the connection instead of reading on."""
    host, port = server.url.removeprefix("http://").split(":")
    cap, chunk = 192 * 2**20, b"1" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    got = bytearray()
    with socket.create_connection((host, int(port)), timeout=60) as s:

        def read() -> None:
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                got.extend(data)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        s.sendall(f"POST /v1/recall HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                  + b'd\r\n{"history": [\r\n')
        sent = 0
        with pytest.raises(OSError):  # the server hung up: no more of the body is read
            while sent < cap:
                s.sendall(frame)
                sent += len(chunk)
        reader.join(30)
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), bytes(got[:300])
    assert b"connection: close" in head.lower()
    assert b'"field":"body"' in body and b"larger than the limit of 262144 bytes" in body
    assert sent < cap // 2, f"the server read {sent / 2**20:.0f} MiB after refusing the body"


# ---- version switch --------------------------------------------------------------------------


def test_alias_move_and_user_config_push_switch_versions_without_failures(server, exports) -> None:
    ids = _item_ids(exports[0])
    hist = ids[[3, 9, 27]].tolist()
    before = np.asarray(server.client.post("/v1/interests", json={"history": hist}).json()["interests"])
    replicas = _replicas()
    with Load(server.url, "/v1/rank", {"history": hist, "candidates": ids[:50].tolist()}) as load:
        time.sleep(1.0)
        set_alias(NAME, "champion", "2", server.uri)
        server.cfg["applications"][0]["deployments"][0]["user_config"]["revision"] = 2
        server.deploy()
        end = time.time() + 90
        while time.time() < end:  # both replicas swapped: the last 40 answers all come from v2
            tail = load.versions()[-40:]
            if len(tail) == 40 and set(tail) == {"2"}:
                break
            time.sleep(0.2)
        time.sleep(0.5)
    versions = load.versions()
    print(f"\nversion switch: {len(versions)} requests, {load.failed()} failed, "
          f"{versions.count('1')} answered by v1, {versions.count('2')} by v2")
    assert load.failed() == 0, load.errors[:5]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions[-40:]) == {"2"}
    assert _replicas() == replicas  # swapped in place by reconfigure, not by new replicas
    server.wait_running()
    info = server.client.get("/v1/model").json()
    assert (info["version"], info["alias"], info["last_reload_error"]) == ("2", "champion", None)
    assert info["config_digest"] == load_export(exports[1]).meta["config_digest"]
    after = np.asarray(server.client.post("/v1/interests", json={"history": hist}).json()["interests"])
    v2 = load_export(exports[1])
    np.testing.assert_allclose(after, v2.interests([v2.rows_of(hist).tolist()])[0], atol=ATOL)
    assert np.abs(after - before).max() > 1e-3


def test_admin_reload_switches_the_replica_it_reaches(server) -> None:
    set_alias(NAME, "champion", "1", server.uri)
    seen: dict[str, str] = {}
    for _ in range(60):  # each call reaches one replica; routing spreads them over both
        r = server.client.post("/v1/admin/reload", json={})
        assert r.status_code == 200, r.text
        model = r.json()["model"]
        seen[model["replica"]] = model["version"]
        if len(seen) == 2 and set(seen.values()) == {"1"}:
            break
    assert len(seen) == 2 and set(seen.values()) == {"1"}, seen
    r = server.client.post("/v1/admin/reload", json={})
    assert r.json()["reloaded"] is False  # already on the alias' version


def _on_every_replica(server, check, timeout: float = 60) -> dict[str, dict]:
    """Sample /v1/model until each of the 2 replicas has answered with `check(info)` true."""
    seen: dict[str, dict] = {}
    end = time.time() + timeout
    while time.time() < end:
        info = server.client.get("/v1/model").json()
        if check(info):
            seen[info["replica"]] = info
            if len(seen) == 2:
                return seen
        time.sleep(0.1)
    raise AssertionError(f"not every replica got there: {seen}")


# ---- faults ------------------------------------------------------------------------------------


def test_failed_reload_keeps_serving_the_old_version(server, exports) -> None:
    ids = _item_ids(exports[0])
    uc = server.cfg["applications"][0]["deployments"][0]["user_config"]
    uc["model"]["alias"], uc["revision"] = "no-such-alias", 3
    server.deploy()
    seen = _on_every_replica(server, lambda i: i["last_reload_error"] is not None)
    for info in seen.values():
        assert info["version"] == "1" and "no-such-alias" in info["last_reload_error"]
        assert info["last_reload_error"].startswith("ModelNotFoundError") and server.uri not in info["last_reload_error"]
    r = server.client.post("/v1/recall", json={"history": ids[:3].tolist(), "k": 5})
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    uc["model"]["alias"], uc["revision"] = "champion", 4
    server.deploy()
    _on_every_replica(server, lambda i: i["last_reload_error"] is None and i["version"] == "1")
    server.wait_running()


def test_replica_killed_under_load(server, exports) -> None:
    ids = _item_ids(exports[0])
    body = {"history": ids[:5].tolist(), "k": 20}
    victim = _replicas()[0]
    with Load(server.url, "/v1/recall", body) as load:
        time.sleep(1.5)
        killed_at = time.time()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        time.sleep(4.0)
    failed = load.failed()
    after = [s for t, s, _ in load.results if t > killed_at + 1.0]
    print(f"\nreplica kill: {len(load.results)} requests, {failed} failed "
          f"({len(after)} sent from 1 s after the kill, {after.count(200)} of them ok)")
    assert failed <= 8, load.errors[:10]  # at most what was in flight on the victim, give or take
    assert after and after.count(200) >= 0.9 * len(after)  # traffic went on through the survivor
    end = time.time() + 90  # the controller notices the death and starts a replacement
    while time.time() < end and (victim in _replicas() or len(_replicas()) != 2):
        time.sleep(0.25)
    assert victim not in _replicas() and len(_replicas()) == 2
    server.wait_running()
    for _ in range(20):
        assert server.client.post("/v1/recall", json=body).status_code == 200


# ---- the Python API ----------------------------------------------------------------------------


def test_serve_run_with_the_python_builder(server, nan_export) -> None:
    """`serve.run(app_builder(...))` with an export path, no token, on loopback: /v1 answers without
    auth, the admin route is off. The export's weights hold a NaN (its item table is intact), so
    every model answer is NaN: a clear 503 naming the model, never a bare 500."""
    from serve_apps.ranker import app_builder

    app = app_builder({"export_path": str(nan_export), "batching": "false",
                       "ray_actor_options": {"num_cpus": 0.25}, "limits": {"max_k": 5}})
    serve.run(app, name="py", route_prefix="/py", blocking=False)
    try:
        with httpx.Client(base_url=server.url + "/py", timeout=60) as c:
            info = c.get("/v1/model").json()
            assert info["source"] == "export" and info["version"] is None and info["auth"] == "none (loopback)"
            ids = _item_ids(nan_export)[:3].tolist()
            r = c.post("/v1/recall", json={"history": ids, "k": 6})
            assert r.status_code == 422 and r.json()["field"] == "k"
            assert c.post("/v1/admin/reload", json={}).status_code == 403  # no token: no admin
            for path, body in (("/v1/interests", {"history": ids}), ("/v1/recall", {"history": ids, "k": 5}),
                               ("/v1/rank", {"history": ids, "candidates": ids})):
                r = c.post(path, json=body)
                assert r.status_code == 503, (path, r.status_code, r.text)
                got = r.json()
                assert got["field"] == "model" and "NaN or infinite" in got["detail"] and "export folder" in got["detail"]
            assert c.get("/healthz").json() == {"status": "ok"}
    finally:
        serve.delete("py")


# ---- bad input at startup, bad model output ----------------------------------------------------


def test_bad_alias_at_startup_names_the_model_and_lists_its_aliases(server) -> None:
    """`serve run ... alias=<missing>` fails before any replica starts, with a named error. (A model
    named in the deploy config's user_config goes through the same ModelSpec.resolve_version on the
    replicas: see test_failed_reload_keeps_serving_the_old_version.)"""
    from serve_apps.ranker import app_builder

    with pytest.raises(ModelNotFoundError) as e:  # `serve run ... alias=no-such-alias`: before any replica
        app_builder({"registered_name": NAME, "alias": "no-such-alias", "tracking_uri": server.uri})
    msg = str(e.value)
    assert f"{NAME!r} has no alias 'no-such-alias'" in msg and "'champion': '1'" in msg
    assert "get_registered_model" in msg and "set_alias" in msg
    with pytest.raises(ModelNotFoundError, match=r"no registered model 'karma-nope'.*" + NAME):
        app_builder({"registered_name": "karma-nope", "tracking_uri": server.uri})


@pytest.fixture(scope="module")
def nan_export(exports, tmp_path_factory) -> Path:
    """Version 2's export with one backbone weight NaN: its item table is intact, every answer NaN."""
    out = tmp_path_factory.mktemp("nan") / "export"
    shutil.copytree(exports[1], out)
    state = load_file(str(out / "model.safetensors"))
    key = next(k for k in state if "layers.0" in k and state[k].is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(out / "model.safetensors"))
    return out


# ---- README's serving commands after README's main job ----------------------------------------


def _readme_serving_commands() -> tuple[list[str], str]:
    """The `serve run` argv and the curl command of README's "Serving" section."""
    section = (ROOT / "README.md").read_text().split("## Serving (Ray Serve)", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    serve_run = next(shlex.split(ln) for ln in lines if " serve run " in f" {ln} " or "/serve run " in ln)
    curl = next(ln for ln in lines if ln.startswith("curl "))
    return serve_run, curl


def test_readme_serving_commands_serve_what_the_main_job_registers(server, exports, monkeypatch) -> None:
    """README: `jobs/train.py` (the embedded default), then its `serve run`, then its recall request.
    The serve command must name the model, alias and registry the default job writes; the tiny
    model stands in for the default job's (same registration), then README's args and request
    are run through what `serve run` does with them."""
    from ray._common.utils import import_attr
    from ray.serve._private import api as _private_api
    from ray.serve.scripts import convert_args_to_dict

    argv, curl = _readme_serving_commands()
    i = argv.index("run")
    assert argv[i + 1:i + 3] == ["-a", "local"]
    import_path, args = argv[i + 3], convert_args_to_dict(tuple(argv[i + 4:]))
    default = load_config(None)  # what `python jobs/train.py` without arguments trains
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)
    job_uri = resolve_tracking_uri(default.tracking.tracking_uri, storage_root(default))
    assert args["registered_name"] == (default.tracking.registered_model or default.tracking.experiment)
    assert args["alias"] == default.tracking.alias and default.tracking.register
    assert args["tracking_uri"].replace("$PWD", str(ROOT)) == job_uri

    # the same registration as the default job's, in the module's registry instead of runs/mlflow.db
    with RunTracker(default.tracking.experiment, default.tracking.run_name, server.uri) as t:
        register_export(t, exports[0], args["registered_name"], default.tracking.alias)
    app = _private_api.call_user_app_builder_with_args_if_necessary(import_attr(import_path),
                                                                    {**args, "tracking_uri": server.uri})
    serve.run(app, name="readme", route_prefix="/readme", blocking=False)
    try:
        request = shlex.split(curl)
        url = request[request.index("-s") + 1]
        body = request[request.index("-d") + 1]
        headers = dict(h.split(": ", 1) for h in (request[j + 1] for j, a in enumerate(request) if a == "-H"))
        assert url.startswith("127.0.0.1:8000/")  # serve run's default proxy address
        r = httpx.post(server.url + "/readme/" + url.split("/", 1)[1], content=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        k = json.loads(body).get("k", 100)
        assert len(r.json()["item_ids"]) == k and r.json()["model_version"] == "1"
    finally:
        serve.delete("readme")


# ---- beyond loopback (restarts Serve: keep last) -------------------------------------------------


def test_beyond_loopback_a_replica_needs_a_token_or_the_explicit_opt_out(server, exports) -> None:
    """Serve listening on 0.0.0.0: without a token the app refuses to start, naming the fix;
    allow_unauthenticated=true starts, open, and says so. (A token from a file: the module's server.)"""
    from serve_apps.ranker import Ranker, app_builder

    serve.shutdown()
    port = _free_port()
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    no_token = Ranker.options(ray_actor_options={"num_cpus": 0.25}, max_constructor_retry_count=1).bind()
    opt_out = app_builder({"export_path": str(exports[1]), "batching": "false", "allow_unauthenticated": "true",
                           "ray_actor_options": {"num_cpus": 0.25}})
    for name, app in (("open", no_token), ("optout", opt_out)):  # both start at once
        serve._run(app, _blocking=False, name=name, route_prefix=f"/{name}")
    end = time.time() + 180
    while time.time() < end:
        apps = serve.status().applications
        if apps["open"].status == "DEPLOY_FAILED" and apps["optout"].status == "RUNNING":
            break
        time.sleep(0.5)
    apps = serve.status().applications
    failure = "\n".join([apps["open"].message, *(d.message for d in apps["open"].deployments.values())])
    assert apps["open"].status == "DEPLOY_FAILED", failure
    assert "ExposureError" in failure and "'0.0.0.0'" in failure
    assert TOKEN_FILE_ENV in failure and "allow_unauthenticated=true" in failure
    assert apps["optout"].status == "RUNNING", apps["optout"]
    info = httpx.get(f"http://127.0.0.1:{port}/optout/v1/model", timeout=30).json()
    assert info["auth"] == "none (allow_unauthenticated)"
    serve.delete("open")
    serve.delete("optout")
