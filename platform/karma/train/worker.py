"""The per-worker training function run by Ray Train: a DeepSpeed engine around the model (KARMA
or the SASRec baseline), a fresh shuffle of the training examples every epoch, early stopping on
validation NDCG@10, metrics and DeepSpeed checkpoints out (`ray.train.report`); the test split,
the export and the report use the weights of the best validation epoch."""

from __future__ import annotations

import contextlib
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
from safetensors.torch import load_file, save_file

from karma.config import Config, from_dict
from karma.data import epoch_order
from karma.evaluate import batches, semantic_analyses
from karma.export import export_model
from karma.factory import build_model
from karma.progress import Progress
from karma.retrieval import evaluate_retrieval
from karma.step import NegativeSampler, prepare_batch
from karma.train.engine import full_state_dict, gather_targets, make_engine, set_cpu_threads, torch_linear

CKPT_TAG = "ckpt"
BEST_WEIGHTS = "best_model.safetensors"  # in every checkpoint: the best epoch's weights so far
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


def epoch_rows(history_lengths: np.ndarray, batch_size: int, world: int, rank: int, micro_batches: int,
               seed: int, epoch: int, bucket_batches: int = 0) -> np.ndarray:
    """This worker's example rows for one epoch, in training order: the plain loop's epoch order
    (`karma.data.epoch_order`: a fresh permutation for each (seed, epoch), optionally bucketed by
    history length) cut into global batches of world x batch_size rows, of which each worker takes
    its own slice. The same after a restart, so a resumed epoch skips exactly the batches consumed
    before it."""
    order = epoch_order(history_lengths, world * batch_size, np.random.default_rng([seed, epoch]), bucket_batches)
    return order[: micro_batches * world * batch_size].reshape(micro_batches, world, batch_size)[:, rank].reshape(-1)


def epoch_batches(train: pd.DataFrame, cfg: Config, rank: int, world: int, micro_batches: int, epoch: int,
                  done: int = 0):
    """This worker's collated micro-batches of one epoch (`epoch_rows`), after the first `done`."""
    bs = cfg.train.batch_size
    rows = epoch_rows(train["history"].map(len).to_numpy(), bs, world, rank, micro_batches, cfg.train.seed, epoch,
                      cfg.train.bucket_batches)
    return batches(train.iloc[rows[done * bs:]], bs, cfg.data.max_history)


def _save_checkpoint(engine, sampler: NegativeSampler, state: dict, rank: int, directory: str,
                     best_weights: dict | None) -> None:
    engine.save_checkpoint(directory, tag=CKPT_TAG, client_state=state)
    # RNG streams are per worker: each saves its own next to DeepSpeed's shards.
    torch.save({"torch": torch.get_rng_state(), "sampler": sampler.state_dict()}, Path(directory) / f"rng_rank{rank}.pt")
    if best_weights is not None:  # rank 0 holds them; with the state, they survive a restart
        save_file(best_weights, str(Path(directory) / BEST_WEIGHTS))


def _restore(engine, sampler: NegativeSampler, rank: int, log) -> tuple[dict, dict | None]:
    """(training state, rank 0's copy of the best epoch's weights) from the latest checkpoint."""
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -1.0, "best_epoch": 0, "best_metrics": None,
             "stale": 0, "curve": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state, None
    best_weights = None
    with ckpt.as_directory() as d:
        _, saved = engine.load_checkpoint(d, tag=CKPT_TAG)
        rng = torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=False)
        if rank == 0 and (Path(d) / BEST_WEIGHTS).is_file():
            best_weights = load_file(str(Path(d) / BEST_WEIGHTS))
    torch.set_rng_state(rng["torch"])
    sampler.load_state_dict(rng["sampler"])
    state.update({k: saved[k] for k in state if k in saved})  # older checkpoints lack the newer keys
    log(f"resumed from checkpoint at step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")
    return state, best_weights


@torch.no_grad()
def _load_weights(engine, weights: dict | None, rank: int, world: int) -> None:
    """Rank 0's full state dict into every rank's module: rank 0 copies it in and broadcasts each
    tensor (under ZeRO-3 inside a gather, whose exit re-partitions rank 0's values)."""
    module = engine.module
    gathered = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)
    with gathered:
        for name, tensor in module.state_dict().items():
            if rank == 0:
                tensor.copy_(weights[name])
            if world > 1:
                dist.broadcast(tensor, src=0)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _log(rank)
    if not cfg.dist.use_gpu:
        set_cpu_threads(cfg.dist.omp_threads)
    if cfg.model.arch == "sasrec" and cfg.dist.compile == "auto":
        cfg.dist.compile = "none"  # auto would pick the decoder on a GPU: SASRec has none
    data_dir = Path(loop_config["data_dir"])
    items = pd.read_parquet(data_dir / "items.parquet")
    counts = np.load(data_dir / "counts.npy")
    valid = pd.read_parquet(data_dir / "valid.parquet")
    train = pd.read_parquet(data_dir / "train.parquet")
    steps_per_epoch, total = loop_config["steps_per_epoch"], loop_config["total_steps"]
    if cfg.model.arch == "sasrec" and cfg.train.analysis_examples:
        log("semantic analyses and attention maps skipped: they read a language model's attention and "
            "decoding, SASRec has neither")

    model, tok = build_model(cfg, items, log=log)
    engine, _, _ = make_engine(model, cfg, world, total)
    device = engine.device
    sampler = NegativeSampler(counts, cfg.loss.n_negatives, seed=cfg.train.seed * 1000 + rank, device=device)
    state, best_weights = _restore(engine, sampler, rank, log)
    tracker = _tracker(loop_config) if rank == 0 else None
    if tracker is not None and state["step"]:
        tracker.log_metrics({"train/resumed_from_step": state["step"]}, step=state["step"])

    progress = Progress(total, cfg.train.log_every, log)
    bs, ga, patience = cfg.train.batch_size, cfg.train.grad_accum, cfg.train.early_stop_patience
    micro_per_epoch = steps_per_epoch * ga
    while state["step"] < total and not (patience and state["stale"] >= patience):
        epoch = state["epoch"]
        engine.train()
        start = time.time()
        done = state["batch_in_epoch"] * ga  # micro-batches consumed before a restart
        for micro, raw in enumerate(epoch_batches(train, cfg, rank, world, micro_per_epoch, epoch, done),
                                    start=done + 1):
            if state["step"] >= total:
                break
            batch = prepare_batch(raw, engine.module, tok, device)
            loss, parts = engine.module.loss(batch, cfg.loss, sampler, gather=gather_targets)
            engine.backward(loss)
            engine.step()
            if micro % ga:
                continue
            state["step"] += 1
            state["batch_in_epoch"] = micro // ga
            _maybe_inject_fault(state["step"])
            stats = progress.update(state["step"], parts, bs * ga * world)
            if tracker is not None and stats is not None:
                tracker.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=state["step"])
        state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        metrics = _evaluate(engine, valid, items, tok, cfg, device, rank, world, counts)
        metrics.update(epoch=epoch + 1, step=state["step"], epoch_seconds=time.time() - start)
        state["curve"].append(metrics["NDCG@10"])
        # Metrics are rank 0's, broadcast: every rank takes the same decisions.
        if metrics["NDCG@10"] > state["best"]:
            state.update(best=metrics["NDCG@10"], best_epoch=epoch + 1, best_metrics=metrics, stale=0)
            weights = full_state_dict(engine)  # a collective under ZeRO-3
            best_weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()} \
                if rank == 0 else None
            del weights
        else:
            state["stale"] += 1
        sink = f" sink={metrics['sink_rate_first']:.3f}" if "sink_rate_first" in metrics else ""
        log(f"epoch {epoch + 1}: valid HR@10={metrics['HR@10']:.4f} NDCG@10={metrics['NDCG@10']:.4f}{sink} "
            f"({metrics['epoch_seconds']:.0f}s)")
        if tracker is not None:
            tracker.log_metrics({f"valid/{k}": v for k, v in metrics.items()}, step=state["step"])
        last = state["step"] >= total
        if patience and state["stale"] >= patience and not last:
            log(f"early stop: no NDCG@10 gain for {state['stale']} epochs (best: epoch {state['best_epoch']})")
            last = True
        with tempfile.TemporaryDirectory() as tmp:
            # The last epoch's training state, so a longer rerun continues from it.
            _save_checkpoint(engine, sampler, state, rank, tmp, best_weights)
            if last:
                metrics = _finish(engine, state, best_weights, metrics, tok, cfg, items, valid, counts,
                                  data_dir, Path(tmp), device, rank, world, tracker, log)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if tracker is not None:
        tracker.close()  # send what is queued (bounded wait); report what could not be delivered


def _finish(engine, state: dict, best_weights: dict | None, metrics: dict, tok, cfg: Config, items, valid, counts,
            data_dir: Path, ckpt_dir: Path, device, rank: int, world: int, tracker, log) -> dict:
    """After the last epoch: the best epoch's weights back into the model, then the held-out test
    split once (the numbers papers report), the export and the report. Returns the last report:
    the best epoch's validation metrics, best_epoch, and the test split's as test/..."""
    best_epoch = state["best_epoch"]
    if best_epoch and best_epoch != state["epoch"]:
        _load_weights(engine, best_weights, rank, world)
        log(f"best validation NDCG@10 at epoch {best_epoch}: its weights go to the test split and the export")
    report = {**(state["best_metrics"] or metrics), "epoch": state["epoch"], "step": state["step"],
              "best_epoch": best_epoch}
    test = _evaluate(engine, pd.read_parquet(data_dir / "test.parquet"), items, tok, cfg, device, rank, world,
                     counts)
    log(f"test (weights of epoch {best_epoch}): HR@10={test['HR@10']:.4f} NDCG@10={test['NDCG@10']:.4f}")
    test = {f"test/{k}": v for k, v in test.items()}
    if tracker is not None:
        tracker.log_metrics({**test, "best_epoch": best_epoch}, step=state["step"])
    report.update(test)
    # on every rank: gathering ZeRO-3 weights and running the model are collectives
    _final_outputs(engine, tok, cfg, items, valid, report, state["curve"], ckpt_dir, device, write=rank == 0)
    return report


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
    if cfg.train.analysis_examples and cfg.model.arch != "sasrec":  # SASRec has no text or attention to analyse
        # Every worker runs the same analyses (ZeRO-3 forwards are collective); rank 0's count.
        report, _ = semantic_analyses(engine.module, valid, items, tok, cfg.data.max_history, device,
                                      n=cfg.train.analysis_examples, decode_tokens=cfg.data.text_max_tokens)
        metrics.update(report)
    if world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _final_outputs(engine, tok, cfg: Config, items, valid, metrics: dict, curve: list[float], ckpt_dir: Path,
                   device, write: bool) -> None:
    """Last epoch: the inference export and the eval report, inside the checkpoint (written by
    rank 0). Every rank computes: under ZeRO-3 each module call gathers parameters collectively.
    SASRec gets the report only: the export format and the attention maps are KARMA's."""
    from karma.plots import attention_heatmap, hr_bars, metric_curve

    model = engine.module
    model.eval()
    karma = cfg.model.arch != "sasrec"
    if karma:
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
    report_dir = ckpt_dir / "report"
    report_dir.mkdir()
    (report_dir / "eval_report.json").write_text(json.dumps(metrics, indent=2, default=float))
    hr_bars(metrics, path=report_dir / "hr_at_k.png")
    metric_curve({cfg.model.arch: curve}, "validation NDCG@10", path=report_dir / "valid_ndcg_at_10.png")
    if not karma:
        return
    export = export_model(model, tok, cfg, items, ckpt_dir / "export", state_dict=weights, item_emb=item_emb)
    np.save(export / "probe_interests.npy", z)
    probe.to_parquet(export / "probe_examples.parquet")
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
