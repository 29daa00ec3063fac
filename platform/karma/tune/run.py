"""Running a sweep: one trial = one full training run through `run_training`, nested as an
MLflow child run under the sweep's parent run; the manifest that makes a sweep resumable; trial
summaries from Tune's saved state; the best trial and its champion promotion."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from karma.config import Config, ConfigError, from_dict

from .space import ARM, Space, expected_trials, param_space, search_algorithm, trial_values

MANIFEST = "karma_sweep.json"
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes the trial's own process reserves (see run_sweep)


def trial_run_name(space_name: str, trial_id: str) -> str:
    return f"{space_name}-{trial_id}"


def concurrency(cfg: Config, requested: int | None, cluster: dict[str, float]) -> tuple[int, str | None]:
    """How many trials fit side by side: each holds num_workers x cpus_per_worker CPUs (and
    GPUs), and one CPU stays free for the data tasks all trials share. Returns (n, note)."""
    per_trial = cfg.dist.num_workers * cfg.dist.cpus_per_worker
    cpus = int(cluster.get("CPU", 0))
    fit = (cpus - 1) // per_trial
    why = f"{cfg.dist.num_workers} worker(s) x {cfg.dist.cpus_per_worker} CPU per trial + 1 CPU for data on {cpus} CPUs"
    if cfg.dist.use_gpu:
        gpus = float(cluster.get("GPU", 0))
        per_gpu = cfg.dist.num_workers * cfg.dist.gpus_per_worker
        if int(gpus / per_gpu + 1e-9) < fit:
            fit = int(gpus / per_gpu + 1e-9)
            why = (f"{cfg.dist.num_workers} GPU worker(s) x {cfg.dist.gpus_per_worker:g} GPU per trial "
                   f"on {gpus:g} GPUs")
    if fit < 1:
        raise ConfigError(f"one trial needs {why}, more than the cluster has; lower dist.num_workers "
                          "or dist.cpus_per_worker, or add nodes")
    if requested is None:
        return fit, None
    if requested > fit:
        return fit, f"max_concurrent_trials={requested} clipped to {fit}: {why}"
    return requested, None


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_trial(params: dict[str, Any], *, base: dict[str, Any], space: dict[str, Any],
              parent_run_id: str) -> None:
    """One Tune trial: a full `run_training` with the sampled values, nested under the sweep's
    MLflow run; the last report adds the registered model version for champion selection.
    `base` is the sweep's config as a dict (Tune ships plain data to the trial), built into the
    trial's Config once, with the sampled values set."""
    from ray import tune

    from karma.tracking import RunTracker
    from karma.train.ray_job import run_training

    sp = Space(**space)
    trial_id = tune.get_context().get_trial_id()
    values = trial_values(params, sp)
    values["tracking.run_name"] = trial_run_name(sp.name, trial_id)
    try:
        cfg = from_dict(base, dotted=values)  # the trial's one dict -> Config
    except ConfigError as err:
        raise ConfigError(f"trial {trial_id} with {params}: {err}") from err
    # Open the trial's run first so its sweep tags are there even if the scheduler stops it;
    # run_training finds the same run again by name and parent.
    tags = {"karma.sweep": sp.name, "karma.trial_id": trial_id}
    if ARM in params:
        tags["karma.arm"] = str(params[ARM])
    RunTracker(cfg.tracking.experiment, cfg.tracking.run_name, cfg.tracking.tracking_uri,
               tags=tags, parent_run_id=parent_run_id)
    from ray.tune.integration.ray_train import TuneReportCallback

    # TuneReportCallback forwards every epoch's ray.train.report to Tune, so ASHA can prune.
    result = run_training(cfg, log=lambda m: print(f"[karma {trial_id}] {m}", flush=True),
                          parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])
    tune.report({**_numeric(result.metrics), "model_version": result.model_version or "",
                 "mlflow_run_id": result.run_id, "trial_complete": 1})


def _trial_dirname(trial) -> str:
    return trial.trial_id


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # TERMINATED, ERROR, or PENDING / RUNNING / PAUSED when interrupted
    params: dict[str, Any]
    metrics: dict[str, Any]
    complete: bool  # ran to its last epoch (not stopped early by the scheduler)
    model_version: str | None
    run_id: str | None
    error: str | None


@dataclass
class SweepResult:
    name: str
    path: Path
    parent_run_id: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    promotion: dict[str, Any] | None
    interrupted: bool
    note: str | None = None

    @property
    def errored(self) -> list[TrialSummary]:
        return [t for t in self.trials if t.status == "ERROR"]


def experiment_path(cfg: Config, name: str) -> Path:
    from karma.train.ray_job import storage_root

    return storage_root(cfg) / "tune" / name


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def read_manifest(path: Path) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise ConfigError(f"{path} holds no sweep ({MANIFEST} is missing); start it with jobs/tune.py")
    return json.loads(f.read_text())


def summarize(path: Path) -> list[TrialSummary]:
    """Every trial of the sweep at `path`, from Tune's saved experiment state."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(path))
    out = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        last = dict(trial.last_result or {})
        error = None
        if trial.status == "ERROR":
            err = trial.get_pickled_error() or trial.get_error()
            error = str(err).strip().splitlines()[-1] if err else "unknown error"
        params = {k: v for k, v in (trial.config or {}).items()}
        complete = bool(last.get("trial_complete"))
        out.append(TrialSummary(trial.trial_id, trial.status, params, last, complete,
                                last.get("model_version") or None, last.get("mlflow_run_id"), error))
    return out


def pick_best(trials: list[TrialSummary], metric: str, mode: str) -> TrialSummary | None:
    ok = [t for t in trials if t.complete and t.model_version and _numeric(t.metrics).get(metric) is not None
          and math.isfinite(t.metrics[metric])]
    if not ok:
        return None
    sign = 1 if mode == "max" else -1
    return max(ok, key=lambda t: sign * t.metrics[metric])


def _end_stopped_children(client, parent_run_id: str, trials: list[TrialSummary], space: Space) -> None:
    """Trials the scheduler stopped early never close their MLflow run: mark them KILLED."""
    stopped = {trial_run_name(space.name, t.trial_id) for t in trials
               if t.status == "TERMINATED" and not t.complete}
    if not stopped:
        return
    exp = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000):
        if run.info.run_name in stopped and run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "karma.stopped_early", "true")
            client.set_terminated(run.info.run_id, "KILLED")


def run_sweep(space: Space, cfg: Config, resume: bool = False, log: Callable[[str], None] = print,
              callbacks: list[Any] | None = None) -> SweepResult:
    """Run (or resume) the sweep; `cfg` comes from `sweep_config`.

    `callbacks` go to Tune's RunConfig; Tune saves them with the experiment, so they are active
    again in a resumed run. Returns the trials, the best one and the champion decision; when
    the run was interrupted (Ctrl+C) `interrupted` is set and nothing is promoted."""
    import ray
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from karma.registry import promote_if_better
    from karma.tracking import RunTracker
    from karma.train.ray_job import init_ray

    init_ray(cfg)
    path = experiment_path(cfg, space.name)
    cfg_dict = cfg.to_dict()  # once: manifest, MLflow artifact, every trial's base
    uri = cfg.tracking.tracking_uri
    n_concurrent, note = concurrency(cfg, space.max_concurrent_trials, ray.cluster_resources())
    if note:
        log(note)
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"sweep {space.name!r} has no saved state at {path}; run it without --resume first")
        manifest = read_manifest(path)
        diff = _config_diff(manifest["config"], cfg_dict)
        if diff or manifest["space_digest"] != space.digest():
            what = f"config keys {diff}" if diff else "the space file"
            raise ConfigError(f"resuming sweep {space.name!r} with a different setup ({what} changed); pass the "
                              "same --config, overrides and space as the first run, or start a new sweep with --name")
    elif tune.Tuner.can_restore(str(path)):  # a manifest alone (died before Tune saved) is reused
        raise ConfigError(f"sweep {space.name!r} already exists at {path}; pass --resume to continue it, or "
                          "choose another name (--name) or dist.storage_path")

    tracker = RunTracker(cfg.tracking.experiment, space.name, uri,
                         tags={"karma.kind": "sweep", "karma.sweep": space.name, "karma.metric": space.metric,
                               "karma.mode": space.mode})
    try:
        if not resume:
            path.mkdir(parents=True, exist_ok=True)
            (path / MANIFEST).write_text(json.dumps(
                {"space": space.to_dict(), "space_digest": space.digest(), "config": cfg_dict,
                 "parent_run_id": tracker.run_id, "tracking_uri": uri}, indent=2))
            tracker.log_dict(space.to_dict(), "space.json")
            tracker.log_dict(cfg_dict, "config.json")
            tracker.log_params({"sweep.metric": space.metric, "sweep.mode": space.mode,
                                "sweep.num_samples": space.num_samples,
                                "sweep.max_concurrent_trials": n_concurrent,
                                "sweep.sample_seed": cfg.train.seed})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg_dict, space=space.to_dict(), parent_run_id=tracker.run_id),
            # No CPU: the trial only waits on its TorchTrainer, whose workers hold the CPUs. Ray
            # refuses an all-zero request, so the trial reserves the memory it does use instead.
            {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
        if resume:
            log(f"resuming sweep {space.name} from {path}")
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            scheduler = None
            if space.scheduler:
                s = space.scheduler
                scheduler = ASHAScheduler(time_attr="epoch", grace_period=s["grace_period"],
                                          reduction_factor=s["reduction_factor"],
                                          max_t=s["max_t"] or max(cfg.train.epochs, 1),
                                          # A trial that reaches max_t ends by itself: stopping it
                                          # there would lose its export and registration.
                                          stop_last_trials=False)
            tuner = tune.Tuner(
                trainable, param_space=param_space(space),
                tune_config=tune.TuneConfig(
                    metric=space.metric, mode=space.mode, num_samples=space.num_samples, scheduler=scheduler,
                    # Sampling seeded by the config's train.seed: the same sweep draws the same
                    # trials. The search algorithm holds the concurrency bound itself.
                    search_alg=search_algorithm(cfg.train.seed, n_concurrent),
                    time_budget_s=space.time_budget_s, trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=space.name, storage_path=str(path.parent),
                    # A crashing trial is recorded as failed; the sweep goes on with the rest.
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    callbacks=callbacks, verbose=1))
        started = time.monotonic()
        tuner.fit()
        trials = summarize(path)
        # Tune creates trials lazily (max_concurrent_trials): after an interruption some are
        # unfinished and some not even created yet. A spent time budget is a normal end.
        budget_spent = space.time_budget_s is not None and time.monotonic() - started >= space.time_budget_s
        interrupted = (any(t.status not in ("TERMINATED", "ERROR") for t in trials)
                       or (len(trials) < expected_trials(space) and not budget_spent))
        client = MlflowClient(uri)
        _end_stopped_children(client, tracker.run_id, trials, space)
        tracker.log_dict({"trials": [asdict(t) for t in trials]}, "trials.json")
        errored = [t for t in trials if t.status == "ERROR"]
        tracker.set_tags({"karma.trials": len(trials), "karma.trials_errored": len(errored),
                          "karma.trials_errored_ids": ",".join(t.trial_id for t in errored) or "-"})
        best = promotion = None
        if interrupted:
            log(f"sweep {space.name} interrupted; resume it with --resume")
            tracker.end("KILLED")
        else:
            best = pick_best(trials, space.metric, space.mode)
            if best is not None:
                name = cfg.tracking.registered_model or cfg.tracking.experiment
                promotion = promote_if_better(name, space.champion_alias, best.model_version, space.metric,
                                              best.metrics[space.metric], space.mode, uri)
                promotion.update(registered_model=name, trial_id=best.trial_id, run_id=best.run_id)
                tracker.log_dict(promotion, "champion.json")
                tracker.set_tags({"karma.best_trial": best.trial_id, "karma.best_version": best.model_version,
                                  "karma.champion_promoted": promotion["promoted"],
                                  "karma.champion_reason": promotion["reason"]})
                tracker.log_metrics({f"best/{space.metric}": best.metrics[space.metric]}, step=0)
                log(f"best trial {best.trial_id}: {space.metric}={best.metrics[space.metric]:.4f} "
                    f"(version {best.model_version}); {space.champion_alias}: {promotion['reason']}")
            manifest = read_manifest(path)
            (path / MANIFEST).write_text(json.dumps({**manifest, "finished": True}, indent=2))
            tracker.end("FINISHED")
        return SweepResult(space.name, path, tracker.run_id, trials, best, promotion, interrupted, note)
    except BaseException as err:
        tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
