"""Latency and throughput of the Serve app on this machine, against 127.0.0.1 only.

Starts its own Ray + Serve (a fresh local cluster), deploys serve_apps.ranker on a tiny trained
export (or --export PATH), and runs a bounded closed-loop load at each concurrency for a fixed
duration: /v1/noop (same ingress, no model work) and /v1/recall alternately, --rounds times per
point (the median is reported), with batching on and then off.
The same model is then called in-process (no HTTP, no Serve) for the floor of the model itself.

    python bench/serve_load.py                                   # ~5 minutes on 2 cores
    python bench/serve_load.py --export runs/export --duration 20 --rounds 5 --concurrency 1 8 32 64

Writes bench/results/serve_load.json: command, versions, settings, numbers, goals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # serve_apps, as the replicas import it
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "platform"),
                                                       os.environ.get("PYTHONPATH")) if p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_of(rounds: list[dict]) -> dict:
    """One point from its rounds: the median of each number, the failures summed."""
    out = {k: rounds[0][k] for k in ("endpoint", "batching", "concurrency")}
    for k in ("rps", "p50_ms", "p95_ms", "p99_ms"):
        vals = [r[k] for r in rounds if r[k] is not None]
        out[k] = round(float(np.median(vals)), 2) if vals else None
    out.update(requests=sum(r["requests"] for r in rounds), failed=sum(r["failed"] for r in rounds),
               rounds=len(rounds), rps_each_round=[r["rps"] for r in rounds])
    return out


def _stats(lat_s: list[float], wall: float, failed: int) -> dict:
    ms = np.asarray(lat_s) * 1e3
    return {"requests": len(lat_s) + failed, "failed": failed, "rps": round(len(lat_s) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


async def _load(url: str, bodies: list[dict], concurrency: int, duration: float, warmup: float) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last one answered."""
    import httpx

    lat: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        start = time.perf_counter()
        t_measure, t_end = start + warmup, start + warmup + duration

        async def worker(i: int) -> None:
            nonlocal failed
            n = i
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await client.post(url, json=bodies[n % len(bodies)])
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                n += concurrency
                if t0 >= t_measure:
                    if ok:
                        lat.append(t1 - t0)
                    else:
                        failed += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return _stats(lat, duration, failed)


def _in_process(export: Path, bodies: list[dict], batch_sizes: list[int], duration: float) -> list[dict]:
    """The model path the replica runs (validation + ModelHandle.run), called directly."""
    import torch

    from karma.serving import ModelHandle, ServingLimits, build_job

    torch.set_num_threads(1)  # as a replica runs it
    handle = ModelHandle.from_export(export)
    limits = ServingLimits()
    out = []
    for b in batch_sizes:
        calls, lat, n = 0, [], 0
        handle.run([build_job("recall", handle, limits, **bodies[0])])  # warm-up
        t_end = time.perf_counter() + duration
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            jobs = [build_job("recall", handle, limits, **bodies[(n + j) % len(bodies)]) for j in range(b)]
            handle.run(jobs)
            lat.append(time.perf_counter() - t0)
            n += b
            calls += 1
        s = _stats(lat, duration, 0)
        s.update(batch=b, requests=n, rps=round(n / duration, 1))  # latency is per call of b requests
        out.append(s)
    return out


def _tiny_export(tmp: Path) -> Path:
    from karma.config import load_config
    from karma.export import export_model
    from karma.train.plain import train_plain

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.max_steps=20", f"data.cache_dir={tmp / 'cache'}",
                                                       "model.n_interest=2", "model.head_reduce=mixture"])
    r = train_plain(cfg, log=lambda *_: None)
    return export_model(r["model"], r["tokenizer"], cfg, r["prepared"].data.items, tmp / "export")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=None, help="an export folder (default: train a tiny one)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds measured per point and round")
    ap.add_argument("--rounds", type=int, default=3, help="noop/recall alternations per point (median reported)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each point")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--history", type=int, default=10, help="items per request history")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load.json")
    args = ap.parse_args()
    t_start = time.time()
    load_before = os.getloadavg()  # other work on the host skews every number: record it

    import fastapi
    import ray
    import torch
    from ray import serve

    import karma
    from karma.export import load_export
    from serve_apps.ranker import app_builder

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    export = args.export or _tiny_export(tmp)
    ids = load_export(export).items["item_id"].to_numpy()
    rng = np.random.default_rng(0)
    bodies = [{"history": rng.choice(ids, args.history, replace=False).tolist(), "k": args.k} for _ in range(64)]

    port = _free_port()
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=max(cpus, args.replicas), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ["PYTHONPATH"]}})
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    url = f"http://127.0.0.1:{port}"
    rounds: list[dict] = []
    try:
        for batching in (True, False):
            serve.run(app_builder({"export_path": str(export), "batching": batching, "num_replicas": args.replicas,
                                   "ray_actor_options": {"num_cpus": 1}}), name="ranker", route_prefix="/")
            # noop and recall alternate, round after round: slow drifts of a shared host (other
            # jobs, thermal) then hit both endpoints alike instead of biasing their ratio
            for rnd in range(args.rounds):
                for c in args.concurrency:
                    for endpoint in ("/v1/noop", "/v1/recall"):
                        res = asyncio.run(_load(url + endpoint, bodies, c, args.duration, args.warmup))
                        res.update(endpoint=endpoint, batching=batching, concurrency=c, round=rnd)
                        rounds.append(res)
                        print(json.dumps(res), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    http = [_median_of([r for r in rounds if (r["endpoint"], r["batching"], r["concurrency"]) == key])
            for key in dict.fromkeys((r["endpoint"], r["batching"], r["concurrency"]) for r in rounds)]
    local = _in_process(export, bodies, [1, 8, 32], min(args.duration, 5.0))
    shutil.rmtree(tmp, ignore_errors=True)  # the tiny export, when this run trained one
    for r in local:
        print(json.dumps({"in_process": True, **r}), flush=True)

    def pick(endpoint: str, batching: bool, c: int) -> dict | None:
        return next((r for r in http if (r["endpoint"], r["batching"], r["concurrency"]) == (endpoint, batching, c)),
                    None)

    goals = {}
    lo, hi = min(args.concurrency), max(args.concurrency)
    for batching in (True, False):
        tag = "batching_on" if batching else "batching_off"
        rec1, noop1 = pick("/v1/recall", batching, lo), pick("/v1/noop", batching, lo)
        recN, noopN = pick("/v1/recall", batching, hi), pick("/v1/noop", batching, hi)
        goals[f"recall_p50_at_{lo}_client_le_2x_noop_{tag}"] = {
            "recall_p50_ms": rec1["p50_ms"], "noop_p50_ms": noop1["p50_ms"],
            "ratio": round(rec1["p50_ms"] / noop1["p50_ms"], 2), "met": rec1["p50_ms"] <= 2 * noop1["p50_ms"]}
        goals[f"recall_rps_at_{hi}_clients_ge_noop_{tag}"] = {
            "recall_rps": recN["rps"], "noop_rps": noopN["rps"], "ratio": round(recN["rps"] / noopN["rps"], 2),
            "met": recN["rps"] >= noopN["rps"]}
    failed = sum(r["failed"] for r in rounds)
    goals["zero_failed_requests"] = {"failed": failed, "met": failed == 0}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": cpus, "machine": platform.machine(), "python": platform.python_version(),
                 "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "fastapi": fastapi.__version__,
                     "karma": karma.__version__},
        "settings": {"export": str(export) if args.export else "tiny trained export (configs/tiny.yaml, 20 steps, "
                     "2 heads, mixture)", "n_items": int(len(ids)), "history": args.history, "k": args.k,
                     "duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup, "replicas": args.replicas,
                     "replica_torch_threads": 1, "max_batch_size": 16, "batch_wait_timeout_s": 0.0,
                     "access_log": False, "log_level": "WARNING", "client": "httpx.AsyncClient, one process"},
        "http": http,
        "http_rounds": rounds,
        "in_process": local,
        "goals": goals,
        "seconds": round(time.time() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(goals, indent=2))
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
