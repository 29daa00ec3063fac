"""DeepSpeed: the engine config from our Config, and the engine around a KARMA model.

Knows nothing of Ray: the process group is whoever's (Ray Train, torchrun, or one process).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from karma.config import Config
from karma.optim import param_groups, warmup_cosine


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    d, t = cfg.dist, cfg.train
    zero: dict = {"stage": d.zero_stage, "contiguous_gradients": True}
    if d.zero_stage >= 1:
        # Overlap only pays with a separate comm stream (GPUs); on CPU/gloo it just adds threads.
        zero.update(overlap_comm=d.use_gpu, reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    if d.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update(stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e5),
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
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


def make_engine(model: torch.nn.Module, cfg: Config, world_size: int, total_steps: int):
    """(engine, optimizer, scheduler): torch AdamW (fused on CUDA) under DeepSpeed ZeRO."""
    import deepspeed

    if cfg.dist.activation_checkpointing:
        base = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = cfg.dist.use_gpu and torch.cuda.is_available()
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.train.warmup_steps, total_steps))
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, world_size),
        dist_init_required=not dist.is_initialized())
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


def set_cpu_threads(n: int) -> None:
    """Avoid oversubscription on small hosts: several workers each using every core is slow."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
