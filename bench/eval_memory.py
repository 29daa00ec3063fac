"""Peak memory and time of full-corpus evaluation by user count: karma.retrieval.evaluate_retrieval
(exact ranks, HR/NDCG@10/50/200, MRR) for random queries against random items, each user count
in a fresh process whose peak RSS (getrusage) is its own.

    python bench/eval_memory.py                                   # 2,500 / 10,000 / 100,000 / 1,000,000 users
    python bench/eval_memory.py --users 2500 10000 --karma-path ../main/platform --out before.json

A user count is skipped, and the JSON says why, when the previous count's seconds scaled by users
predict more than --budget-s. --karma-path runs the children on another copy of the package (the
code before a change, say); the JSON records that copy's git commit.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> dict:
    """One measurement, in its own process: generate the inputs, then evaluate them once."""
    import numpy as np
    import torch

    import karma.retrieval as retrieval

    rng = np.random.default_rng(args.seed)
    items = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.child, args.dim), dtype=np.float32)
    targets = rng.integers(0, args.items, args.child)
    inputs = rss_mib()
    chunks = {"chunk_size": args.chunk_size} | ({} if args.user_chunk is None else {"user_chunk": args.user_chunk})
    start = time.perf_counter()
    metrics = retrieval.evaluate_retrieval(queries, items, targets, ks=(10, 50, 200), **chunks)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    default = getattr(retrieval, "_user_chunk", None)
    return {"users": args.child, "seconds": round(seconds, 2), "users_per_s": round(args.child / seconds, 1),
            "peak_rss_mib": round(peak, 1), "inputs_rss_mib": round(inputs, 1),
            "peak_over_inputs_mib": round(peak - inputs, 1),
            "user_chunk": args.user_chunk or (default(torch.device("cpu")) if default else "all"),
            "torch_threads": torch.get_num_threads(), "karma": retrieval.__file__,
            "HR@10": metrics["HR@10"], "MRR": metrics["MRR"], "n_queries": metrics["n_queries"]}


def measure(args: argparse.Namespace, users: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(users), "--items", str(args.items), "--dim", str(args.dim),
           "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)]
    cmd += [] if args.user_chunk is None else ["--user-chunk", str(args.user_chunk)]
    env = dict(os.environ)
    if args.karma_path:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.karma_path).resolve()), env.get("PYTHONPATH", "")])
    load = os.getloadavg()[0]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return {**json.loads(out.splitlines()[-1]), "load_avg_1m_before": round(load, 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[2_500, 10_000, 100_000, 1_000_000])
    ap.add_argument("--items", type=int, default=65_536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=65_536, help="items scored at once")
    ap.add_argument("--user-chunk", type=int, help="users scored at once (default: the library's, per device)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="skip a user count predicted to take longer")
    ap.add_argument("--karma-path", help="folder holding the karma package the children import instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_memory_cpu.json")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from karma.provenance import git_state, provenance, with_provenance

    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    settings = {"items": args.items, "dim": args.dim, "ks": [10, 50, 200], "chunk_size": args.chunk_size,
                "user_chunk": args.user_chunk, "seed": args.seed, "inputs": "standard normal float32 queries and "
                "items, uniform targets, no exclusions"}
    runs, skipped = [], []
    for users in sorted(args.users):
        if runs and runs[-1]["seconds"] * users / runs[-1]["users"] > args.budget_s:
            last = runs[-1]
            skipped.append({"users": users, "why": f"{last['seconds']:.0f} s for {last['users']:,} users predicts "
                            f"{last['seconds'] * users / last['users']:.0f} s, over the {args.budget_s:.0f} s budget"})
            print(f"{users:>9,} users: skipped ({skipped[-1]['why']})", flush=True)
            continue
        runs.append(measure(args, users))
        r = runs[-1]
        print(f"{users:>9,} users: {r['seconds']:8.1f} s  peak {r['peak_rss_mib']:8.1f} MiB  "
              f"(inputs {r['inputs_rss_mib']:.1f})  load {r['load_avg_1m_before']}", flush=True)
    code = Path(args.karma_path).resolve() / "karma" if args.karma_path else None
    out = {"what": "peak RSS and seconds of karma.retrieval.evaluate_retrieval, one fresh process per user count",
           "command": command, "settings": settings, "runs": runs, "skipped": skipped,
           "code": None if code is None else dict(zip(("path", "git_commit", "git_dirty"), (str(code), *git_state(code)))),
           "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    out = with_provenance(out, provenance(settings, command))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
