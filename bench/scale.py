"""Cost against data size: the synthetic set at about 10^5, 10^6 and 10^7 events through the real
Ray job (2 CPU workers, ZeRO-2, a fixed number of training steps, the full test evaluation of every
user), one fresh process and Ray cluster per size.

    python bench/scale.py                          # every size below, about 35 minutes on 2 cores
    python bench/scale.py --sizes 1e5 1e6          # a quicker look

A fourth run, `1e7-1k-items`, takes 10^7 events over the 10^5 run's catalogue of 1,000 items: beside the
10^7 run it separates what grows with the data (users, events, test queries) from what grows with the
catalogue (the model's item rows, the frozen text table and the item vectors every stage holds).

For each stage (preparation, text table, worker set-up, training, validation, test) it records
seconds, events or queries per second, and peak RSS: the driver's, the preparation task's (a
process of its own), the text task's, and each worker's after set-up, training and the test. Writes
bench/results/scale_cpu.json and bench/results/scale_cpu.png (log-log memory and time against
events); `bench/make_tables.py` puts the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "scale_cpu.json"

# events -> (users, items): the generator's sequences average about 9 events; items grow with the
# data up to 100,000
SIZES = {"1e5": (11_000, 1_000), "1e6": (110_000, 10_000), "1e7": (1_100_000, 100_000),
         "1e7-1k-items": (1_100_000, 1_000)}
GROWTH = (("1e7", "1e5"), ("1e7-1k-items", "1e5"))  # (size, base): each rank's peak RSS ratio
STEPS = 100
OVERRIDES = ("dist.num_workers=2", "dist.zero_stage=2", "train.batch_size=64", "train.epochs=1",
             f"train.max_steps={STEPS}", "train.eval_max_users=2000", "train.analysis_examples=0",
             "train.log_every=0", "train.early_stop_patience=0")


def run_one(size: str, workdir: Path) -> dict:
    """One size in this process: the Ray job as `karma-train` runs it, then what it measured."""
    from karma.config import load_config
    from karma.train.ray_job import run_training

    users, items = SIZES[size]
    overrides = [*OVERRIDES, f"data.synthetic_users={users}", f"data.synthetic_items={items}",
                 f"dist.storage_path={workdir / 'runs'}", f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                 f"tracking.run_name=scale-{size}", "tracking.experiment=scale"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    start = time.time()
    result = run_training(cfg, log=lambda m: print(f"[scale {size}] {m}", flush=True))
    wall = time.time() - start
    return {"size": size, "overrides": overrides, "wall_seconds": round(wall, 1), "data": result.data,
            "metrics": {k: v for k, v in result.metrics.items() if k.startswith(("cost/", "test/"))},
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}  # other work on the host slows every stage


def stages(r: dict) -> dict:
    """The per-stage view of one size: seconds, rate and peak RSS (MB)."""
    d, m = r["data"], r["metrics"]
    workers = sorted({k.split("/")[1] for k in m if k.startswith("cost/rank")})
    rss = {w: {s: m[f"cost/{w}/rss_mb/{s}"] for s in ("setup", "train", "test")} for w in workers}
    return {
        "size": r["size"],
        "events": d["n_events"], "users": d["n_users"], "items": d["n_items"],
        "prepare": {"seconds": d["seconds"], "events_per_s": round(d["n_events"] / d["seconds"]),
                    "peak_rss_mb": d["peak_rss_mb"], "steps": d["stages"]},
        "text": d.get("text"),
        "setup_seconds": m["cost/setup_seconds"],
        "train": {"seconds": m["cost/train_seconds"], "steps": STEPS,
                  "examples_per_s": round(m["cost/train_examples"] / m["cost/train_seconds"])},
        "valid": {"seconds": m["cost/valid_seconds"], "queries": m["cost/valid_queries"]},
        "test": {"seconds": m["cost/test_seconds"], "queries": m["test/n_queries"],
                 "queries_per_s": round(m["test/n_queries"] / m["cost/test_seconds"])},
        "worker_peak_rss_mb": rss,
        "driver_peak_rss_mb": r["driver_peak_rss_mb"],
        "wall_seconds": r["wall_seconds"],
        "load_average_at_end": r.get("load_average_at_end"),
    }


def growth(rows: dict[str, dict]) -> dict:
    """Each rank's peak RSS at one size over its peak at the base size (all stages), for the
    pairs in GROWTH that were run: how worker memory grows with the data."""
    out = {}
    for size, base in GROWTH:
        if size in rows and base in rows:
            a, b = rows[size]["worker_peak_rss_mb"], rows[base]["worker_peak_rss_mb"]
            out[f"{size}/{base}"] = {w: round(max(a[w].values()) / max(b[w].values()), 2) for w in a if w in b}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = [r for r in rows if r["size"] == "1e7-1k-items"]
    rows = [r for r in rows if r["size"] != "1e7-1k-items"]
    ev = [r["events"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))

    def worker_peak(r):
        return max(max(s.values()) for s in r["worker_peak_rss_mb"].values())

    worker = [worker_peak(r) for r in rows]
    for label, ys in (("preparation task", [r["prepare"]["peak_rss_mb"] for r in rows]),
                      ("worker (max over ranks)", worker), ("driver", [r["driver_peak_rss_mb"] for r in rows])):
        a.plot(ev, ys, "o-", label=label)
    for r in small:
        a.plot([r["events"]], [worker_peak(r)], "k^", label=f"worker, {r['items']:,} items")
    for label, ys in (("preparation", [r["prepare"]["seconds"] for r in rows]),
                      ("text table", [(r["text"] or {}).get("seconds", 0) or None for r in rows]),
                      ("training (fixed steps)", [r["train"]["seconds"] for r in rows]),
                      ("test (every user)", [r["test"]["seconds"] for r in rows]),
                      ("whole job", [r["wall_seconds"] for r in rows])):
        b.plot(ev, ys, "o-", label=label)
    lin = [ev[0], ev[-1]]
    for ax, what in ((a, "peak RSS (MB)"), (b, "seconds")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    # a slope-1 guide from the first test time: what linear growth looks like
    t0 = rows[0]["test"]["seconds"]
    b.plot(lin, [t0, t0 * lin[1] / lin[0]], "k:", lw=1, label="linear")
    b.legend(fontsize=8)
    a.set_title("memory against data size")
    b.set_title("time against data size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--one", choices=list(SIZES), help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory(prefix="karma-scale-") as tmp:
            args.child_out.write_text(json.dumps(run_one(args.one, Path(tmp)), default=float))
        return 0
    from karma.provenance import provenance

    made_by = provenance()  # the code as the runs found it, before anything else changes the checkout
    runs = []
    for size in args.sizes:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            # a fresh process per size: its own Ray cluster, and the driver's peak RSS is its own
            subprocess.run([sys.executable, __file__, "--one", size, "--child-out", f.name], check=True)
            runs.append(json.loads(Path(f.name).read_text()))
    rows = [stages(r) for r in runs]

    out = {"command": "python " + " ".join(shlex.quote(a) for a in ["bench/scale.py", *(argv or sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "provenance": made_by,
           "sizes": rows, "worker_peak_growth": growth({r["size"]: r for r in rows}), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float))
    plot(rows, args.out.with_suffix(".png"))
    for r in rows:
        w = max(max(s.values()) for s in r["worker_peak_rss_mb"].values())
        print(f"{r['events']:>10,} events: prepare {r['prepare']['seconds']:.0f}s ({r['prepare']['peak_rss_mb']:.0f} MB), "
              f"train {r['train']['seconds']:.0f}s, test {r['test']['seconds']:.0f}s "
              f"({r['test']['queries_per_s']:,} q/s), worker peak {w:.0f} MB, driver {r['driver_peak_rss_mb']:.0f} MB")
    print("worker peak RSS growth (per rank):", json.dumps(out["worker_peak_growth"]))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
