"""Batch recall (`karma-recall`) throughput and memory: users per second and peak RSS of the driver
and of the Ray actors, for synthetic users scored by a randomly initialised registered model.

    python bench/batch_recall.py --users 100000                 # a few minutes on 2 cores
    python bench/batch_recall.py --users 1000000 --merge        # adds the 10^6 point to the JSON

The model: configs/tiny.yaml with 2 heads (mixture), no text encoder, over --items synthetic items,
random weights, registered in a sqlite MLflow store. Users: histories of 1 to --max-history-len
item ids drawn uniformly (the model reads the last data.max_history = 20 of them; all are left out
of the answer), k = 100, one input file per 100,000 users (at least 4 files).

Each size runs in a fresh process with its own local Ray cluster (cores + 1 CPU slots, as
karma-recall starts one), so no worker carries over from one size to the next. Every 0.25 s psutil
reads the RSS of the driver and of every process it started (Ray's GCS, raylet, dashboard and
workers): `actor` is the largest RSS of one MapWorker (an actor of the pool), `actors` the sum
over them, `ray` the sum over every process below the driver (shared pages, e.g. of the object
store, count once per process). Writes bench/results/batch_recall_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "batch_recall_cpu.json"
MIB = 1 << 20


class RssSampler(threading.Thread):
    """Peak and timeline of the RSS of this process and of every process below it."""

    def __init__(self, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.every = every_s
        self.peak = {"driver": 0, "actor": 0, "actors": 0, "ray": 0}
        self.timeline: list[dict] = []
        self.done = 0  # users done, set by the progress callback
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict:
        import psutil

        driver = self.me.memory_info().rss
        actors, ray_total = [], 0
        for p in self.me.children(recursive=True):
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[:1])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            ray_total += rss
            if "MapWorker" in name:
                actors.append(rss)
        now = {"driver": driver, "actor": max(actors, default=0), "actors": sum(actors), "ray": ray_total}
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        return now

    def run(self) -> None:
        while not self._halt.wait(self.every):
            now = self.sample()
            self.timeline.append({"t_s": round(time.monotonic() - self.t0, 2), "users_done": self.done,
                                  **{f"{k}_mib": round(v / MIB, 1) for k, v in now.items()}})

    def stop(self) -> None:
        self._halt.set()
        self.join()


def make_model(tmp: Path, n_items: int) -> str:
    """A randomly initialised tiny model over n_items items, registered as `bench` (alias champion)."""
    import pandas as pd

    from karma.config import load_config
    from karma.export import export_model
    from karma.factory import build_model
    from karma.registry import register_export
    from karma.tracking import RunTracker

    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "title": [f"item {i}" for i in range(n_items)],
                          "category": "c", "brand": "b", "text": ""})
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.text_encoder=none", f"data.cache_dir={tmp / 'cache'}",
                                                       "model.n_interest=2", "model.head_reduce=mixture"])
    model, tok = build_model(cfg, items, log=None)
    export = export_model(model, tok, cfg, items, tmp / "export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with RunTracker("bench-recall", "random", uri) as t:
        register_export(t, export, "bench", "champion")
    return uri


def make_users(folder: Path, users: int, files: int, n_items: int, max_len: int, seed: int = 0) -> int:
    """`users` users in `files` Parquet files; returns their size on disk in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, users, files + 1).astype(np.int64)
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        lengths = rng.integers(1, max_len + 1, hi - lo)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = rng.integers(1, n_items + 1, int(offsets[-1])).astype(np.int64)
        pq.write_table(pa.table({"user_id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                                 "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}),
                       folder / f"part-{f:04d}.parquet")
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def one(args: argparse.Namespace) -> dict:
    """One size, in this process: build, write, score, sample."""
    from karma.recall import RecallSettings, run_recall
    from karma.serving import ModelSpec

    tmp = Path(tempfile.mkdtemp(prefix="bench-recall-"))
    os.environ["KARMA_MODEL_CACHE"] = str(tmp / "model-cache")
    uri = make_model(tmp, args.items)
    files = max(4, args.users // 100_000)
    input_bytes = make_users(tmp / "users", args.users, files, args.items, args.max_history_len)
    sampler = RssSampler()
    progress: list[tuple[float, int]] = []

    def log(line: str) -> None:
        print(line, flush=True)
        m = re.match(r"recall: ([\d,]+) / ", line)
        if m:
            sampler.done = int(m.group(1).replace(",", ""))
            progress.append((time.monotonic(), sampler.done))

    spec = ModelSpec(registered_name="bench", alias="champion", tracking_uri=uri)
    settings = RecallSettings(str(tmp / "users"), str(tmp / "out"), spec, k=args.k, batch_size=args.batch_size,
                              actors=args.actors, progress_every_s=5.0)
    sampler.start()
    result = run_recall(settings, log=log)
    sampler.stop()
    # steady rate: from the first progress line past 10% of the users to the end (actor start-up excluded)
    start = next(((t, n) for t, n in progress if n >= 0.1 * args.users), progress[0])
    end = progress[-1]
    steady = (end[1] - start[1]) / max(end[0] - start[0], 1e-9) if end[1] > start[1] else None
    out_bytes = sum(p.stat().st_size for p in (tmp / "out").glob("*.parquet"))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return {"users": args.users, "files": files, "input_mib": round(input_bytes / MIB, 1),
            "output_mib": round(out_bytes / MIB, 1), "seconds": round(result.seconds, 1),
            "users_per_s": round(result.users_per_s, 1),
            "users_per_s_steady": round(steady, 1) if steady else None,
            "peak_rss_mib": {k: round(v / MIB, 1) for k, v in sampler.peak.items()},
            "rss_timeline": sampler.timeline[:: max(1, len(sampler.timeline) // 40)]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, nargs="+", default=[100_000])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--max-history-len", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--actors", type=int, default=None, help="default: karma-recall's (one per core)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--merge", action="store_true", help="keep the other sizes already in --out")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: run one size, write its JSON here
    args = ap.parse_args(argv)
    if args.one:
        args.users = args.users[0]
        args.one.write_text(json.dumps(one(args)))
        return 0

    import ray
    import torch

    import karma

    runs = []
    for n in args.users:
        load_before = os.getloadavg()  # other work on the host skews every number: record it
        part = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, __file__, "--users", str(n), "--items", str(args.items), "--k", str(args.k),
               "--max-history-len", str(args.max_history_len), "--batch-size", str(args.batch_size),
               "--one", str(part)] + (["--actors", str(args.actors)] if args.actors else [])
        subprocess.run(cmd, check=True)
        runs.append({"command": " ".join(["python", "bench/batch_recall.py", "--users", str(n)]
                                         + (["--actors", str(args.actors)] if args.actors else [])),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
                     **json.loads(part.read_text())})
        part.unlink()
    old = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    keep = [r for r in old.get("runs", []) if r["users"] not in {r2["users"] for r2 in runs}]
    sizes = sorted({r["users"] for r in keep + runs})
    report = {
        "command": " ".join(["python", "bench/batch_recall.py", "--users", *map(str, sizes)]),
        "device": "cpu",
        "device_name": f"{_cpu_name()} ({os.cpu_count()} cores)",
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "karma": karma.__version__},
        "settings": {"model": "configs/tiny.yaml, 2 heads (mixture), no text encoder, random weights, registered",
                     "n_items": args.items, "k": args.k, "history_len": f"uniform 1..{args.max_history_len}",
                     "model_max_history": 20, "exclude_history": True, "batch_size": args.batch_size,
                     "actors": args.actors or "default (one per core)", "actor_torch_threads": 1},
        "runs": sorted(keep + runs, key=lambda r: r["users"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in report["runs"]:
        print(json.dumps({k: r[k] for k in ("users", "seconds", "users_per_s", "users_per_s_steady", "peak_rss_mib")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
