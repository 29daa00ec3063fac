"""Training throughput of the full KARMA step (action + generation + reconstruction; forward,
backward, optimizer) in one run, on the same model, batches and tokens, three ways:

    plain      a plain PyTorch loop: AdamW (fused on CUDA), fp32 weights + bf16 autocast (or fp32)
    deepspeed  the project's DeepSpeed engine (karma.train.engine.make_engine) in this process,
               a single-process gloo/nccl group
    ray        the same DeepSpeed step inside a Ray Train TorchTrainer with one worker

    python bench/train_throughput.py --backbone-shape tiny --steps 20            # CPU, about a minute
    python bench/train_throughput.py --backbone-shape qwen0.5b --batch 8 --history 50 --text-tokens 32
    python bench/train_throughput.py --backbone-shape smollm2-135m --compile --modes plain,deepspeed
    python bench/train_throughput.py --backbone-shape qwen0.5b --modes plain,deepspeed \
        --variant zero3 deepspeed dist.zero_stage=3 --set loss.lm_ce_chunk=0     # extra rows, overrides

Every row runs the project's training path as configured: `karma.config` switches (compile,
ZeRO knobs, the cross-entropy chunk) come from the project defaults for the device, `--set` and
`--variant`; nothing is tuned here that the training job would not do.

Writes bench/results/train_throughput_<device>.json (device = cpu | cuda); see bench/NOTES.md
for the method, the FLOP count behind MFU and what each row means.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# Llama-shaped backbones with random weights (dims from the models' published configs).
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=4096),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "qwen0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
}
DIMS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
# Dense bf16 datasheet peaks (FLOP/s) by device-name substring; CPUs report no MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
# Defaults that differ by device: (batch, history, text tokens)
DEFAULTS = {"cpu": (16, 20, 16), "cuda": (64, 50, 32)}
TEXT_EMB_DIM = 384  # all-MiniLM-L6-v2, the frozen item-text embedding the platform uses
GEN_PROMPT_IDS = [3, 4, 5]  # stand-ins for "next item:" (same length as the word tokenizer's)
REC_PROMPT_IDS = [6, 7, 8, 9]  # "describe the item:"
QUERY_PROMPT_IDS = [10, 11]  # "query:" (synthetic batches carry no queries)
FIRST_TEXT_ID = 12  # item text tokens are drawn from [FIRST_TEXT_ID, vocab)
EOS_ID, PAD_ID = 1, 0


# ---- the model, config and batches every mode shares --------------------------------------------

def make_spec(args: argparse.Namespace, device: str) -> dict:
    """Everything a mode needs to rebuild the same model and batches (plain data: goes to Ray)."""
    shape = dict(SHAPES["tiny" if args.backbone_shape == "custom" else args.backbone_shape])
    for k in DIMS:
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise SystemExit(f"shape {shape}: hidden must divide by heads and heads by kv_heads")
    batch, history, text = DEFAULTS[device]
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return {
        "device": device,
        "backbone_shape": args.backbone_shape,
        "shape": shape,
        "batch": args.batch or batch,
        "history": args.history or history,
        "text_tokens": args.text_tokens or text,
        "n_items": args.items,
        "n_negatives": args.negatives,
        "n_interest": args.interests,
        "embed_dim": args.embed_dim,
        "rec_soft_tokens": args.rec_soft_tokens,
        "w_gen": args.w_gen,
        "w_rec": args.w_rec,
        "decode_fraction": args.decode_fraction,
        "precision": precision,
        "zero": args.zero,
        "compile": args.compile,
        "sampler_device": args.sampler_device,
        "overrides": list(args.set or []),
        "attn": args.attn,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "lr": 1e-4,
        "threads": torch.get_num_threads(),
        "profile_steps": args.profile_steps,
    }


def karma_config(spec: dict):
    """The project Config this benchmark's model and engine are built from (`spec["overrides"]`:
    `section.key=value` strings applied last, as on the training job's command line)."""
    from karma.config import from_dict

    s = spec["shape"]
    return from_dict({
        "data": {"text_encoder": "minilm", "max_history": spec["history"], "text_max_tokens": spec["text_tokens"]},
        "model": {"backbone": "tiny", "tiny_hidden": s["hidden"], "tiny_layers": s["layers"], "tiny_heads": s["heads"],
                  "tiny_intermediate": s["intermediate"], "n_interest": spec["n_interest"],
                  "embed_dim": spec["embed_dim"], "id_dim": spec["embed_dim"],
                  "rec_soft_tokens": spec["rec_soft_tokens"], "attn_implementation": spec["attn"], "dtype": "fp32"},
        "loss": {"w_gen": spec["w_gen"], "w_rec": spec["w_rec"], "n_negatives": spec["n_negatives"],
                 "decode_fraction": spec["decode_fraction"]},
        "train": {"batch_size": spec["batch"], "lr": spec["lr"], "warmup_steps": 10, "grad_clip": 1.0,
                  "seed": spec["seed"]},
        "dist": {"num_workers": 1, "use_gpu": spec["device"] == "cuda", "zero_stage": spec["zero"],
                 "precision": spec["precision"], "omp_threads": spec["threads"], "compile": spec["compile"],
                 "compile_dynamic": False},  # fixed shapes here: one static graph per sequence length
    }, spec.get("overrides", []))


def build_model(spec: dict, cfg):
    """A KarmaModel around a random Llama of the chosen shape, as karma.factory.build_model
    assembles it (backbone built here: tiny_config has no GQA or vocabulary knobs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from karma.backbone import set_attention
    from karma.model import KarmaModel, Prompts

    s, device = spec["shape"], torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"])
    n, t = spec["n_items"], spec["text_tokens"]
    # Every item text fills text_tokens (text_tokens - 1 tokens + EOS): no padding, fixed tokens per step.
    tokens = torch.randint(FIRST_TEXT_ID, s["vocab"], (n, t), generator=g)
    tokens[:, -1] = EOS_ID
    lengths = torch.full((n,), t, dtype=torch.long)
    text_emb = torch.nn.functional.normalize(torch.randn(n, TEXT_EMB_DIM, generator=g), dim=1)
    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(1024, seq_lengths(spec)[0]), tie_word_embeddings=True,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=EOS_ID)
    with device:  # initialise on the device: a 0.5B model's CPU init alone takes seconds
        backbone = LlamaForCausalLM(config)
        backbone.config.use_cache = False
        set_attention(backbone, cfg.model.attn_implementation)
        model = KarmaModel(cfg.model, backbone, n_items=n, item_tokens=tokens, item_token_len=lengths,
                           pad_id=PAD_ID, prompts=Prompts(QUERY_PROMPT_IDS, GEN_PROMPT_IDS, REC_PROMPT_IDS),
                           text_emb=text_emb, tau_init=cfg.loss.tau_init, learn_tau=cfg.loss.learn_tau)
    model.to(device)
    return model  # compiled by the mode: karma.train.engine.compile_model / make_engine


def make_batches(spec: dict) -> list[dict]:
    """warmup + steps batches of random item rows; batch i is the same in every mode."""
    b, L, n = spec["batch"], spec["history"], spec["n_items"]
    out = []
    for i in range(spec["warmup"] + spec["steps"]):
        g = torch.Generator().manual_seed(spec["seed"] * 100_003 + i)
        out.append({
            "history": torch.randint(0, n, (b, L), generator=g),
            "history_mask": torch.ones(b, L, dtype=torch.bool),  # full histories: no padding
            "target": torch.randint(0, n, (b,), generator=g),
            "user_id": torch.arange(b),
        })
    return out


def item_counts(spec: dict) -> np.ndarray:
    """A Zipf-like popularity for the negative sampler (and its logQ correction)."""
    rng = np.random.default_rng(spec["seed"])
    return rng.permutation(np.floor(1000.0 / np.arange(1, spec["n_items"] + 1) ** 0.8).astype(np.int64))


def make_sampler(spec: dict, cfg, device):
    """The popularity sampler on the model's device (as the training worker builds it), or on the
    host with `--sampler-device cpu` (the earlier path: a copy of the negatives and of log_p per step)."""
    from karma.step import NegativeSampler

    where = "cpu" if spec.get("sampler_device") == "cpu" else device
    return NegativeSampler(item_counts(spec), cfg.loss.n_negatives, seed=spec["seed"], device=where)


def config_record(cfg, compiled: str, sampler, device) -> dict:
    """The switches a row ran with, per-device defaults resolved (goes into the JSON)."""
    import dataclasses

    from karma.train.engine import resolve_dist

    d = dataclasses.asdict(resolve_dist(cfg.dist))
    keep = ("zero_stage", "precision", "compile", "compile_dynamic", "overlap_comm", "contiguous_gradients",
            "reduce_bucket_size", "allgather_bucket_size", "stage3_param_persistence_threshold",
            "stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_memory_efficient_linear",
            "deepcompile")
    from karma.step import ce_chunk

    return {**{k: d[k] for k in keep}, "compiled": compiled, "lm_ce_chunk": ce_chunk(cfg.loss, device),
            "sampler_device": str(sampler.device)}


def seq_lengths(spec: dict) -> tuple[int, int]:
    """Positions per sequence of the two backbone forwards: (action + generation, reconstruction)."""
    text = len(GEN_PROMPT_IDS) + spec["text_tokens"] - 1
    main = spec["history"] + spec["n_interest"] + (text if spec["w_gen"] > 0 else 0)
    rec = len(REC_PROMPT_IDS) + spec["rec_soft_tokens"] + text
    return main, rec


def flop_count(spec: dict, model) -> dict:
    """Model FLOPs of one step (forward + backward = 3 x forward), see bench/NOTES.md:
    6 * P_blocks * tokens + 6 * V * d * labelled tokens + 12 * layers * d * sum(seq^2)."""
    s = spec["shape"]
    b = spec["batch"]
    b_dec = max(1, math.ceil(spec["decode_fraction"] * b))
    main, rec = seq_lengths(spec)
    dec = spec["w_rec"] > 0
    tokens = b * main + (b_dec * rec if dec else 0)
    labelled = b_dec * spec["text_tokens"] * ((spec["w_gen"] > 0) + dec)
    emb = model.backbone.get_input_embeddings().weight.numel()
    p_backbone = sum(p.numel() for p in model.backbone.parameters())  # tied LM head counted once
    p_blocks = p_backbone - emb
    attn_sq = b * main**2 + (b_dec * rec**2 if dec else 0)
    dense = 6 * p_blocks * tokens
    head = 6 * s["vocab"] * s["hidden"] * labelled
    attn = 12 * s["layers"] * s["hidden"] * attn_sq
    return {"tokens_per_step": tokens, "labelled_tokens_per_step": labelled, "seq_action_gen": main,
            "seq_reconstruction": rec if dec else 0, "params_backbone": p_backbone, "params_blocks": p_blocks,
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "flops_dense": dense, "flops_lm_head": head, "flops_attention": attn,
            "flops_per_step": dense + head + attn}


# ---- timing ---------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cuda_matmul_settings() -> None:
    """TF32 for any fp32 matmul left (fp32 master-weight paths, fp32 runs)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _cleanup(device: str) -> None:
    torch._dynamo.reset()  # each row compiles its own model (the on-disk inductor cache stays warm)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_steps(step, batches: list[dict], spec: dict, device) -> dict:
    """Run warm-up then timed steps; each timed step is synchronised and timed on its own."""
    dev = spec["device"]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    _sync(dev)
    t0 = time.perf_counter()
    for b in batches[: spec["warmup"]]:
        step(b)
    _sync(dev)
    warm_s = time.perf_counter() - t0
    times, cpu, ntok, losses, rss = [], [], [], [], 0
    for b in batches[spec["warmup"]:]:
        t, c = time.perf_counter(), time.process_time()
        parts = step(b)
        _sync(dev)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        ntok.append(parts["n_tokens"])
        losses.append(parts["loss"])
        if dev == "cpu":
            rss = max(rss, _rss())
    ntok = [int(x) for x in ntok]
    med = statistics.median(times)
    tok = statistics.fmean(ntok)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else rss
    diagnostics = {"host_syncs": sync_census(step, batches[-1], dev),
                   "profile": profile_steps(step, batches[-1], dev, spec.get("profile_steps", 0))}
    return {**diagnostics,
        "step_s_median": med,
        "step_s_mean": statistics.fmean(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "cpu_s_median": statistics.median(cpu),  # process CPU time (all threads) per step
        "warmup_s": warm_s,
        "tokens_per_step": tok,
        "tokens_per_s": tok / med,
        "examples_per_s": spec["batch"] / med,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if dev == "cuda" else "process RSS (max after each step)",
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
        "step_times_s": times,
    }


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def sync_census(step, batch: dict, dev: str) -> dict | None:
    """CUDA: one more step under torch.cuda.set_sync_debug_mode("warn"); every operation that
    made the host wait for the GPU warns from its Python line. Returns the count and the
    distinct lines (whoever's code: the step's, DeepSpeed's, the backbone's). None on CPU."""
    if dev != "cuda":
        return None
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})
    return {"count": len(hits), "where": where[:40]}


def profile_steps(step, batch: dict, dev: str, n: int) -> dict | None:
    """n more steps under torch.profiler: the 15 ops with the most self time on the device
    (CPU on a CPU run) and the count of runtime calls that block the host, per step."""
    if n <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    _sync(dev)
    with profile(activities=acts) as prof:
        for _ in range(n):
            step(batch)
        _sync(dev)
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    key = device_us if dev == "cuda" else (lambda e: float(e.self_cpu_time_total))
    top = sorted(events, key=key, reverse=True)[:15]
    syncs = {e.key: e.count / n for e in events if e.key in SYNC_CALLS}
    return {"steps": n, "time_kind": "self device us per step" if dev == "cuda" else "self CPU us per step",
            "top": [{"op": e.key, "us": key(e) / n, "calls": e.count / n} for e in top],
            "blocking_runtime_calls_per_step": syncs}


def run_plain(spec: dict) -> dict:
    """The plain backend's step (karma.train.loop.PlainBackend: AdamW, clipping, schedule), timed."""
    from karma.train.engine import compile_model
    from karma.train.loop import PlainBackend, train_step

    cfg = karma_config(spec)
    dev = torch.device(spec["device"])
    model = build_model(spec, cfg)
    backend = PlainBackend(model, cfg.train, spec["warmup"] + spec["steps"], dev, precision=spec["precision"])
    model.train()
    compiled = compile_model(model, cfg.dist)
    sampler = make_sampler(spec, cfg, dev)
    out = time_steps(lambda batch: train_step(backend, batch, cfg.loss, sampler)[1], make_batches(spec), spec, dev)
    out["flops"] = flop_count(spec, model)
    out["config"] = config_record(cfg, compiled, sampler, dev)
    return out


def run_deepspeed(spec: dict) -> dict:
    """The DeepSpeed backend's step exactly as the Ray job's loop runs it, timed. Needs a process group."""
    from karma.train.engine import make_engine, resolve_dist
    from karma.train.loop import DeepSpeedBackend, train_step

    cfg = karma_config(spec)
    model = build_model(spec, cfg)
    flops = flop_count(spec, model)
    engine, _, _ = make_engine(model, cfg, 1, spec["warmup"] + spec["steps"])
    engine.train()
    backend = DeepSpeedBackend(engine)
    sampler = make_sampler(spec, cfg, engine.device)
    out = time_steps(lambda batch: train_step(backend, batch, cfg.loss, sampler)[1], make_batches(spec), spec,
                     engine.device)
    out["flops"] = flops
    out["config"] = config_record(cfg, resolve_dist(cfg.dist).compile, sampler, engine.device)
    out["deepspeed_config"] = engine.config if isinstance(getattr(engine, "config", None), dict) else None
    if hasattr(engine, "destroy"):
        engine.destroy()
    return out


def ray_train_loop(loop_config: dict) -> None:
    """Ray Train worker: the same DeepSpeed step; reports its timings once."""
    import ray.train

    spec = loop_config["spec"]
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    else:
        _cuda_matmul_settings()
    _cleanup(spec["device"])
    out = run_deepspeed(spec)
    out["worker"] = {"niceness": os.nice(0), "torch_threads": torch.get_num_threads(),
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    # Train V2 keeps a run's metrics with its checkpoints: report the numbers with a small one.
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "bench.json").write_text(json.dumps(out))
        ray.train.report({"bench": json.dumps(out)}, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_ray(spec: dict, cpus: int, niceness: int | None = None) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = spec["device"] == "cuda"
    # Workers import karma and this file whatever their working directory.
    paths = [str(ROOT / "platform"), str(ROOT / "bench")]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + inherited)
    # The train function travels by reference (module `train_throughput`, found through PYTHONPATH):
    # pickling it by value from __main__ would drag torch's module objects along.
    sys.path.insert(0, str(ROOT / "bench"))
    train_fn = importlib.import_module("train_throughput").ray_train_loop
    if niceness is not None:  # read by the raylet this process starts; Ray's default is 15
        os.environ["RAY_worker_niceness"] = str(niceness)
    t0 = time.perf_counter()
    env = {} if cuda else {"OMP_NUM_THREADS": str(spec["threads"])}
    # address="local": always a private cluster, even where `ray start` left one running
    ray.init(address="local", num_cpus=cpus, num_gpus=1 if cuda else 0, include_dashboard=False,
             runtime_env={"env_vars": env} if env else None, log_to_driver=False)
    init_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory(prefix="karma-bench-ray-") as storage:
            trainer = TorchTrainer(
                train_fn,
                train_loop_config={"spec": spec},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=1, use_gpu=cuda,
                    resources_per_worker={"CPU": min(cpus, spec["threads"]), **({"GPU": 1} if cuda else {})}),
                run_config=ray.train.RunConfig(name="train-throughput", storage_path=storage),
                torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            )
            result = trainer.fit()
            if result.error:
                raise result.error
            if result.metrics and "bench" in result.metrics:
                out = json.loads(result.metrics["bench"])
            else:
                with result.checkpoint.as_directory() as d:
                    out = json.loads((Path(d) / "bench.json").read_text())
    finally:
        ray.shutdown()
    out["ray_init_s"] = init_s
    out["ray_total_s"] = time.perf_counter() - t0  # ray.init + fit (worker start, build, steps) + shutdown
    return out


# ---- report ---------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("deepspeed", "ray", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    rows = [("row", "zero", "compile", "step ms", "tokens/s", "examples/s", "MFU", "peak GiB", "syncs",
             "loss first->last")]
    errors = []
    for mode, m in res["modes"].items():
        if "error" in m:
            rows.append((mode, "", "", "error", "", "", "", "", "", ""))
            errors.append(f"{mode}: {m['error'].splitlines()[0][:200]}")
            continue
        c = m["config"]
        mfu = "-" if m["mfu"] is None else f"{m['mfu'] * 100:.1f}%"
        syncs = "-" if m.get("host_syncs") is None else str(m["host_syncs"]["count"])
        rows.append((mode, str(c["zero_stage"]) if m["kind"] != "plain" else "-", c["compiled"],
                     f"{m['step_s_median'] * 1e3:.1f}", f"{m['tokens_per_s']:,.0f}", f"{m['examples_per_s']:,.1f}",
                     mfu, f"{m['peak_memory_gib']:.2f}", syncs, f"{m['loss_first']:.3f}->{m['loss_last']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("ratios (tokens/s): " + ", ".join(f"{k}={_fmt(v)}" for k, v in res["ratios"].items()))
    goals = {k: g for k, g in res.get("goals", {}).items() if g["value"] is not None}
    if goals:
        print("goals: " + ", ".join(f"{k}={g['value']:.3g} (>= {g['target']}: {'met' if g['met'] else 'not met'})"
                                    for k, g in goals.items()))
    for e in errors:
        print(f"error {e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone-shape", choices=[*SHAPES, "custom"], default="tiny",
                    help="Llama dims; 'custom' starts from tiny and takes --hidden etc.")
    for k in DIMS:
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=None, help=f"override the shape's {k}")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (default 16 CPU, 64 CUDA)")
    ap.add_argument("--history", type=int, default=None, help="items per example (default 20 CPU, 50 CUDA)")
    ap.add_argument("--text-tokens", type=int, default=None, help="target text tokens incl. EOS (16 CPU, 32 CUDA)")
    ap.add_argument("--items", type=int, default=10_000, help="catalogue size (ID table, negatives)")
    ap.add_argument("--negatives", type=int, default=256, help="popularity-sampled negatives per step")
    ap.add_argument("--interests", type=int, default=1, help="H interest tokens")
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--rec-soft-tokens", type=int, default=4)
    ap.add_argument("--w-gen", type=float, default=0.5)
    ap.add_argument("--w-rec", type=float, default=0.5)
    ap.add_argument("--decode-fraction", type=float, default=1.0)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    ap.add_argument("--modes", default="plain,deepspeed,ray")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2, help="DeepSpeed ZeRO stage")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--compile", nargs="?", const="decoder", default="auto",
                    choices=("auto", "none", "decoder", "layers", "model"),
                    help="dist.compile in every mode: auto (the project's per-device default: the decoder on "
                         "CUDA, layers under ZeRO-3, none on CPU); --compile alone = decoder")
    ap.add_argument("--sampler-device", choices=("model", "cpu"), default="model",
                    help="where negatives are drawn: the model's device (the training path) or the host")
    ap.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="a project config override for every mode, e.g. dist.overlap_comm=false (repeatable)")
    ap.add_argument("--variant", action="append", nargs="+", metavar="NAME KIND [SECTION.KEY=VALUE ...]",
                    help="one more row NAME of KIND (plain, deepspeed, ray) with its own overrides, e.g. "
                         "--variant zero3 deepspeed dist.zero_stage=3 (repeatable)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after timing, profile this many more steps per row (top device ops, blocking calls)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch threads in every mode (default: torch's, one per core); 1 keeps a shared "
                         "host's other jobs from stalling the step's thread barriers")
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs for the local Ray cluster (default: all)")
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="nice level of Ray's worker processes (Ray's default: 15, which loses to any "
                         "other load on a shared CPU host; 0 matches the in-process rows)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: H100/H200 989)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="stop at the first failing mode instead of recording it")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


KINDS = ("plain", "deepspeed", "ray")


def measure(kind: str, spec: dict, args: argparse.Namespace, group: dict) -> dict:
    """One row. In-process DeepSpeed rows share one process group, opened by the first
    (DeepSpeed caches its groups; a second group in the same process would not match them)."""
    if kind == "plain":
        return run_plain(spec)
    if kind == "deepspeed":
        if "ctx" not in group:
            from karma.train.engine import single_process_group

            group["ctx"] = single_process_group(spec["device"])
            group["ctx"].__enter__()
        return run_deepspeed(spec)
    return run_ray(spec, args.ray_cpus or os.cpu_count() or 1, args.ray_worker_niceness)


def plan_rows(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(row name, kind, extra overrides): --modes rows first, then each --variant."""
    rows = [(m, m, []) for m in (x.strip() for x in args.modes.split(",")) if m]
    for v in args.variant or []:
        if len(v) < 2:
            raise SystemExit(f"--variant {' '.join(v)}: give NAME KIND [SECTION.KEY=VALUE ...]")
        rows.append((v[0], v[1], v[2:]))
    bad = sorted({k for _, k, _ in rows} - set(KINDS))
    if bad:
        raise SystemExit(f"unknown row kind(s) {bad}; choose from {', '.join(KINDS)}")
    names = [n for n, _, _ in rows]
    if len(set(names)) != len(names):
        raise SystemExit(f"row names must be unique, got {names}")
    return rows


def _goal(value, target: float) -> dict:
    return {"value": value, "target": target, "met": None if value is None else value >= target}


def summarise(res: dict) -> None:
    """Ratios of tokens/s between the rows measured so far (None where one is missing), and
    the throughput goals where their rows exist."""
    modes = res["modes"]
    tps = {k: v["tokens_per_s"] for k, v in modes.items() if "tokens_per_s" in v}

    def ratio(a: str | None, b: str | None):
        return tps[a] / tps[b] if a in tps and b in tps else None

    def first(kind: str, stage: int | None = None) -> str | None:
        return next((k for k, v in modes.items() if v.get("kind") == kind and "tokens_per_s" in v
                     and (stage is None or v["config"]["zero_stage"] == stage)), None)

    res["ratios"] = {"deepspeed_over_plain": ratio("deepspeed", "plain"),
                     "ray_over_deepspeed": ratio("ray", "deepspeed")}
    for name, v in modes.items():
        if name not in ("plain", "deepspeed", "ray") and name in tps:
            res["ratios"][f"{name}_over_plain"] = ratio(name, "plain")
            res["ratios"][f"{name}_over_deepspeed"] = ratio(name, "deepspeed")
    z2, z3 = first("deepspeed", 2), first("deepspeed", 3)
    res["goals"] = {
        "zero2_mfu": _goal(modes[z2]["mfu"] if z2 else None, 0.45),
        "zero2_over_plain": _goal(ratio(z2, first("plain")), 1.0),
        "zero3_over_zero2": _goal(ratio(z3, z2), 0.8),
        "ray_over_in_process": _goal(ratio(first("ray"), z2 or first("deepspeed")), 0.97),
    }
    ntok = {v["tokens_per_step"] for v in modes.values() if "tokens_per_step" in v}
    res["same_tokens_every_mode"] = len(ntok) <= 1
    res["load_average_after"] = list(os.getloadavg())


def run(argv: list[str] | None = None) -> dict:
    """Parse, measure every requested mode, write the JSON; returns what was written."""
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = plan_rows(args)
    if device == "cuda":
        _cuda_matmul_settings()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = make_spec(args, device)
    peak = peak_flops(device, args.peak_tflops)
    out_path = args.out or ROOT / "bench" / "results" / f"train_throughput_{device}.json"
    res: dict = {
        "command": " ".join(["python", "bench/train_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device,
        "device_name": device_name(device),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": list(os.getloadavg()),  # other work on the host skews CPU timings
        "settings": spec,
        "peak_flops": peak,
        "mfu_formula": "flops_per_step / step_s_median / peak_flops; flops_per_step = 6*params_blocks*tokens "
                       "+ 6*vocab*hidden*labelled_tokens + 12*layers*hidden*sum_over_sequences(seq^2)",
        "modes": {},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    group: dict = {}
    try:
        _measure_rows(rows, spec, args, group, res, out_path, device, peak)
    finally:
        if "ctx" in group:
            group["ctx"].__exit__(None, None, None)
    print_table(res)
    print(f"[bench] wrote {out_path}")
    return res


def _measure_rows(rows, spec, args, group, res, out_path, device, peak) -> None:
    for mode, kind, overrides in rows:
        _cleanup(device)
        print(f"[bench] {mode} ({kind}{' ' + ' '.join(overrides) if overrides else ''}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            m = measure(kind, {**spec, "overrides": spec["overrides"] + overrides}, args, group)
        except Exception as err:  # one failing mode (e.g. out of memory) keeps the others' numbers
            if args.strict:
                raise
            import traceback

            traceback.print_exc()
            m = {"error": f"{type(err).__name__}: {err}"[:2000]}
        m.update(kind=kind, overrides=overrides, mode_wall_s=time.perf_counter() - t0)
        if "error" not in m:
            m["achieved_tflops"] = m["flops"]["flops_per_step"] / m["step_s_median"] / 1e12
            m["mfu"] = m["flops"]["flops_per_step"] / m["step_s_median"] / peak if peak else None
            res.setdefault("flops", m["flops"])
        res["modes"][mode] = m
        summarise(res)
        out_path.write_text(json.dumps(res, indent=2) + "\n")  # after every mode: partial runs keep numbers


if __name__ == "__main__":
    run()
