"""Training throughput of the full KARMA step (action + generation + reconstruction; forward,
backward, optimizer) in one run, on the same model, batches and tokens, three ways:

    plain      a plain PyTorch loop: AdamW (fused on CUDA), fp32 weights + bf16 autocast (or fp32)
    deepspeed  the project's DeepSpeed engine (karma.train.engine.make_engine) in this process,
               a single-process gloo/nccl group
    ray        the same DeepSpeed step inside a Ray Train TorchTrainer with one worker

    python bench/train_throughput.py --backbone-shape tiny --steps 20            # CPU, about a minute
    python bench/train_throughput.py --backbone-shape qwen0.5b --batch 8 --history 50 --text-tokens 32
    python bench/train_throughput.py --backbone-shape smollm2-135m --compile --modes plain,deepspeed

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
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

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
        "attn": args.attn,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "lr": 1e-4,
        "threads": torch.get_num_threads(),
    }


def karma_config(spec: dict):
    """The project Config this benchmark's model and engine are built from."""
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
                 "precision": spec["precision"], "omp_threads": spec["threads"]},
    })


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
    if spec["compile"]:
        model.backbone.get_decoder().compile(dynamic=False)  # the backbone, in place (two shapes per step)
    return model


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
    return {
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


def run_plain(spec: dict) -> dict:
    from karma.optim import make_scheduler, param_groups
    from karma.step import NegativeSampler, karma_losses

    cfg = karma_config(spec)
    dev = spec["device"]
    model = build_model(spec, cfg)
    model.train()
    cuda = dev == "cuda"
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, fused=cuda or None)
    sched = make_scheduler(opt, cfg.train.warmup_steps, spec["warmup"] + spec["steps"])
    sampler = NegativeSampler(item_counts(spec), cfg.loss.n_negatives, seed=spec["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = spec["precision"] == "bf16"

    def step(batch: dict) -> dict:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss, parts = karma_losses(model, batch, cfg.loss, sampler)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return parts

    out = time_steps(step, make_batches(spec), spec, torch.device(dev))
    out["flops"] = flop_count(spec, model)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def init_single_process_group(device: str) -> dict | None:
    """A world of one for DeepSpeed outside any launcher. Returns the environment it replaced
    (for `close_process_group`), or None when a group already existed."""
    import torch.distributed as dist

    if dist.is_initialized():
        return None
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    return saved


def close_process_group(saved: dict) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_deepspeed(spec: dict) -> dict:
    """The DeepSpeed step exactly as karma.train.worker runs it, timed. Needs a process group."""
    from karma.step import NegativeSampler, karma_losses
    from karma.train.engine import gather_targets, make_engine

    cfg = karma_config(spec)
    model = build_model(spec, cfg)
    flops = flop_count(spec, model)
    engine, _, _ = make_engine(model, cfg, 1, spec["warmup"] + spec["steps"])
    engine.train()
    sampler = NegativeSampler(item_counts(spec), cfg.loss.n_negatives, seed=spec["seed"])

    def step(batch: dict) -> dict:
        loss, parts = karma_losses(engine.module, batch, cfg.loss, sampler, gather=gather_targets)
        engine.backward(loss)
        engine.step()
        return parts

    out = time_steps(step, make_batches(spec), spec, engine.device)
    out["flops"] = flops
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
    rows = [("mode", "step ms", "tokens/s", "examples/s", "MFU", "peak GiB", "loss first->last")]
    errors = []
    for mode, m in res["modes"].items():
        if "error" in m:
            rows.append((mode, "error", "", "", "", "", ""))
            errors.append(f"{mode}: {m['error'].splitlines()[0][:200]}")
            continue
        mfu = "-" if m["mfu"] is None else f"{m['mfu'] * 100:.1f}%"
        rows.append((mode, f"{m['step_s_median'] * 1e3:.1f}", f"{m['tokens_per_s']:,.0f}",
                     f"{m['examples_per_s']:,.1f}", mfu, f"{m['peak_memory_gib']:.2f}",
                     f"{m['loss_first']:.3f}->{m['loss_last']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("ratios (tokens/s): " + ", ".join(f"{k}={_fmt(v)}" for k, v in res["ratios"].items()))
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
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone in every mode")
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


def measure(mode: str, spec: dict, args: argparse.Namespace) -> dict:
    if mode == "plain":
        return run_plain(spec)
    if mode == "deepspeed":
        group_env = init_single_process_group(spec["device"])
        try:
            return run_deepspeed(spec)
        finally:
            if group_env is not None:
                close_process_group(group_env)
    return run_ray(spec, args.ray_cpus or os.cpu_count() or 1, args.ray_worker_niceness)


def summarise(res: dict) -> None:
    """Ratios of tokens/s between the modes measured so far (None where one is missing)."""
    tps = {k: v["tokens_per_s"] for k, v in res["modes"].items() if "tokens_per_s" in v}

    def ratio(a: str, b: str):
        return tps[a] / tps[b] if a in tps and b in tps else None

    res["ratios"] = {"deepspeed_over_plain": ratio("deepspeed", "plain"),
                     "ray_over_deepspeed": ratio("ray", "deepspeed")}
    ntok = {v["tokens_per_step"] for v in res["modes"].values() if "tokens_per_step" in v}
    res["same_tokens_every_mode"] = len(ntok) <= 1
    res["load_average_after"] = list(os.getloadavg())


def run(argv: list[str] | None = None) -> dict:
    """Parse, measure every requested mode, write the JSON; returns what was written."""
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"plain", "deepspeed", "ray"}
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from plain, deepspeed, ray")
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
    for mode in modes:
        _cleanup(device)
        print(f"[bench] {mode} ...", flush=True)
        t0 = time.perf_counter()
        try:
            m = measure(mode, spec, args)
        except Exception as err:  # one failing mode (e.g. out of memory) keeps the others' numbers
            if args.strict:
                raise
            import traceback

            traceback.print_exc()
            m = {"error": f"{type(err).__name__}: {err}"[:2000]}
        m["mode_wall_s"] = time.perf_counter() - t0
        if "error" not in m:
            m["achieved_tflops"] = m["flops"]["flops_per_step"] / m["step_s_median"] / 1e12
            m["mfu"] = m["flops"]["flops_per_step"] / m["step_s_median"] / peak if peak else None
            res.setdefault("flops", m["flops"])
        res["modes"][mode] = m
        summarise(res)
        out_path.write_text(json.dumps(res, indent=2) + "\n")  # after every mode: partial runs keep numbers
    print_table(res)
    print(f"[bench] wrote {out_path}")
    return res


if __name__ == "__main__":
    run()
