"""The per-worker training function run by Ray Train: Ray's glue around the one training loop
(`karma.train.loop.Trainer` over a DeepSpeed engine). This worker's data, resume from the latest
checkpoint, a checkpoint and `ray.train.report` after every epoch (and every
`train.checkpoint_every_steps` steps), metrics into MLflow from rank 0; after the last epoch
the export and the eval report of the best epoch's weights."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray.train
import torch
from safetensors.torch import load_file, save_file

from karma import storage
from karma.config import from_dict
from karma.costs import peak_rss_mb
from karma.data import read_examples
from karma.export import export_model
from karma.factory import build_model
from karma.batch import prepare_batch
from karma.step import NegativeSampler
from karma.train.engine import full_state_dict, make_engine, set_cpu_threads, torch_linear
from karma.train.loop import SELECT_METRIC, DeepSpeedBackend, LoopState, NonFiniteLoss, TrainData, Trainer, steps_plan

CKPT_TAG = "ckpt"
BEST_WEIGHTS = "best_model.safetensors"  # in every checkpoint: the best epoch's weights so far
# Fault injection for tests: "STEP:MARKER_FILE[:kill|:nan]" raises once at STEP, or kills the
# worker process outright (":kill"), or turns the weights to NaN (":nan", a diverged run); the
# marker file makes it happen once per run.
FAULT_ENV = "KARMA_FAULT_AT_STEP"
# Written by rank 0 beside the run's data when the loss turns NaN/inf; the driver raises it.
DIVERGED_NOTE = "diverged.txt"


def _log(rank: int):
    """Rank 0's progress lines. Written to stdout directly: Ray Train patches print() in its
    workers to send each line through its logger as well as to stdout, and the driver then
    showed every line twice."""
    if rank != 0:
        return lambda msg: None

    def log(msg: str) -> None:
        sys.stdout.write(f"[karma] {msg}\n")
        sys.stdout.flush()

    return log


def _maybe_inject_fault(step: int, module: torch.nn.Module) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, marker, *kind = spec.split(":", 2)
    if step != int(at) or Path(marker).exists():
        return
    Path(marker).write_text(str(step))
    if kind == ["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == ["nan"]:
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float("nan"))
        return
    raise RuntimeError(f"injected fault at step {step}")


def _save_checkpoint(engine, sampler: NegativeSampler, state: dict, rank: int, directory: str,
                     best_weights: dict | None) -> None:
    engine.save_checkpoint(directory, tag=CKPT_TAG, client_state=state)
    # RNG streams are per worker: each saves its own next to DeepSpeed's shards.
    torch.save({"torch": torch.get_rng_state(), "sampler": sampler.state_dict()}, Path(directory) / f"rng_rank{rank}.pt")
    if best_weights is not None:  # rank 0 holds them; with the state, they survive a restart
        save_file(best_weights, str(Path(directory) / BEST_WEIGHTS))


def _restore(engine, sampler: NegativeSampler, rank: int, log) -> tuple[LoopState, dict | None]:
    """(loop state, rank 0's copy of the best epoch's weights) from the latest checkpoint."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return LoopState(), None
    best_weights = None
    with ckpt.as_directory() as d:
        _, saved = engine.load_checkpoint(d, tag=CKPT_TAG)
        rng = torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=True)
        if rank == 0 and (Path(d) / BEST_WEIGHTS).is_file():
            best_weights = load_file(str(Path(d) / BEST_WEIGHTS))
    torch.set_rng_state(rng["torch"])
    sampler.load_state_dict(rng["sampler"])
    state = LoopState.from_dict(saved)
    log(f"resumed from checkpoint at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return state, best_weights


def _read_data(data_dir: Path) -> TrainData:
    """The examples `ray_job.prepare_data` wrote (valid is already the validation subset),
    memory-mapped: the workers on a host share one copy of the pages in the page cache."""
    splits = read_examples(data_dir)
    return TrainData(train=splits["train"], valid=splits["valid"], test=splits["test"],
                     items=pd.read_parquet(data_dir / "items.parquet"), counts=np.load(data_dir / "counts.npy"))


def _local_table(location: str | None, endpoint: str | None) -> str | None:
    """The text table's path on this node: an object store's table folder through the cache."""
    if location is None or not storage.is_uri(location):
        return location
    folder, name = location.rsplit("/", 1)
    return str(storage.local_dir(folder, endpoint) / name)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray glue around `Trainer`: the engine, resume, a checkpoint and a report after every
    epoch (and every `train.checkpoint_every_steps` steps), MLflow from rank 0; after the last
    epoch the test protocol, the export and the eval report go into the final checkpoint."""
    start = time.time()
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _log(rank)
    if not cfg.dist.use_gpu:
        set_cpu_threads(cfg.dist.omp_threads)
    if cfg.model.arch == "sasrec" and cfg.dist.compile == "auto":
        cfg.dist.compile = "none"  # auto would pick the decoder on a GPU: SASRec has none
    # an object store's folders come through this node's cache (one download per node)
    endpoint = cfg.dist.storage_endpoint
    data = _read_data(storage.local_dir(loop_config["data_dir"], endpoint))
    model, tok = build_model(cfg, data.items, log=log, text_table=_local_table(loop_config["text_table"], endpoint),
                             counts=data.counts)
    _, total = steps_plan(cfg.train, len(data.train), world)
    engine, _, _ = make_engine(model, cfg, world, total)
    trainer = Trainer(DeepSpeedBackend(engine, rank, world), data, tok, cfg, log)
    trainer.state, trainer.best_weights = _restore(engine, trainer.sampler, rank, log)
    tracker = _tracker(loop_config) if rank == 0 else None
    if tracker is not None and trainer.state.step:
        tracker.log_metrics({"train/resumed_from_step": trainer.state.step}, step=trainer.state.step)
    # this attempt's costs (a resumed run counts from its restart); ranks gather them at the end
    costs = {"setup_seconds": round(time.time() - start, 2), "train_seconds": 0.0, "valid_seconds": 0.0,
             "valid_queries": 0, "train_examples": 0, "rss_mb/setup": peak_rss_mb()}
    first_step = trainer.state.step

    def checkpoint(tmp: str) -> None:
        _save_checkpoint(engine, trainer.sampler, dataclasses.asdict(trainer.state), rank, tmp, trainer.best_weights)

    def on_step(state: LoopState, stats: dict | None) -> None:
        _maybe_inject_fault(state.step, engine.module)
        if tracker is not None and stats is not None:
            tracker.log_metrics({f"train/{k}": v for k, v in stats.items()}, step=state.step)
        every = cfg.train.checkpoint_every_steps
        mid_epoch = state.batch_in_epoch < trainer.steps_per_epoch and state.step < trainer.total_steps
        if every and state.step % every == 0 and mid_epoch:
            with tempfile.TemporaryDirectory() as tmp:  # mid-epoch: a restart resumes at this step
                checkpoint(tmp)
                # the score Ray's checkpoint retention reads: the best validation so far
                ray.train.report({"step": state.step, "epoch": state.epoch, SELECT_METRIC: state.best},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))

    trainer.on_step = on_step
    try:
        for metrics in trainer.epochs():
            costs["train_seconds"] += metrics["train_seconds"]
            costs["valid_seconds"] += metrics["eval_seconds"]
            costs["valid_queries"] += len(data.valid)
            costs["train_examples"] = (trainer.state.step - first_step) * cfg.train.batch_size * cfg.train.grad_accum * world
            costs["rss_mb/train"] = peak_rss_mb()
            if tracker is not None:
                tracker.log_metrics({f"valid/{k}": v for k, v in metrics.items()}, step=trainer.state.step)
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint(tmp)  # the last epoch's training state, so a longer rerun continues from it
                if trainer.done:
                    metrics = _finish(trainer, metrics, data, Path(tmp), tracker, costs)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    except NonFiniteLoss as err:
        # Not a fault a restart can fix (it would diverge again), so no raise into Ray's retry:
        # every rank ends here at the same step (the guard's check is collective), nothing is
        # checkpointed, the last good checkpoint stays the run's latest, and the driver raises.
        log(str(err))
        if rank == 0:
            storage.write_bytes(loop_config["diverged_note"], str(err).encode(), endpoint)
    finally:
        if tracker is not None:
            tracker.close()  # send what is queued (bounded wait); report what could not be delivered


def _finish(trainer: Trainer, metrics: dict, data: TrainData, ckpt_dir: Path, tracker, costs: dict) -> dict:
    """After the last epoch: the test protocol (`Trainer.finish`: best epoch's weights, test
    split, analyses), then the export and the eval report into the checkpoint. Returns the last
    report: the best epoch's validation metrics, best_epoch, the test split's metrics and
    analyses as test/..., and what the stages cost as cost/... (every rank's peak RSS)."""
    s = trainer.state
    start = time.time()
    out = trainer.finish()
    costs.update({"test_seconds": round(time.time() - start, 2), "rss_mb/test": peak_rss_mb()})
    test = {f"test/{k}": v for k, v in {**out["test"], **out.get("analyses", {})}.items()}
    test.update({f"test_served/{k}": v for k, v in out["test_served"].items()})
    spent = _gather_costs(costs, trainer.backend.rank, trainer.backend.world)
    report = {**(out["best"] or metrics), "epoch": s.epoch, "step": s.step, "best_epoch": out["best_epoch"], **test,
              **spent}
    if tracker is not None:
        tracker.log_metrics({**test, **spent, "best_epoch": out["best_epoch"]}, step=s.step)
    # on every rank: gathering ZeRO-3 weights and running the model are collectives
    _final_outputs(trainer, report, ckpt_dir, write=trainer.backend.rank == 0)
    return report


def _gather_costs(costs: dict, rank: int, world: int) -> dict:
    """cost/... for the last report: rank 0's seconds (ranks move in step) and every rank's
    peak RSS after set-up, training and the test (cost/rank{r}/rss_mb/...), so a user sees the
    worker that holds the most, not only rank 0."""
    every = [costs]
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, costs)
    out = {f"cost/{k}": v for k, v in costs.items() if not k.startswith("rss_mb/")}
    for r, theirs in enumerate(every):
        out.update({f"cost/rank{r}/{k}": v for k, v in theirs.items() if k.startswith("rss_mb/")})
    return out


def _final_outputs(trainer: Trainer, metrics: dict, ckpt_dir: Path, write: bool) -> None:
    """Last epoch: the inference export and the eval report, inside the checkpoint (written by
    rank 0). Every rank computes: under ZeRO-3 each module call gathers parameters collectively.
    SASRec gets the report only: the export format and the attention maps are KARMA's."""
    from karma.plots import attention_heatmap, hr_bars, metric_curve

    cfg, tok, model = trainer.cfg, trainer.tok, trainer.backend.module
    model.eval()
    karma = cfg.model.arch != "sasrec"
    if karma:
        weights = full_state_dict(trainer.backend.engine)
        # A probe of interest embeddings the export must reproduce after reloading.
        probe = trainer.data.valid.head(16)
        batch = prepare_batch(probe.collate(cfg.data.max_history), model, tok, trainer.backend.device)
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
    metric_curve({cfg.model.arch: trainer.state.curve}, "validation NDCG@10", path=report_dir / "valid_ndcg_at_10.png")
    if not karma:
        return
    export = export_model(model, tok, cfg, trainer.data.items, ckpt_dir / "export", state_dict=weights,
                          item_emb=item_emb)
    np.save(export / "probe_interests.npy", z)
    probe.to_frame().to_parquet(export / "probe_examples.parquet")
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
