"""The Ray Train assembly: data to compact example arrays (in a Ray task, not on the driver),
memory-mapped by the workers, a fresh shuffle every epoch, a TorchTrainer with fault tolerance and score-kept
checkpoints, then the MLflow run and registry. Called by jobs/train.py and, per trial, by the
Tune sweep."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.exceptions import RayTaskError
from ray.train.torch import TorchConfig, TorchTrainer

from karma import storage
from karma.config import Config, ConfigError
from karma.data import DataError
from karma.provenance import provenance
from karma.train.loop import NonFiniteLoss, steps_plan
from karma.train.worker import DIVERGED_NOTE, train_loop_per_worker

# What a rerun of the same tracking.run_name may change: a longer run continues the same training.
GROWABLE = ("train.epochs", "train.max_steps")
JOB_CONFIG = "job_config.json"  # under <storage>/<run_name>/: the config the run's checkpoints come from


@dataclass
class TrainResult:
    # the last report: the best epoch's validation metrics (best_epoch), the test split's as
    # test/... (with those weights), epoch and step where training ended
    metrics: dict
    checkpoint_dir: Path | None  # the final checkpoint on local disk (holds export/ and report/)
    export_dir: Path | None
    run_id: str | None  # MLflow run
    model_version: str | None  # registered model version
    steps: int
    # the data task's summary: sizes, seconds per step, peak RSS, and the text task's (`text`)
    data: dict | None = None


# DEFAULT scheduling: inside a Tune trial, tasks otherwise land in the trial's placement group,
# which holds no CPU for them. max_calls=1: the process exits afterwards, so the memory that
# loading and splitting took goes back to the node instead of staying in a pooled worker.
@ray.remote(scheduling_strategy="DEFAULT", max_calls=1)
def prepare_data(cfg_dict: dict, out_dir: str) -> dict:
    """Load, validate and split the data; write the compact examples (`karma.data.write_examples`:
    each sequence once, each split an index; valid as the validation subset), the item table and
    the training counts for the workers, who memory-map them. Runs as a Ray task so the driver
    never holds the data set."""
    from karma.config import from_dict
    from karma.pipeline import prepare, write_prepared

    from karma.costs import peak_rss_mb

    import tempfile

    start = time.time()
    cfg = from_dict(cfg_dict)
    prep = prepare(cfg.data, log=lambda m: print(f"[karma] {m}", flush=True))
    if not storage.is_uri(out_dir):
        summary = write_prepared(prep, Path(out_dir), cfg.train.eval_max_users)
    else:  # written on this node's disk, then uploaded; _COMPLETE goes last
        storage.node_cache().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=storage.node_cache()) as tmp:
            summary = write_prepared(prep, Path(tmp), cfg.train.eval_max_users)
            storage.put_dir(tmp, out_dir, cfg.dist.storage_endpoint)
    return {**summary, "seconds": round(time.time() - start, 2), "peak_rss_mb": peak_rss_mb()}


# Under the storage root: item text embedding tables, one per catalogue and encoder, shared by
# every run and Tune trial over that catalogue.
TEXT_DIR = "text"


@ray.remote(scheduling_strategy="DEFAULT", max_calls=1)
def item_text_table(encoder: str, items_path: str, out_dir: str, endpoint: str | None = None) -> dict:
    """The frozen item text embeddings of the prepared catalogue, stored once in `out_dir` as
    text-{encoder}-{key}.npy (`karma.text.ensure_text_table`): computed here unless an earlier run
    or a concurrent trial has, then loaded by every worker. A task of its own so that it runs
    once per job, on a GPU when the job has them, and the driver never holds the items."""
    import pandas as pd

    from karma.text import ensure_text_table, item_texts

    from karma.costs import peak_rss_mb

    start = time.time()
    log = lambda m: print(f"[karma] {m}", flush=True)  # noqa: E731
    if not storage.is_uri(out_dir):
        items = pd.read_parquet(items_path, columns=["title", "category", "brand"])
        path, computed = ensure_text_table(item_texts(items), encoder, out_dir, log=log)
    else:
        path, computed = _object_store_text_table(encoder, items_path, out_dir, endpoint, log)
    return {"path": str(path), "computed": computed, "seconds": round(time.time() - start, 2),
            "peak_rss_mb": peak_rss_mb()}


def _object_store_text_table(encoder: str, items_uri: str, out_dir: str, endpoint: str | None, log) -> tuple[str, bool]:
    """The table in an object store: a folder <out_dir>/<table name>/ of its own, so it gets a
    _COMPLETE marker and reaches each node's cache like the data folder."""
    import pandas as pd

    from karma.text import ensure_text_table, item_texts, text_table_path

    data_uri, items_name = items_uri.rsplit("/", 1)
    items = pd.read_parquet(storage.local_dir(data_uri, endpoint) / items_name,
                            columns=["title", "category", "brand"])
    texts = item_texts(items)
    name = text_table_path(texts, encoder, ".").name
    folder = storage.join(out_dir, name.removesuffix(".npy"))
    if storage.marker(folder, endpoint) is not None:
        return storage.join(folder, name), False
    import tempfile

    build = storage.node_cache() / "text-build"  # its lock file stays here, out of the upload
    path, _ = ensure_text_table(texts, encoder, build, log=log)
    with tempfile.TemporaryDirectory(dir=build) as upload:
        shutil.copyfile(path, Path(upload) / name)
        storage.put_dir(upload, folder, endpoint)
    return storage.join(folder, name), True


def text_table(cfg: Config, run_root: Path | str, log=print) -> dict | None:
    """The stored item text table for this run's data (path, computed, seconds, peak_rss_mb;
    None when the model reads no text embeddings); the data task must have written
    run_root/data/items.parquet."""
    if cfg.data.text_encoder == "none" or cfg.model.arch == "sasrec":
        return None
    # MiniLM is small: a worker's share of a GPU is plenty, and within this job's own slot.
    gpus = min(1.0, cfg.dist.gpus_per_worker) if cfg.dist.use_gpu else 0
    if storage.is_uri(str(run_root)):
        items, out = storage.join(run_root, "data", "items.parquet"), storage.join(cfg.dist.storage_path, TEXT_DIR)
    else:
        items, out = str(run_root / "data" / "items.parquet"), str(run_root.parent.resolve() / TEXT_DIR)
    table = ray.get(item_text_table.options(num_gpus=gpus).remote(cfg.data.text_encoder, items, out,
                                                                  cfg.dist.storage_endpoint))
    log(f"item text embeddings {'computed into' if table['computed'] else 'found at'} {table['path']}")
    return table


def _wait_for_nodes(cfg: Config, need_cpu: float, need_gpu: float) -> dict:
    """Ask the autoscaler for the workers' and the data task's bundles and wait up to
    dist.scale_up_timeout_s for them; the cluster's resources at the end."""
    from ray.autoscaler.sdk import request_resources

    have = ray.cluster_resources()
    if cfg.dist.scale_up_timeout_s <= 0:
        return have
    worker = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": cfg.dist.gpus_per_worker} if cfg.dist.use_gpu else {})}
    request_resources(bundles=[worker] * cfg.dist.num_workers + [{"CPU": cfg.dist.data_cpus}])
    deadline = time.time() + cfg.dist.scale_up_timeout_s
    while (need_cpu > have.get("CPU", 0) or (cfg.dist.use_gpu and need_gpu > have.get("GPU", 0))) \
            and time.time() < deadline:
        time.sleep(min(5.0, max(0.1, deadline - time.time())))
        have = ray.cluster_resources()
    return have


def check_resources(cfg: Config) -> None:
    """Fail fast when the cluster cannot host the requested workers (after waiting up to
    dist.scale_up_timeout_s for an autoscaling cluster to add nodes)."""
    have = ray.cluster_resources()
    # CPUs stay free for the data task (a Tune trial prepares its data while others train).
    need_cpu = cfg.dist.num_workers * cfg.dist.cpus_per_worker + cfg.dist.data_cpus
    need_gpu = cfg.dist.num_workers * cfg.dist.gpus_per_worker
    if need_cpu > have.get("CPU", 0) or (cfg.dist.use_gpu and need_gpu > have.get("GPU", 0)):
        have = _wait_for_nodes(cfg, need_cpu, need_gpu)
    waited = f" (after waiting dist.scale_up_timeout_s={cfg.dist.scale_up_timeout_s} s for nodes)" \
        if cfg.dist.scale_up_timeout_s else ""
    if need_cpu > have.get("CPU", 0):
        raise ConfigError(
            f"dist.num_workers={cfg.dist.num_workers} x dist.cpus_per_worker={cfg.dist.cpus_per_worker} "
            f"plus dist.data_cpus={cfg.dist.data_cpus} for data loading needs {need_cpu} CPUs but the cluster "
            f"has {have.get('CPU', 0):g}{waited}; lower dist.num_workers or add nodes (on an autoscaling cluster "
            "raise dist.scale_up_timeout_s)")
    if cfg.dist.use_gpu and need_gpu > have.get("GPU", 0):
        raise ConfigError(
            f"dist.num_workers={cfg.dist.num_workers} x dist.gpus_per_worker={cfg.dist.gpus_per_worker:g} needs "
            f"{need_gpu:g} GPUs but the cluster has {have.get('GPU', 0):g}{waited}; lower dist.num_workers or "
            "dist.gpus_per_worker, or set dist.use_gpu=false")


def check_arch(cfg: Config) -> None:
    """Fail fast on DeepSpeed settings the SASRec baseline cannot run under: it has no backbone
    to checkpoint or compile, and reads its item table outside a module call, where ZeRO-3 would
    hand it an empty partition (a model this small needs no partitioning)."""
    if cfg.model.arch != "sasrec":
        return
    if cfg.dist.zero_stage == 3:
        raise ConfigError("model.arch=sasrec: dist.zero_stage=3 is not supported; use 0, 1 or 2")
    if cfg.dist.activation_checkpointing:
        raise ConfigError("model.arch=sasrec: dist.activation_checkpointing needs a language-model backbone; "
                          "set it to false")
    if cfg.dist.compile in ("decoder", "layers"):
        raise ConfigError(f"model.arch=sasrec: dist.compile={cfg.dist.compile} compiles a language-model "
                          "backbone; use auto, none or model")


def init_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # A local cluster: one logical CPU more than the cores, for the data pipeline beside the
    # workers (CPU counts are scheduling slots; the readers are light).
    env = {"OMP_NUM_THREADS": str(cfg.dist.omp_threads)} if not cfg.dist.use_gpu else {}
    # address="local": start our own, never attach to another Ray instance found on the host.
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, runtime_env={"env_vars": env} if env else None)


def _data_task_options(cfg: Config) -> dict:
    """The data task's reservation (dist.data_cpus, dist.data_memory_gb): the scheduler puts it
    on a node with that room; a head that advertises no CPUs never gets it."""
    opts = {"num_cpus": cfg.dist.data_cpus}
    if cfg.dist.data_memory_gb > 0:
        opts["memory"] = int(cfg.dist.data_memory_gb * 1024**3)
    return opts


def ray_storage(cfg: Config, root: Path | str) -> dict:
    """RunConfig's storage arguments: a local folder as a path; an object store as its
    pyarrow file system (with dist.storage_endpoint) and the path inside it."""
    if not storage.is_uri(str(root)):
        return {"storage_path": str(Path(root).resolve() / "ray")}
    fs, path = storage.filesystem(storage.join(str(root), "ray"), cfg.dist.storage_endpoint)
    return {"storage_path": path, "storage_filesystem": fs}


def fit(cfg: Config, run_root: Path | str, mlflow_run_id: str | None = None, tracking_uri: str | None = None,
        log=print, callbacks: list | None = None) -> tuple[ray.train.Result, dict]:
    """Run the Ray Train job; returns Ray's result and the data summary. `callbacks` go to
    the RunConfig (a Tune trial passes TuneReportCallback so every epoch reaches Tune).
    `run_root` is a local folder or, with an object store, its URI."""
    check_resources(cfg)
    remote = storage.is_uri(str(run_root))
    endpoint = cfg.dist.storage_endpoint
    data_dir = storage.join(run_root, "data") if remote else run_root / "data"
    note = storage.join(run_root, DIVERGED_NOTE) if remote else str(run_root / DIVERGED_NOTE)
    cfg_dict = cfg.to_dict()  # plain data for the data task and the workers
    storage.remove(note, endpoint)  # a note from an earlier attempt is not this one's
    try:
        summary = ray.get(prepare_data.options(**_data_task_options(cfg)).remote(cfg_dict, str(data_dir)))
    except RayTaskError as err:
        # Bad data or config: raise the task's own error (its message names the file or field
        # and the fix), as outside Ray, not Ray's wrapper with a remote traceback.
        if isinstance(err.cause, (DataError, ConfigError)):
            raise err.cause from None
        raise
    log(f"data prepared in {summary['seconds']:.1f}s ({summary['n_events']:,} events; peak RSS of the data task "
        f"{summary['peak_rss_mb']:,.0f} MB)")
    text = text_table(cfg, run_root, log)
    summary["text"] = text
    per_epoch, total = steps_plan(cfg.train, summary["n_train"], cfg.dist.num_workers)
    log(f"training {total} steps ({per_epoch}/epoch) on {cfg.dist.num_workers} workers, "
        f"ZeRO-{cfg.dist.zero_stage} {cfg.dist.precision}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg_dict, "data_dir": str(data_dir), "mlflow_run_id": mlflow_run_id,
                           "tracking_uri": tracking_uri, "text_table": text and text["path"], "diverged_note": note},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu, placement_strategy=cfg.dist.placement_strategy,
            resources_per_worker={"CPU": cfg.dist.cpus_per_worker,
                                  **({"GPU": cfg.dist.gpus_per_worker} if cfg.dist.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.tracking.run_name, **ray_storage(cfg, cfg.dist.storage_path if remote else run_root.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.dist.max_failures), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.dist.keep_checkpoints, checkpoint_score_attribute="NDCG@10",
                checkpoint_score_order="max")),
        torch_config=TorchConfig(backend="nccl" if cfg.dist.use_gpu else "gloo"),
    )
    return trainer.fit(), summary


def storage_root(cfg: Config) -> Path:
    """The local or mounted storage root (Tune sweeps and the tools that read a run's files)."""
    root = cfg.dist.storage_path
    if storage.is_uri(root):
        raise ConfigError(f"dist.storage_path: {root} is an object store; this step needs a local or mounted "
                          "shared folder (the training job itself takes s3:// URIs)")
    return Path(root).resolve()


def job_root(cfg: Config) -> Path | str:
    """The training job's storage root: a resolved local folder, or the object-store URI."""
    root = cfg.dist.storage_path
    return root.rstrip("/") if storage.is_uri(root) else storage_root(cfg)


SQLITE_FIX = ("run an MLflow server every node can reach (e.g. `mlflow server --backend-store-uri "
              "sqlite:///mlflow.db --artifacts-destination s3://bucket/mlflow --host 0.0.0.0`, see README "
              "\"Clusters\") and set tracking.tracking_uri or MLFLOW_TRACKING_URI to its http:// address")


def check_tracking(cfg: Config, uri: str | None) -> None:
    """Refuse a local MLflow store (sqlite) when workers may run on another node: rank 0 logs
    from wherever it runs, into a file only the driver's disk holds."""
    remote = storage.is_uri(cfg.dist.storage_path)
    if uri is None and remote:
        raise ConfigError(f"tracking.tracking_uri: unset, and dist.storage_path={cfg.dist.storage_path} is an "
                          f"object store, which cannot hold MLflow's sqlite file; {SQLITE_FIX}")
    if uri is None or not uri.startswith("sqlite:"):
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1
    if remote or nodes > 1:
        why = f"dist.storage_path is {cfg.dist.storage_path}" if remote else f"the Ray cluster has {nodes} nodes"
        raise ConfigError(f"tracking.tracking_uri: {uri} is a file on this machine, but {why}, so training "
                          f"workers may run on another node and log where the driver never looks; {SQLITE_FIX}")


def final_checkpoint_dir(root: Path, run_name: str) -> Path:
    """Where a finished job's last checkpoint lies (holds export/ and report/), under the storage root."""
    return root / run_name / "final"


def materialize(checkpoint, target: Path) -> Path:
    """The checkpoint's files at `target`: hard links where Ray persisted it on this machine's disk
    (a DeepSpeed checkpoint with optimizer states is GBs; a copy would double it), else a download."""
    import pyarrow.fs

    src = Path(checkpoint.path)
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and src.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        try:
            shutil.copytree(src, target, copy_function=os.link)
            return target
        except OSError:  # another file system: fall through to a copy
            shutil.rmtree(target, ignore_errors=True)
    return Path(checkpoint.to_directory(str(target)))


def _grows(key: str, old: str | None, new: str | None) -> bool:
    try:
        a, b = int(old), int(new)
    except (TypeError, ValueError):
        return False
    if key == "train.max_steps":  # 0: no cap
        a, b = a if a > 0 else math.inf, b if b > 0 else math.inf
    return b >= a


def resume_conflicts(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Keys of two flattened configs whose values differ, except `GROWABLE` ones that grow."""
    return [k for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not (k in GROWABLE and _grows(k, old.get(k), new.get(k)))]


def _refuse_changed(cfg: Config, keys: list[str], old: Mapping[str, str], new: Mapping[str, str], where: str):
    def show(v: str | None) -> str:
        return "(absent)" if v is None else repr(v if len(v) <= 60 else v[:57] + "...")

    changes = "; ".join(f"{k}: {show(old.get(k))} -> {show(new.get(k))}" for k in keys)
    return ConfigError(
        f"tracking.run_name={cfg.tracking.run_name!r} already has checkpoints ({where}) trained with another "
        f"config; changed: {keys} ({changes}). Rerunning under the same name resumes those weights and that "
        f"MLflow run, so only {' and '.join(GROWABLE)} may grow on resume. Choose a new tracking.run_name "
        "for the new settings, or rerun with the recorded values.")


def check_resume(cfg: Config, root: Path | str, uri: str, parent_run_id: str | None = None, log=print) -> bool:
    """Before a job touches Ray or MLflow: refuse a rerun under an existing tracking.run_name
    whose config changed (other than `GROWABLE` growing) while that run has Ray checkpoints to
    resume, since the old weights would continue (and be registered) under the new settings.
    Returns whether the MLflow run of that name may be resumed: not when its params differ but
    nothing is resumed (the earlier attempt left no checkpoint, e.g. it failed on its data);
    that attempt keeps its run and this one gets a fresh one."""
    from karma.tracking import find_run, flatten, mlflow_key

    name = cfg.tracking.run_name
    new = flatten(cfg.to_dict())
    endpoint = cfg.dist.storage_endpoint
    ray_dir = storage.join(str(root), "ray", name)
    has_checkpoints = any(n.startswith("checkpoint_") for n in storage.list_names(ray_dir, endpoint))
    recorded = storage.join(str(root), name, JOB_CONFIG)
    if has_checkpoints and storage.exists(recorded, endpoint):
        old = flatten(json.loads(storage.read_bytes(recorded, endpoint)))
        if keys := resume_conflicts(old, new):
            raise _refuse_changed(cfg, keys, old, new, str(ray_dir))
    run = find_run(cfg.tracking.experiment, name, uri, parent_run_id)
    if run is None or not run.data.params:
        return True
    logged = {mlflow_key(k): v for k, v in new.items()}
    keys = resume_conflicts(dict(run.data.params), logged)
    if not keys:
        return True
    if has_checkpoints:
        raise _refuse_changed(cfg, keys, run.data.params, logged, f"{ray_dir}; MLflow run {run.info.run_id}")
    log(f"MLflow run {run.info.run_id} named {name!r} was logged with another config ({keys} changed) and left "
        "no checkpoint to resume: this job gets a new MLflow run of the same name")
    return False


def run_training(cfg: Config, log=print, parent_run_id: str | None = None,
                 callbacks: list | None = None) -> TrainResult:
    """The whole training job: Ray Train fit, MLflow run, export registration. A rerun under an
    existing tracking.run_name resumes that run; with a changed config it is refused
    (`check_resume`)."""
    from karma.registry import metric_tags, register_export
    from karma.tracking import RunTracker, resolve_tracking_uri

    check_arch(cfg)  # before Ray and MLflow: a refused config leaves no run behind
    root = job_root(cfg)
    remote = storage.is_uri(str(root))
    endpoint = cfg.dist.storage_endpoint
    run_root = storage.join(root, cfg.tracking.run_name) if remote else root / cfg.tracking.run_name
    if remote:  # no sqlite default inside an object store
        check_tracking(cfg, cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip() or None)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, root)
    if os.environ.get("RAY_ADDRESS"):
        init_ray(cfg)  # a running cluster: its node count decides whether a local MLflow store works
    check_tracking(cfg, uri)  # before MLflow is touched
    resume = check_resume(cfg, root, uri, parent_run_id, log)
    init_ray(cfg)
    with RunTracker(cfg.tracking.experiment, cfg.tracking.run_name, uri, parent_run_id=parent_run_id,
                    tags={"karma.config_digest": cfg.digest()}, resume=resume) as tracker:
        # check_resume let through only epochs / max_steps growing: those are recorded as tags
        cfg_dict = cfg.to_dict()
        tracker.log_params(cfg_dict, on_conflict="tag")
        tracker.log_dict(cfg_dict, "config.json")
        if remote:
            storage.write_bytes(storage.join(run_root, JOB_CONFIG), json.dumps(cfg_dict, indent=2).encode(), endpoint)
        else:
            run_root.mkdir(parents=True, exist_ok=True)
            (run_root / JOB_CONFIG).write_text(json.dumps(cfg_dict, indent=2))
        result, summary = fit(cfg, run_root, tracker.run_id, uri, log, callbacks)
        tracker.log_metrics(_data_costs(summary), step=0)
        if result.error:
            raise result.error
        diverged = storage.join(run_root, DIVERGED_NOTE) if remote else str(run_root / DIVERGED_NOTE)
        if storage.exists(diverged, endpoint):  # the loop stopped on a NaN/inf loss; its last good checkpoint stays
            message = storage.read_bytes(diverged, endpoint).decode()
            storage.remove(diverged, endpoint)
            raise NonFiniteLoss(message)
        metrics = dict(result.metrics or {})
        ckpt_dir = export_dir = version = None
        if result.checkpoint is not None:
            # an object store's final checkpoint is read through this node's disk (the export
            # and report inside it stay in the store with the checkpoint)
            local = storage.node_cache() / "final" / cfg.tracking.run_name if remote else None
            if local is not None:
                shutil.rmtree(local, ignore_errors=True)
            ckpt_dir = materialize(result.checkpoint, local or final_checkpoint_dir(root, cfg.tracking.run_name))
            if (ckpt_dir / "report").is_dir():
                (ckpt_dir / "report" / "provenance.json").write_text(json.dumps(provenance(cfg), indent=2))
                for f in sorted((ckpt_dir / "report").iterdir()):
                    tracker.log_artifact(f, "report")
            if cfg.model.arch == "sasrec":
                log("model.arch=sasrec: no inference export and no registration (the export format "
                    "holds KARMA models); the report and test metrics are in the run")
            if (ckpt_dir / "export").is_dir():
                export_dir = ckpt_dir / "export"
                if cfg.tracking.register:
                    name = cfg.tracking.registered_model or cfg.tracking.experiment
                    tags = metric_tags({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                    version = register_export(tracker, export_dir, name, cfg.tracking.alias, tags=tags)
                    log(f"registered {name} version {version} (alias {cfg.tracking.alias})")
        return TrainResult(metrics, ckpt_dir, export_dir, tracker.run_id, version, int(metrics.get("step", 0)),
                           summary)


def _data_costs(summary: dict) -> dict[str, float]:
    """The data and text tasks' costs as MLflow metrics (cost/...), beside the workers' own."""
    out = {"cost/data_seconds": summary["seconds"], "cost/data_peak_rss_mb": summary["peak_rss_mb"],
           **{f"cost/data_{k}_seconds": v for k, v in summary["stages"].items()}}
    if summary.get("text"):
        out.update({"cost/text_seconds": summary["text"]["seconds"],
                    "cost/text_peak_rss_mb": summary["text"]["peak_rss_mb"]})
    return out
