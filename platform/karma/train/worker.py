"""The per-worker training function run by Ray Train: a DeepSpeed engine around the KARMA model,
Ray Data shards in, metrics and DeepSpeed checkpoints out (`ray.train.report`)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray.train
import torch
import torch.distributed as dist

from karma.config import Config, from_dict
from karma.data import collate
from karma.evaluate import batches, semantic_analyses
from karma.export import export_model
from karma.factory import build_model
from karma.progress import Progress
from karma.retrieval import evaluate_retrieval
from karma.step import NegativeSampler, karma_losses, prepare_batch
from karma.train.engine import full_state_dict, gather_targets, make_engine, set_cpu_threads, torch_linear

CKPT_TAG = "ckpt"
FAULT_ENV = "KARMA_FAULT_AT_STEP"  # "STEP:MARKER_FILE": raise once at STEP (fault-injection tests)


def _log(rank: int):
    return (lambda msg: print(f"[karma] {msg}", flush=True)) if rank == 0 else (lambda msg: None)


def _maybe_inject_fault(step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not Path(marker).exists():
        Path(marker).write_text(str(step))
        raise RuntimeError(f"injected fault at step {step}")


@torch.no_grad()
def distributed_interests(engine, examples: pd.DataFrame, tok, cfg: Config, device, rank: int, world: int) -> torch.Tensor:
    """Interest embeddings of every validation example, each worker encoding its own slice.

    Slices are padded to equal length so every worker runs the same forwards (ZeRO-3 needs
    that), then all-gathered: every worker ends with the complete [n, H, d] tensor."""
    model = engine.module
    model.eval()
    n = len(examples)
    per = -(-n // world)
    part = examples.iloc[np.arange(rank * per, rank * per + per) % n]
    z = torch.cat([model.interests(prepare_batch(raw, model, tok, device))["z"].float()
                   for raw in batches(part, 256, cfg.data.max_history)])
    if world > 1:
        parts = [torch.empty_like(z) for _ in range(world)]
        dist.all_gather(parts, z.contiguous())
        z = torch.cat(parts)
    return z[:n].cpu()  # padding repeated the first rows: drop it


def _save_checkpoint(engine, sampler: NegativeSampler, state: dict, rank: int, directory: str) -> None:
    engine.save_checkpoint(directory, tag=CKPT_TAG, client_state=state)
    # RNG streams are per worker: each saves its own next to DeepSpeed's shards.
    torch.save({"torch": torch.get_rng_state(), "sampler": sampler.state_dict()}, Path(directory) / f"rng_rank{rank}.pt")


def _restore(engine, sampler: NegativeSampler, rank: int, log) -> dict:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -1.0}
    with ckpt.as_directory() as d:
        _, state = engine.load_checkpoint(d, tag=CKPT_TAG)
        rng = torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    sampler.load_state_dict(rng["sampler"])
    log(f"resumed from checkpoint at step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")
    return {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "best")}


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _log(rank)
    if not cfg.dist.use_gpu:
        set_cpu_threads(cfg.dist.omp_threads)
    data_dir = Path(loop_config["data_dir"])
    items = pd.read_parquet(data_dir / "items.parquet")
    counts = np.load(data_dir / "counts.npy")
    valid = pd.read_parquet(data_dir / "valid.parquet")
    steps_per_epoch, total = loop_config["steps_per_epoch"], loop_config["total_steps"]

    model, tok = build_model(cfg, items, log=log)
    engine, _, _ = make_engine(model, cfg, world, total)
    device = engine.device
    sampler = NegativeSampler(counts, cfg.loss.n_negatives, seed=cfg.train.seed * 1000 + rank, device=device)
    state = _restore(engine, sampler, rank, log)
    tracker = _tracker(loop_config) if rank == 0 else None
    if tracker is not None and state["step"]:
        tracker.log_metrics({"train/resumed_from_step": state["step"]}, step=state["step"])

    shard = ray.train.get_dataset_shard("train")
    progress = Progress(total, cfg.train.log_every, log)
    ga = cfg.train.grad_accum
    micro_per_epoch = steps_per_epoch * ga
    while state["step"] < total:
        epoch = state["epoch"]
        engine.train()
        start = time.time()
        batches = shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=cfg.train.batch_size * 8,
                                     local_shuffle_seed=cfg.train.seed + epoch * 7919 + rank)
        micro = 0
        for raw in batches:
            if micro >= micro_per_epoch or state["step"] >= total:
                break
            micro += 1
            if micro <= state["batch_in_epoch"] * ga:
                continue  # consumed before the restart
            batch = prepare_batch(collate(raw, cfg.data.max_history), engine.module, tok, device)
            loss, parts = karma_losses(engine.module, batch, cfg.loss, sampler, gather=gather_targets)
            engine.backward(loss)
            engine.step()
            if micro % ga:
                continue
            state["step"] += 1
            state["batch_in_epoch"] = micro // ga
            _maybe_inject_fault(state["step"])
            stats = progress.update(state["step"], parts, cfg.train.batch_size * ga * world)
            if tracker is not None and stats is not None:
                tracker.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=state["step"])
        if micro < min(micro_per_epoch, (total - (state["step"] - state["batch_in_epoch"])) * ga):
            raise RuntimeError(f"worker {rank}: data shard ran out after {micro} batches in epoch {epoch + 1}; "
                               "shards must hold equal row counts (drop_last)")
        state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        metrics = _evaluate(engine, valid, items, tok, cfg, device, rank, world, counts)
        metrics.update(epoch=epoch + 1, step=state["step"], epoch_seconds=time.time() - start)
        state["best"] = max(state["best"], metrics["NDCG@10"])
        log(f"epoch {epoch + 1}: valid HR@10={metrics['HR@10']:.4f} NDCG@10={metrics['NDCG@10']:.4f} "
            f"sink={metrics.get('sink_rate_first', float('nan')):.3f} ({metrics['epoch_seconds']:.0f}s)")
        if tracker is not None:
            tracker.log_metrics({f"valid/{k}": v for k, v in metrics.items()}, step=state["step"])
        last = state["step"] >= total
        if last:  # the held-out test split, once, after the last epoch: the numbers papers report
            test = _evaluate(engine, pd.read_parquet(data_dir / "test.parquet"), items, tok, cfg, device, rank,
                             world, counts)
            log(f"test HR@10={test['HR@10']:.4f} NDCG@10={test['NDCG@10']:.4f}")
            test = {f"test/{k}": v for k, v in test.items()}
            if tracker is not None:
                tracker.log_metrics(test, step=state["step"])
            metrics.update(test)
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(engine, sampler, state, rank, tmp)
            if last:  # on every rank: gathering ZeRO-3 weights and running the model are collectives
                _final_outputs(engine, tok, cfg, items, valid, metrics, Path(tmp), device, write=rank == 0)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _evaluate(engine, valid, items, tok, cfg: Config, device, rank: int, world: int, counts=None) -> dict:
    """Full-corpus HR@K / NDCG@K and MRR (exact ranks) on rank 0, the analyses on every worker;
    rank 0's numbers are broadcast so every worker reports the same metrics."""
    z = distributed_interests(engine, valid, tok, cfg, device, rank, world)
    metrics: dict = {}
    with torch.no_grad():  # every rank: under ZeRO-3 any module call is a collective
        item_emb = engine.module.item_embeddings().float().cpu()
    if rank == 0:
        # with counts: the long-tail breakdown (tail/...) too, from the same exact ranks
        metrics = evaluate_retrieval(z, item_emb, valid["target"].to_numpy(), ks=tuple(cfg.train.ks),
                                     target_counts=counts)
    if cfg.train.analysis_examples:
        # Every worker runs the same analyses (ZeRO-3 forwards are collective); rank 0's count.
        report, _ = semantic_analyses(engine.module, valid, items, tok, cfg.data.max_history, device,
                                      n=cfg.train.analysis_examples, decode_tokens=cfg.data.text_max_tokens)
        metrics.update(report)
    if world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _final_outputs(engine, tok, cfg: Config, items, valid, metrics: dict, ckpt_dir: Path, device,
                   write: bool) -> None:
    """Last epoch: the inference export and the eval report, inside the checkpoint (written by
    rank 0). Every rank computes: under ZeRO-3 each module call gathers parameters collectively."""
    from karma.plots import attention_heatmap, hr_bars

    model = engine.module
    model.eval()
    weights = full_state_dict(engine)
    # A probe of interest embeddings the export must reproduce after reloading.
    probe = valid.iloc[:16]
    batch = prepare_batch(next(batches(probe, len(probe), cfg.data.max_history)), model, tok, device)
    with torch.no_grad(), torch_linear():  # the arithmetic a reloading process will do
        item_emb = model.item_embeddings().float().cpu().numpy()
        z = model.interests(batch)["z"].float().cpu().numpy()
    maps = model.attention_maps(batch)
    if not write:
        return
    export = export_model(model, tok, cfg, items, ckpt_dir / "export", state_dict=weights, item_emb=item_emb)
    np.save(export / "probe_interests.npy", z)
    probe.to_parquet(export / "probe_examples.parquet")
    report_dir = ckpt_dir / "report"
    report_dir.mkdir()
    (report_dir / "eval_report.json").write_text(json.dumps(metrics, indent=2, default=float))
    hr_bars(metrics, path=report_dir / "hr_at_k.png")
    last = maps["attentions"][-1].mean(1)  # [B, T, T], heads averaged
    q = maps["query_positions"][0, 0].item()
    attn = last[:8, q, :].cpu().numpy()
    attention_heatmap(attn, [f"ex{i}" for i in range(len(attn))], [str(i) for i in range(attn.shape[1])],
                      "attention of INT_1 over the sequence (last layer)", path=report_dir / "interest_attention.png")


def _tracker(loop_config: dict):
    """Rank 0 logs metrics straight into the driver's MLflow run as they happen."""
    if not loop_config.get("mlflow_run_id"):
        return None
    from karma.tracking import RunLogger

    return RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
