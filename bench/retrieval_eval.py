"""Throughput of full-corpus top-k retrieval: karma.retrieval.exact_topk (torch, fp16 on
CUDA, fp32 on CPU) and ItemIndex(kind="flat") (faiss, GPU when available).

    python bench/retrieval_eval.py                      # N=200k on CPU, 1M on CUDA
    python bench/retrieval_eval.py --n-items 100000 --n-queries 256
    python bench/retrieval_eval.py --no-faiss --variant b4096 batch=4096 \
        --variant one_stage batch=4096 block=0 chunk=65536 --variant bf16 batch=4096 dtype=bf16

Each --variant NAME [batch=N] [chunk=N] [block=N] [dtype=fp16|bf16|fp32] is one more exact_topk
row (unset keys: the project defaults for the device, karma.retrieval._defaults); every row is
checked against the first on the first query batch (`same_ids_as_first`, < 1 only from ties).

Writes bench/results/retrieval_<device>.json (device = cpu | cuda).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from karma.retrieval import ItemIndex, _defaults, exact_topk  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_batches(fn, queries, batch: int, device: str) -> float:
    fn(queries[:batch])  # warm-up: kernels, BLAS threads, allocator
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, queries.shape[0], batch):
        fn(queries[s : s + batch])
    _sync(device)
    return time.perf_counter() - t0


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_variant(v: list[str]) -> dict:
    opts = dict(kv.split("=", 1) for kv in v[1:] if "=" in kv)
    bad = sorted(set(opts) - {"batch", "chunk", "block", "dtype"}) + [kv for kv in v[1:] if "=" not in kv]
    if bad or opts.get("dtype", "fp16") not in DTYPES:
        raise SystemExit(f"--variant {' '.join(v)}: use NAME [batch=N] [chunk=N] [block=N] [dtype=fp16|bf16|fp32]")
    return opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-items", type=int, default=None, help="default 200000 on CPU, 1000000 on CUDA")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--heads", type=int, default=1, help="interest heads per query (max over heads)")
    ap.add_argument("--n-queries", type=int, default=None, help="default 512 on CPU, 8192 on CUDA")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=None, help="default: the project's per-device default")
    ap.add_argument("--block", type=int, default=None, help="two-stage top-k block (0 = one stage); default per device")
    ap.add_argument("--variant", action="append", nargs="+", metavar="NAME [KEY=VALUE ...]",
                    help="one more exact_topk row: batch=, chunk=, block=, dtype= (repeatable)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    n_items = args.n_items or (1_000_000 if device == "cuda" else 200_000)
    n_queries = args.n_queries or (8192 if device == "cuda" else 512)
    dtype = torch.float16 if device == "cuda" else torch.float32

    g = torch.Generator().manual_seed(args.seed)
    items = torch.nn.functional.normalize(torch.randn(n_items, args.dim, generator=g), dim=1)
    shape = (n_queries, args.heads, args.dim) if args.heads > 1 else (n_queries, args.dim)
    queries = torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    res: dict = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "n_items": n_items,
        "dim": args.dim,
        "k": args.k,
        "heads": args.heads,
        "n_queries": n_queries,
        "batch": args.batch,
        "results": {},
    }

    variants = [("exact_topk", {})] + [(v[0], parse_variant(v)) for v in args.variant or []]
    items_d = items.to(device, dtype)
    first_ids = None
    for name, opts in variants:
        vdtype = DTYPES[opts["dtype"]] if "dtype" in opts else dtype
        batch = int(opts.get("batch", args.batch))
        default_chunk, default_block = _defaults(torch.device(device))
        chunk = int(opts.get("chunk", args.chunk_size or default_chunk))
        block = int(opts.get("block", default_block if args.block is None else args.block))
        items_v = items_d.to(vdtype)  # scoring dtype set on the corpus once, as a server would
        queries_v = queries.to(device, vdtype)

        def run(q):
            return exact_topk(q, items_v, args.k, chunk_size=chunk, block=block)

        secs = _time_batches(run, queries_v, batch, device)
        _, ids = run(queries_v[:256])
        ids = ids.cpu()
        first_ids = ids if first_ids is None else first_ids
        res["results"][name] = {
            "dtype": str(vdtype).removeprefix("torch."), "batch": batch, "chunk_size": chunk, "block": block,
            "seconds": secs, "qps": n_queries / secs,
            "same_ids_as_first": float((ids == first_ids).float().mean()),
        }
        print(f"{name}: {n_queries / secs:,.0f} queries/s", flush=True)
        del items_v, queries_v
    exact_ids = first_ids
    del items_d

    try:
        import faiss
    except ImportError:
        faiss = None
    res["faiss"] = getattr(faiss, "__version__", None)
    if faiss is not None and not args.no_faiss:
        res["faiss_threads"] = faiss.omp_get_max_threads()
        t0 = time.perf_counter()
        index = ItemIndex(items.numpy(), kind="flat")
        build = time.perf_counter() - t0
        q_np = queries.numpy()
        secs = _time_batches(lambda q: index.search(q, args.k), q_np, args.batch, "cpu")
        _, ids = index.search(q_np[:256], args.k)
        overlap = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids.tolist(), exact_ids.tolist())])
        res["results"]["faiss_flat"] = {
            "index_device": index.device,
            "build_seconds": build,
            "seconds": secs,
            "qps": n_queries / secs,
            "topk_overlap_with_exact": float(overlap),  # < 1 only from fp16 / rounding near-ties
        }

    out = args.out or ROOT / "bench" / "results" / f"retrieval_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["results"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
