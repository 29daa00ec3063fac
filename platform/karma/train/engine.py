"""DeepSpeed: the engine config from our Config, and the engine around a KARMA model.

Knows nothing of Ray: the process group is whoever's (Ray Train, torchrun, or one process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys

import torch
import torch.distributed as dist

from karma.config import Config, DistConfig
from karma.losses import compile_ce_kernels
from karma.optim import make_optimizer, make_scheduler


def resolve_dist(d: DistConfig) -> DistConfig:
    """`d` with every per-device default ("auto" / None) filled in from `d.use_gpu`.

    GPU: compile the decoder under ZeRO 0-2; under ZeRO-3 compile nothing (its per-module
    hooks are compiler-disabled, so a compiled decoder shatters into small graphs: 0.25x of
    ZeRO-2 measured on an H200) unless DeepCompile replaces the hooks, which compiles the whole
    model; overlap communication on its own stream; keep tensors under 1e7 elements resident
    under ZeRO-3 (on a 0.5B model everything but the embedding: no per-layer gathers; on a 7B
    model the norms and key/value projections, a few hundred MB per GPU).
    CPU: what runs fastest and steadiest on a small host: no compile, no overlap threads."""
    gpu = d.use_gpu
    compile_ = d.compile
    if compile_ == "auto":
        if d.deepcompile:
            compile_ = "model"
        elif gpu and d.zero_stage < 3:
            compile_ = "decoder"
        else:
            compile_ = "none"

    def pick(value, default):
        return default if value is None else value

    return dataclasses.replace(
        d, compile=compile_, overlap_comm=pick(d.overlap_comm, gpu),
        stage3_param_persistence_threshold=pick(d.stage3_param_persistence_threshold, int(1e7 if gpu else 1e5)),
        stage3_prefetch_bucket_size=pick(d.stage3_prefetch_bucket_size, int(5e7)),
        stage3_max_live_parameters=pick(d.stage3_max_live_parameters, int(1e9)))


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    d, t = resolve_dist(cfg.dist), cfg.train
    zero: dict = {"stage": d.zero_stage, "contiguous_gradients": d.contiguous_gradients}
    if d.zero_stage >= 1:
        zero.update(overlap_comm=d.overlap_comm, reduce_bucket_size=d.reduce_bucket_size)
    if d.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = d.allgather_bucket_size
    if d.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=d.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=d.stage3_param_persistence_threshold,
                    stage3_max_live_parameters=d.stage3_max_live_parameters,
                    memory_efficient_linear=d.stage3_memory_efficient_linear,
                    stage3_gather_16bit_weights_on_model_save=True)
    out = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own progress line instead
        "wall_clock_breakdown": False,
    }
    if d.deepcompile:
        out["compile"] = {"deepcompile": True}
    return out


def compile_model(model: torch.nn.Module, d: DistConfig, engine=None) -> str:
    """Apply `d.compile` (resolved per device) in place; returns what was compiled.
    "model" goes through DeepSpeed's `engine.compile()` when there is an engine. Any compile
    also fuses the chunked vocabulary cross-entropy's kernels."""
    d = resolve_dist(d)
    if d.compile == "none":
        return "none"
    if d.compile == "model" and engine is not None:
        engine.compile(compile_kwargs={"dynamic": d.compile_dynamic})
    else:
        model.compile_parts(d.compile, d.compile_dynamic)
    compile_ce_kernels()
    return d.compile


def make_engine(model: torch.nn.Module, cfg: Config, world_size: int, total_steps: int):
    """(engine, optimizer, scheduler): torch AdamW (fused on CUDA) under DeepSpeed ZeRO, the
    model compiled as `dist.compile` says."""
    import deepspeed

    d = resolve_dist(cfg.dist)
    if d.activation_checkpointing:
        base = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = d.use_gpu and torch.cuda.is_available()
    opt = make_optimizer(model, cfg.train, fused=fused or None)
    sched = make_scheduler(opt, cfg.train.warmup_steps, total_steps)
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, world_size),
        dist_init_required=not dist.is_initialized())
    compile_model(engine.module, d, engine)
    return engine, opt, sched


def gather_targets(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather a [B] tensor from every worker -> ([W*B], offset of this worker's rows).
    Every worker must pass the same B (no ragged batches)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole module's weights on every rank (ZeRO-3 gathers its partitions; a collective)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        module = engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return engine.module.state_dict()


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def torch_linear():
    """torch's own F.linear inside the block, and whatever F.linear was before afterwards. A
    ZeRO-3 engine swaps in DeepSpeed's memory-efficient linear for the whole process (the same
    maths, other bf16 rounding): what must match a fresh process bit for bit, like the export's
    probe, is computed with torch's."""
    patched = torch.nn.functional.linear
    torch.nn.functional.linear = torch._C._nn.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = patched


@contextlib.contextmanager
def single_process_group(device: str = "cpu"):
    """A world of one (gloo on CPU, nccl on CUDA) for DeepSpeed outside any launcher; the
    environment, DeepSpeed's cached groups and torch.nn.functional.linear are as before
    afterwards, so other work can follow in the same process. Does nothing when a group
    already exists."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        # a ZeRO-3 engine made inside swaps F.linear process-wide: later work here would not
        # compute what a fresh process does
        with torch_linear():
            yield
    finally:
        _destroy_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _destroy_group() -> None:
    """DeepSpeed keeps references to the groups it built on the world group: its own destroy
    releases them (a later world would not match them otherwise)."""
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_cpu_threads(n: int) -> None:
    """Avoid oversubscription on small hosts: several workers each using every core is slow."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
