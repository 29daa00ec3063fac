"""Regenerate BENCHMARKS.md from the JSON results under bench/results/: one table per kind of
result, one row (or one row per measured mode) for every file, each naming its file and device.

    python bench/make_tables.py            # rewrite BENCHMARKS.md
    python bench/make_tables.py --check    # exit 1 if BENCHMARKS.md is not what the JSON gives

The output depends only on the JSON (no dates of its own), so --check is stable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "BENCHMARKS.md"
METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR")


# ---- reading ----------------------------------------------------------------------------------------

def load_results(results: Path) -> list[tuple[str, dict]]:
    """(path relative to the repository root, parsed JSON) of every *.json under `results`."""
    out = []
    for path in sorted(results.rglob("*.json")):
        try:
            rel = str(path.relative_to(ROOT))
        except ValueError:
            rel = str(path)
        out.append((rel, json.loads(path.read_text())))
    return out


def kind_of(rel: str, r: dict) -> str:
    name = Path(rel).name
    if "modes" in r and name.startswith("train_throughput"):
        return "train_throughput"
    if name.startswith("retrieval") and "results" in r:
        return "retrieval"
    if name.startswith("eval_memory") and "runs" in r:
        return "eval_memory"
    if "http" in r and "in_process" in r:
        return "serve_load"
    if name.startswith("scale") and "sizes" in r:
        return "scale"
    if name.startswith("batch_recall") and "runs" in r:
        return "batch_recall"
    if "per_seed" in r and "mean_std" in r:
        return "sasrec"
    if "median_epoch_s" in r and "runs" in r:
        return "epoch_cost"
    if "after" in r and "popularity" in r:
        return "training_run"
    if "trials" in r and "space" in r:
        return "ablation_sweep"
    return "other"


def device_of(r: dict) -> str:
    """The device a file says it ran on, in words; never guessed from the file name."""
    if r.get("device_name") or r.get("device"):
        name, dev = r.get("device_name"), r.get("device")
        return f"{dev}: {name}" if dev and name and name != dev else str(name or dev)
    host = r.get("host") or r.get("machine")
    if isinstance(host, dict) and host.get("cpus"):
        return f"cpu ({host['cpus']} cores)"
    if "CPU" in str(r.get("note", "")):
        return "cpu (per its note)"
    return "not recorded"


# ---- formatting ---------------------------------------------------------------------------------------

def fmt(x, spec: str = ",.0f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "nan"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]


def code(rel: str) -> str:
    return f"`{rel}`"


# ---- sections -----------------------------------------------------------------------------------------

def train_rows(rel: str, r: dict) -> list[list[str]]:
    s = r.get("settings", {})
    shape = f"{s.get('backbone_shape', '?')} b{s.get('batch', '?')} h{s.get('history', '?')} t{s.get('text_tokens', '?')}"
    rows = []
    for name, m in r["modes"].items():
        c = m.get("config") or {}
        zero = "-" if (m.get("kind") or name) == "plain" else fmt(c.get("zero_stage", s.get("zero")), "d")
        compiled = c.get("compiled") or ("decoder" if s.get("compile") is True else "none" if s.get("compile") is False
                                          else s.get("compile", "-"))
        if "error" in m:
            rows.append([code(rel), device_of(r), shape, name, zero, compiled, "error: " + m["error"].splitlines()[0][:80],
                         "", "", "", ""])
            continue
        mfu = "-" if m.get("mfu") is None else f"{m['mfu'] * 100:.1f}%"
        syncs = "-" if not m.get("host_syncs") else fmt(m["host_syncs"]["count"], "d")
        rows.append([code(rel), device_of(r), shape, name, zero, compiled, f"{m['step_s_median'] * 1e3:.1f}",
                     fmt(m["tokens_per_s"]), mfu, f"{m['peak_memory_gib']:.2f}", syncs])
    return rows


def train_section(files: list[tuple[str, dict]]) -> list[str]:
    header = ["file", "device", "shape (batch, history, text)", "row", "ZeRO", "compile", "step ms", "tokens/s",
              "MFU", "peak GiB", "host syncs"]
    out = ["## Training throughput (full KARMA step)", "",
           "`bench/train_throughput.py`; MFU against 989 TFLOP/s bf16 (H100/H200), none on CPU; peak memory is "
           "`max_memory_allocated` on CUDA and process RSS on CPU; host syncs are counted on CUDA only. "
           "Method: `bench/NOTES.md`.", ""]
    for title, dev in (("CUDA", "cuda"), ("CPU", "cpu")):
        rows = [row for rel, r in files if r.get("device") == dev for row in train_rows(rel, r)]
        if rows:
            out += [f"### {title}", ""] + table(header, rows) + [""]
            ratios = [(rel, r["ratios"]) for rel, r in files if r.get("device") == dev and r.get("ratios")]
            out += [f"- {code(rel)}: " + ", ".join(f"{k} {fmt(v, '.3g')}" for k, v in rat.items() if v is not None)
                    for rel, rat in ratios if any(v is not None for v in rat.values())] + [""]
    other = [row for rel, r in files if r.get("device") not in ("cuda", "cpu") for row in train_rows(rel, r)]
    if other:
        out += ["### Other devices", ""] + table(header, other) + [""]
    return out


def retrieval_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for rel, r in files:
        for name, v in r["results"].items():
            rows.append([code(rel), device_of(r), f"{fmt(r.get('n_items'))} x {r.get('dim')}", fmt(r.get("k"), "d"),
                         name, v.get("dtype", v.get("index_device", "-")), fmt(v.get("batch", r.get("batch"))),
                         fmt(v.get("chunk_size")), fmt(v.get("block")), fmt(v.get("qps"))])
    header = ["file", "device", "items x dim", "k", "row", "dtype / index", "batch", "chunk", "block", "queries/s"]
    return ["## Retrieval (exact top-k over the full corpus)", "",
            "`bench/retrieval_eval.py`: `karma.retrieval.exact_topk` rows and faiss `IndexFlatIP`; a `-` chunk or "
            "block is a file written before those settings were recorded.", ""] + table(header, rows) + [""]


def eval_memory_section(files: list[tuple[str, dict]]) -> list[str]:
    rows, notes = [], []
    for rel, r in files:
        s, copy = r.get("settings", {}), r.get("code") or r.get("provenance") or {}
        version = (copy.get("git_commit") or "?")[:7] + (" (dirty)" if copy.get("git_dirty") else "")
        for v in r["runs"]:
            rows.append([code(rel), device_of(r), version, f"{fmt(s.get('items'))} x {s.get('dim')}",
                         fmt(v.get("user_chunk")), fmt(s.get("chunk_size")), fmt(v["users"]), fmt(v["seconds"], ",.1f"),
                         fmt(v["users_per_s"]), fmt(v["peak_rss_mib"]), fmt(v["inputs_rss_mib"]),
                         fmt(v["peak_over_inputs_mib"]), fmt(v.get("load_avg_1m_before"), ".1f")])
        notes += [f"- {code(rel)}: {fmt(v['users'])} users skipped: {v['why']}" for v in r.get("skipped", [])]
    header = ["file", "device", "code", "items x dim", "user chunk", "item chunk", "users", "seconds", "users/s",
              "peak RSS MiB", "inputs MiB", "peak - inputs MiB", "load (1 min)"]
    return ["## Evaluation memory (exact ranks of every user over the full corpus)", "",
            "`bench/eval_memory.py`: `karma.retrieval.evaluate_retrieval` (HR/NDCG@10/50/200, MRR), random queries "
            "against random items, one fresh process per row; peak RSS from `getrusage`, inputs = the RSS with the "
            "queries and items generated, before evaluating. Code: the commit of the package the children ran "
            "(the file's provenance, or the other copy it names).", ""] + table(header, rows) + [""] + (
            notes + [""] if notes else [])


def serve_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for rel, r in files:
        for v in r["http"]:
            rows.append([code(rel), device_of(r), "http " + str(v.get("endpoint")), "on" if v.get("batching") else "off",
                         fmt(v.get("concurrency")), fmt(v.get("rps"), ",.1f"), fmt(v.get("p50_ms"), ".2f"),
                         fmt(v.get("p95_ms"), ".2f"), fmt(v.get("p99_ms"), ".2f"), fmt(v.get("failed"))])
        for v in r["in_process"]:
            rows.append([code(rel), device_of(r), f"in-process, batch {v.get('batch')}", "-", "1",
                         fmt(v.get("rps"), ",.1f"), fmt(v.get("p50_ms"), ".2f"), fmt(v.get("p95_ms"), ".2f"),
                         fmt(v.get("p99_ms"), ".2f"), fmt(v.get("failed"))])
    header = ["file", "device", "endpoint", "batching", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "failed"]
    out = ["## Serving load", "", "`bench/serve_load.py`.", ""] + table(header, rows) + [""]
    for rel, r in files:
        goals = r.get("goals") or {}
        if goals:
            out.append(f"- {code(rel)} goals: " + "; ".join(
                f"{k} {'met' if g.get('met') else 'not met'}" for k, g in goals.items()))
    return out + [""]


def batch_recall_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for rel, r in files:
        s = r.get("settings", {})
        for run in r["runs"]:
            peak = run.get("peak_rss_mib", {})
            rows.append([code(rel), device_of(r), fmt(run.get("users")), fmt(run.get("files")), fmt(s.get("n_items")),
                         fmt(s.get("k")), fmt(run.get("seconds"), ",.0f"), fmt(run.get("users_per_s")),
                         fmt(run.get("users_per_s_steady")), fmt(peak.get("driver")), fmt(peak.get("actor")),
                         fmt(peak.get("ray")), fmt(run.get("loadavg_1m_before"), ".1f")])
    header = ["file", "device", "users", "files", "items", "k", "seconds", "users/s", "steady users/s",
              "driver peak MiB", "actor peak MiB", "all Ray processes MiB", "load (1 min)"]
    note = ("`bench/batch_recall.py`: `karma.recall.run_recall` on synthetic users, a randomly initialised tiny "
            "registered model, one actor per core; users/s over the whole job (Ray and actor start-up included) and "
            "steady (after the first 10% of users); peak RSS sampled every 0.25 s (actor: the largest one; all Ray "
            "processes: the sum over every process the driver started). Each row's command is in its file.")
    return ["## Batch recall (`karma-recall`)", "", note, ""] + table(header, rows) + [""]


def scale_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for rel, r in files:
        version = ((r.get("provenance") or {}).get("git_commit") or "?")[:7]
        for v in r["sizes"]:
            prep, train, test = v["prepare"], v["train"], v["test"]
            worker = max(max(s.values()) for s in v["worker_peak_rss_mb"].values())
            test_rss = max(s["test"] for s in v["worker_peak_rss_mb"].values())
            rows.append([code(rel), device_of(r), version, fmt(v["events"]), fmt(v["users"]), fmt(v["items"]),
                         fmt(prep["seconds"], ",.1f"), fmt(prep["events_per_s"]), fmt(prep["peak_rss_mb"]),
                         fmt((v.get("text") or {}).get("seconds"), ",.1f"), fmt(v["setup_seconds"], ",.1f"),
                         fmt(train["seconds"], ",.1f"), fmt(test["queries"]), fmt(test["seconds"], ",.0f"),
                         fmt(test["queries_per_s"]), fmt(worker), fmt(test_rss), fmt(v["driver_peak_rss_mb"]),
                         fmt(v["wall_seconds"], ",.0f")])
    header = ["file", "device", "code", "events", "users", "items", "prepare s", "prepare events/s",
              "prepare peak MB", "text s", "worker setup s", "train s", "test users", "test s", "test users/s",
              "worker peak MB", "worker peak in test MB", "driver peak MB", "job s"]
    note = ("`bench/scale.py`: the synthetic set through the real Ray job (2 CPU workers, ZeRO-2, the tiny model, "
            "a fixed number of training steps, then the test evaluation of every user), one fresh process and Ray "
            "cluster per size. Peak RSS is each process's `ru_maxrss`: the preparation task's, the largest worker's "
            "(over ranks and stages, and in the test stage alone) and the driver's. The log-log plot of memory and "
            "time against events sits beside the JSON (`.png`).")
    growth = [f"{code(rel)}: " + "; ".join(f"{pair} " + ", ".join(f"{w} {x:.2f}x" for w, x in ratios.items())
                                          for pair, ratios in r["worker_peak_growth"].items())
              for rel, r in files if r.get("worker_peak_growth")]
    if growth:
        note += (" Each worker's peak over its peak at 10^5 events (`1e7-1k-items` keeps the 10^5 catalogue, so "
                 "beside `1e7` it tells growth with the data from growth with the catalogue): " + " ".join(growth))
    return ["## Cost against data size (the Ray job)", "", note, ""] + table(header, rows) + [""]


def sasrec_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for rel, r in files:
        ms = r["mean_std"]
        cells = [f"{ms[m]['mean']:.4f} ± {ms[m]['std']:.4f}" if m in ms else "-" for m in METRICS]
        rows.append([code(rel), device_of(r), ", ".join(str(s) for s in r.get("seeds", []))] + cells)
    header = ["file", "device", "seeds"] + [f"test {m}" for m in METRICS]
    return ["## SASRec baseline, Amazon Scientific", "",
            "`bench/sasrec_scientific.py`: mean ± sample std over seeds, full ranking.", ""] + table(header, rows) + [""]


def epoch_cost_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for rel, r in files:
        ratios = r.get("ratio_to_sasrec") or {}
        for arm, median in r["median_epoch_s"].items():
            rows.append([code(rel), device_of(r), arm, str(len(r["runs"][arm])), fmt(median, ".1f"),
                         fmt(ratios.get(arm), ".2f")])
    header = ["file", "device", "arm", "rounds", "median s/epoch", "x SASRec"]
    return ["## Epoch cost, Amazon Scientific", "",
            "`bench/epoch_cost.py`: one epoch (training + scoring every validation user), one torch thread, arms "
            "alternating in one process.", ""] + table(header, rows) + [""]


def run_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for rel, r in files:
        after, test, pop = r.get("after") or {}, r.get("test") or {}, r.get("popularity") or {}
        rows.append([code(rel), device_of(r), fmt(r.get("steps")), fmt(r.get("seconds"), ",.0f"),
                     fmt(pop.get("HR@10"), ".4f"), fmt(after.get("HR@10"), ".4f"), fmt(after.get("NDCG@10"), ".4f"),
                     fmt(test.get("HR@10"), ".4f"), fmt(test.get("NDCG@10"), ".4f")])
    header = ["file", "device", "steps", "seconds", "popularity HR@10", "valid HR@10", "valid NDCG@10",
              "test HR@10", "test NDCG@10"]
    return ["## Training runs (plain loop)", "",
            "`jobs/train_plain.py` results: validation after the last epoch, test with the best epoch's weights "
            "(`-`: the run predates test metrics). These files carry no device field; the device column says what "
            "the file itself states.", ""] + table(header, rows) + [""]


def ablation_section(files: list[tuple[str, dict]]) -> list[str]:
    """Per arm of a collected Tune ablation (bench/ablation_smollm2.py): test split, mean ± sample
    std over the seeds whose trial completed."""
    rows = []
    for rel, r in files:
        epochs = r.get("config", {}).get("train", {}).get("epochs")
        for arm in r["space"]["arms"]:
            done = [t["metrics"] for t in r["trials"] if t["arm"] == arm and t["complete"]]
            cells = []
            for m in ("HR@10", "NDCG@10", "HR@200", "MRR"):
                v = np.array([d["test/" + m] for d in done if "test/" + m in d])
                cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}" if len(v) else "-")
            rows.append([code(rel), device_of(r), fmt(epochs), arm,
                         f"{len(done)} of {len(r['space']['seeds'])}"] + cells)
    header = ["file", "device", "epochs", "arm", "seeds done", "test HR@10", "test NDCG@10", "test HR@200", "test MRR"]
    note = ("`bench/ablation_smollm2.py collect` of a `tune_spaces/ablation.yaml` sweep: test split, mean ± sample "
            "std over the seeds that completed (± 0 with one seed). Full tables: docs/RESULTS.md.")
    return ["## KARMA ablation sweeps, Amazon Scientific", "", note, ""] + table(header, rows) + [""]


def other_section(files: list[tuple[str, dict]]) -> list[str]:
    rows = [[code(rel), device_of(r), ", ".join(sorted(r)[:8])] for rel, r in files]
    return ["## Other results", ""] + table(["file", "device", "fields"], rows) + [""]


SECTIONS = (("train_throughput", train_section), ("retrieval", retrieval_section),
            ("eval_memory", eval_memory_section), ("serve_load", serve_section),
            ("batch_recall", batch_recall_section), ("scale", scale_section),
            ("sasrec", sasrec_section), ("epoch_cost", epoch_cost_section), ("training_run", run_section),
            ("ablation_sweep", ablation_section), ("other", other_section))


def render(results: Path = RESULTS) -> str:
    files = load_results(results)
    by_kind: dict[str, list] = {}
    for rel, r in files:
        by_kind.setdefault(kind_of(rel, r), []).append((rel, r))
    lines = ["# Benchmarks", "",
             "Generated by `python bench/make_tables.py` from the JSON under `bench/results/`; do not edit by hand. "
             "How each benchmark measures, and what the numbers mean against the goals: `bench/NOTES.md`.", ""]
    for kind, section in SECTIONS:
        if by_kind.get(kind):
            lines += section(by_kind[kind])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    args = ap.parse_args(argv)
    text = render(args.results)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python bench/make_tables.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
