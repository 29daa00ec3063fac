"""Ray Tune sweeps over the training job: search spaces as data, one trial = one full training
run through `run_training`, MLflow parent/child runs, champion promotion, ablation reports.

Layout of a sweep named NAME under `dist.storage_path` (ROOT):

    ROOT/tune/NAME/            Tune's experiment (resumable with Tuner.restore)
    ROOT/tune/NAME/karma_sweep.json   the space, the resolved config and the parent run id
    ROOT/NAME-<trial_id>/      each trial's data and final checkpoint (run_training's run_root)
    ROOT/ray/NAME-<trial_id>/  each trial's Ray Train run (resumes by name)

Trial names carry no timestamps: a resumed sweep finds each unfinished trial's Train
checkpoints and MLflow run again by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
import yaml

from karma.config import Config, ConfigError, from_dict, load_config

MANIFEST = "karma_sweep.json"
ARM = "arm"  # the pseudo-param an ablation grids over
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "grid")
SPACE_KEYS = ("name", "metric", "mode", "params", "arms", "seeds", "num_samples", "scheduler",
              "max_concurrent_trials", "overrides", "budget", "champion_alias")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "max_t")
# Metrics every epoch report carries besides HR@K / NDCG@K (see karma.train.worker).
KNOWN_METRICS = ("MRR", "tail/MRR", "sink_rate_first", "sink_rate_item", "top1_share", "entropy", "barcode",
                 "effective_rank", "mean_cosine", "token_f1", "category_match")
# Fixed per trial by the sweep (naming, resources): a space may not vary them.
RESERVED_PARAMS = ("tracking.", "dist.num_workers", "dist.cpus_per_worker", "dist.gpus_per_worker", "dist.use_gpu",
                   "dist.storage_path")
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes the trial's own process reserves (see run_sweep)
_RANK_METRIC = re.compile(r"^(tail/)?(HR|NDCG)@(\d+)$")  # tail/: the long-tail breakdown
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SpaceError(ConfigError):
    """A search-space file that cannot be used."""


# ---------------------------------------------------------------- space files


@dataclass
class Space:
    name: str
    metric: str
    mode: Literal["max", "min"]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    num_samples: int = 1
    scheduler: dict[str, Any] | None = None
    max_concurrent_trials: int | None = None
    overrides: list[str] = field(default_factory=list)
    time_budget_s: float | None = None
    champion_alias: str = "champion"
    source: str = "<space>"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        d = {k: v for k, v in self.to_dict().items() if k != "source"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _fail(source: str, where: str, msg: str) -> SpaceError:
    return SpaceError(f"{source}: {where}: {msg}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_param(source: str, key: str, spec: Any) -> dict[str, Any]:
    where = f"params.{key}"
    if not isinstance(spec, dict):
        raise _fail(source, where, f"expected a mapping like {{choice: [1, 2]}}, got {spec!r}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = sorted(set(spec) - set(DISTRIBUTIONS) - {"zero_prob"})
    if extra:
        raise _fail(source, where, f"unknown key(s) {extra}; use one of {list(DISTRIBUTIONS)} (+ zero_prob "
                                   "with loguniform)")
    if len(kinds) != 1:
        raise _fail(source, where, f"give exactly one distribution out of {list(DISTRIBUTIONS)}, got {kinds}")
    kind, value = kinds[0], spec[kinds[0]]
    if "zero_prob" in spec:
        p = spec["zero_prob"]
        if kind != "loguniform":
            raise _fail(source, where, "zero_prob only goes with loguniform (a log scale cannot reach 0); "
                                       "for choice/grid list 0 as a value")
        if not _number(p) or not 0 <= p < 1:
            raise _fail(source, where, f"zero_prob must be a number in [0, 1), got {p!r}")
    if kind in ("choice", "grid"):
        if not isinstance(value, list) or not value:
            raise _fail(source, where, f"{kind} needs a non-empty list of values, got {value!r}")
        return dict(spec)
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)):
        raise _fail(source, where, f"{kind} needs [low, high] as two numbers, got {value!r}")
    lo, hi = value
    if lo > hi:
        raise _fail(source, where, f"{kind} low {lo} > high {hi}; swap them")
    if kind == "loguniform" and lo <= 0:
        raise _fail(source, where, f"loguniform low must be > 0, got {lo}; to include 0 add zero_prob: 0.2")
    return dict(spec)


def _check_scheduler(source: str, raw: Any) -> dict[str, Any] | None:
    if raw is None or raw == "none" or raw == {"type": "none"}:
        return None
    if not isinstance(raw, dict):
        raise _fail(source, "scheduler", f"expected none or {{type: asha, ...}}, got {raw!r}")
    extra = sorted(set(raw) - set(SCHEDULER_KEYS))
    if extra:
        raise _fail(source, "scheduler", f"unknown key(s) {extra}; valid keys: {list(SCHEDULER_KEYS)}")
    if raw.get("type") != "asha":
        raise _fail(source, "scheduler.type", f"{raw.get('type')!r} is not supported; use asha (or scheduler: none)")
    out = {"type": "asha", "grace_period": raw.get("grace_period", 1),
           "reduction_factor": raw.get("reduction_factor", 2), "max_t": raw.get("max_t")}
    for key in ("grace_period", "max_t"):
        v = out[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _fail(source, f"scheduler.{key}", f"must be an integer number of epochs >= 1, got {v!r}")
    rf = out["reduction_factor"]
    if not _number(rf) or rf <= 1:
        raise _fail(source, "scheduler.reduction_factor", f"must be a number > 1, got {rf!r}")
    if out["max_t"] is not None and out["grace_period"] > out["max_t"]:
        raise _fail(source, "scheduler.grace_period", f"{out['grace_period']} exceeds max_t={out['max_t']}")
    return out


def parse_space(raw: Any, source: str = "<space>") -> Space:
    """Check a space mapping's shape and values; `check_space` then checks it against a Config."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: expected a mapping with name, metric, mode, params, ...")
    unknown = sorted(set(raw) - set(SPACE_KEYS))
    if unknown:
        raise SpaceError(f"{source}: unknown key(s) {unknown}; valid keys: {list(SPACE_KEYS)}")
    for key in ("name", "metric"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _fail(source, key, "required (a non-empty string)")
    if not _NAME.match(raw["name"]):
        raise _fail(source, "name", f"{raw['name']!r}: use letters, digits, '.', '_' or '-' (it names folders and runs)")
    if raw.get("mode") not in ("max", "min"):
        raise _fail(source, "mode", f"{raw.get('mode')!r}: use max or min")

    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict):
        raise _fail(source, "params", "expected a mapping of dotted.config.key: {distribution}")
    params = {}
    for key, spec in params_raw.items():
        if not isinstance(key, str) or key.count(".") < 1:
            raise _fail(source, f"params.{key}", "keys are dotted config paths like loss.w_gen")
        if key == ARM or key.startswith(RESERVED_PARAMS):
            raise _fail(source, f"params.{key}", "is fixed by the sweep (trial naming and resources); set it "
                                                 "in the config or the overrides instead")
        params[key] = _check_param(source, key, spec)

    arms_raw = raw.get("arms") or {}
    if not isinstance(arms_raw, dict):
        raise _fail(source, "arms", "expected a mapping of arm name: {dotted.config.key: value}")
    arms: dict[str, dict[str, Any]] = {}
    for arm, values in arms_raw.items():
        if not isinstance(values, dict) or not all(isinstance(k, str) and "." in k for k in values):
            raise _fail(source, f"arms.{arm}", f"expected a mapping of dotted config keys to values, got {values!r}")
        clash = sorted(set(values) & set(params))
        if clash:
            raise _fail(source, f"arms.{arm}", f"{clash} are also swept in params; set each key in one place")
        reserved = [k for k in values if k.startswith(RESERVED_PARAMS)]
        if reserved:
            raise _fail(source, f"arms.{arm}", f"{reserved} are fixed by the sweep; set them in the config")
        arms[str(arm)] = dict(values)

    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(source, "seeds", f"expected a list of integers like [0, 1, 2], got {seeds!r}")
    if seeds and ("train.seed" in params or any("train.seed" in a for a in arms.values())):
        raise _fail(source, "seeds", "train.seed is also set in params/arms; use one of them")
    if not (params or arms or seeds):
        raise SpaceError(f"{source}: nothing to sweep; give params, arms or seeds")

    num_samples = raw.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise _fail(source, "num_samples", f"must be an integer >= 1, got {num_samples!r}")
    mct = raw.get("max_concurrent_trials")
    if mct is not None and (isinstance(mct, bool) or not isinstance(mct, int) or mct < 1):
        raise _fail(source, "max_concurrent_trials", f"must be an integer >= 1, got {mct!r}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise _fail(source, "overrides", f"expected a list of 'section.key=value' strings, got {overrides!r}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict) or sorted(set(budget) - {"time_budget_s"}):
        raise _fail(source, "budget", f"expected {{time_budget_s: seconds}}, got {budget!r}")
    tb = budget.get("time_budget_s")
    if tb is not None and (not _number(tb) or tb <= 0):
        raise _fail(source, "budget.time_budget_s", f"must be a number of seconds > 0, got {tb!r}")
    alias = raw.get("champion_alias", "champion")
    if not isinstance(alias, str) or not alias or alias.lower() == "latest":
        raise _fail(source, "champion_alias", f"{alias!r}: give an alias name other than 'latest'")
    return Space(name=raw["name"], metric=raw["metric"], mode=raw["mode"], params=params, arms=arms,
                 seeds=list(seeds), num_samples=num_samples, scheduler=_check_scheduler(source, raw.get("scheduler")),
                 max_concurrent_trials=mct, overrides=list(overrides),
                 time_budget_s=float(tb) if tb is not None else None, champion_alias=alias, source=source)


def parse_seeds(text: str) -> list[int]:
    """A command line's "1,2" -> [1, 2] (the seeds of one part of a grid)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise SpaceError(f"--seeds: expected comma-separated integers like 1,2, got {text!r}")
    return seeds


def load_space(path: str | Path, name: str | None = None, seeds: list[int] | None = None) -> Space:
    """Read and check a space file; `name` replaces the file's sweep name (a second sweep) and
    `seeds` its seeds (one part of a grid as its own sweep, e.g. when GPU time comes in slots)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file {path} does not exist; see tune_spaces/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"space file {path} is not valid YAML: {err}") from err
    if name is not None and isinstance(raw, dict):
        raw = {**raw, "name": name}
    if seeds is not None and isinstance(raw, dict):
        raw = {**raw, "seeds": list(seeds)}
    return parse_space(raw, str(path))


def _sample(spec: dict[str, Any]) -> Any:
    """One representative value of a distribution: checks the key path and type, not every value
    (a grid value that breaks a cross-field rule fails its own trial, not the sweep)."""
    for kind in ("choice", "grid"):
        if kind in spec:
            return spec[kind][0]
    kind = "uniform" if "uniform" in spec else "loguniform"
    return float(spec[kind][0])


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a config section")
    node[parts[-1]] = value


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> Config:
    """`base` (a Config dict) with dotted-key values set, validated as a whole."""
    d = json.loads(json.dumps(base))
    for key, value in values.items():
        set_dotted(d, key, value)
    return from_dict(d)


def check_metric(space: Space, cfg: Config) -> None:
    m = _RANK_METRIC.match(space.metric)
    if m:
        if int(m.group(3)) not in cfg.train.ks:
            raise _fail(space.source, "metric", f"{space.metric} needs K={m.group(3)} in train.ks "
                                                f"(now {cfg.train.ks}); add it or pick another K")
    elif space.metric not in KNOWN_METRICS:
        raise _fail(space.source, "metric", f"{space.metric!r} is not reported by training; use HR@K, NDCG@K "
                                            f"(K in train.ks), tail/HR@K, tail/NDCG@K or one of "
                                            f"{list(KNOWN_METRICS)}")


def check_space(space: Space, cfg: Config) -> None:
    """Apply a sample of every param (and every arm) to the sweep's config: a misspelt key or a
    value of the wrong type fails here, before any trial starts."""
    check_metric(space, cfg)
    base = cfg.to_dict()
    sample = {k: _sample(v) for k, v in space.params.items()}
    if space.seeds:
        sample["train.seed"] = space.seeds[0]
    for arm, values in (space.arms or {"": {}}).items():
        for key, value in {**values, **sample}.items():
            where = f"arms.{arm}.{key}" if key in values else f"params.{key}"
            try:
                apply_values(base, {key: value})
            except ConfigError as err:
                raise _fail(space.source, where, str(err)) from err
        try:
            apply_values(base, {**values, **sample})
        except ConfigError as err:
            raise _fail(space.source, f"arms.{arm}" if arm else "params", f"the combination fails: {err}") from err


# ---------------------------------------------------------------- configs


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def sweep_config(config_path: str | Path | None, overrides: list[str], space: Space) -> Config:
    """The config every trial starts from: file, then the space's overrides, then the command
    line's (the user's last word), with paths made absolute (trials run in other folders) and
    the tracking URI fixed (trials must log into the parent run's store)."""
    from karma.tracking import resolve_tracking_uri

    try:
        cfg = load_config(config_path, [*space.overrides, *overrides])
    except ConfigError as err:
        if not space.overrides:
            raise
        raise ConfigError(f"{err} (the space's overrides: {space.overrides})") from err
    d = cfg.to_dict()
    d["dist"]["storage_path"] = _absolute(d["dist"]["storage_path"])
    d["data"]["cache_dir"] = _absolute(d["data"]["cache_dir"])
    d["data"]["path"] = _absolute(d["data"]["path"])
    d["tracking"]["tracking_uri"] = resolve_tracking_uri(d["tracking"]["tracking_uri"], d["dist"]["storage_path"])
    cfg = from_dict(d)
    check_space(space, cfg)
    return cfg


def trial_values(params: dict[str, Any], space: Space) -> dict[str, Any]:
    """Tune's sampled config -> dotted config values (an arm expands to its settings)."""
    values = {k: v for k, v in params.items() if k != ARM}
    if ARM in params:
        if params[ARM] not in space.arms:
            raise ConfigError(f"arm {params[ARM]!r} is not in the space's arms {list(space.arms)}")
        values = {**space.arms[params[ARM]], **values}
    return values


def expected_trials(space: Space) -> int:
    """How many trials Tune's generator makes: num_samples x every grid (params, arms, seeds)."""
    n = space.num_samples * max(len(space.arms), 1) * max(len(space.seeds), 1)
    for spec in space.params.values():
        n *= len(spec.get("grid", [None]))
    return n


def trial_run_name(space_name: str, trial_id: str) -> str:
    return f"{space_name}-{trial_id}"


# ---------------------------------------------------------------- the Tune side


class ZeroOrLogUniform:
    """Exactly 0 with probability `zero_prob`, else log-uniform in [low, high]: the "off"
    setting of a loss weight is a point a log scale never reaches."""

    def __init__(self, low: float, high: float, zero_prob: float) -> None:
        self.low, self.high, self.zero_prob = float(low), float(high), float(zero_prob)

    def __call__(self, spec: Any = None) -> float:
        if np.random.random() < self.zero_prob:
            return 0.0
        return float(np.exp(np.random.uniform(np.log(self.low), np.log(self.high))))


def param_space(space: Space) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.params.items():
        if "grid" in spec:
            out[key] = tune.grid_search(list(spec["grid"]))
        elif "choice" in spec:
            out[key] = tune.choice(list(spec["choice"]))
        elif "uniform" in spec:
            out[key] = tune.uniform(*spec["uniform"])
        elif spec.get("zero_prob"):
            out[key] = tune.sample_from(ZeroOrLogUniform(*spec["loguniform"], spec["zero_prob"]))
        else:
            out[key] = tune.loguniform(*spec["loguniform"])
    if space.arms:
        out[ARM] = tune.grid_search(list(space.arms))
    if space.seeds:
        out["train.seed"] = tune.grid_search(list(space.seeds))
    return out


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
    MLflow run; the last report adds the registered model version for champion selection."""
    from ray import tune

    from karma.tracking import RunTracker
    from karma.train.ray_job import run_training

    sp = Space(**space)
    trial_id = tune.get_context().get_trial_id()
    values = trial_values(params, sp)
    values["tracking.run_name"] = trial_run_name(sp.name, trial_id)
    try:
        cfg = apply_values(base, values)
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


# ---------------------------------------------------------------- the sweep


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

    from karma.tracking import RunTracker, promote_if_better
    from karma.train.ray_job import init_ray

    init_ray(cfg)
    path = experiment_path(cfg, space.name)
    uri = cfg.tracking.tracking_uri
    n_concurrent, note = concurrency(cfg, space.max_concurrent_trials, ray.cluster_resources())
    if note:
        log(note)
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"sweep {space.name!r} has no saved state at {path}; run it without --resume first")
        manifest = read_manifest(path)
        diff = _config_diff(manifest["config"], cfg.to_dict())
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
                {"space": space.to_dict(), "space_digest": space.digest(), "config": cfg.to_dict(),
                 "parent_run_id": tracker.run_id, "tracking_uri": uri}, indent=2))
            tracker.log_dict(space.to_dict(), "space.json")
            tracker.log_dict(cfg.to_dict(), "config.json")
            tracker.log_params({"sweep.metric": space.metric, "sweep.mode": space.mode,
                                "sweep.num_samples": space.num_samples,
                                "sweep.max_concurrent_trials": n_concurrent})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg.to_dict(), space=space.to_dict(), parent_run_id=tracker.run_id),
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
                    max_concurrent_trials=n_concurrent, time_budget_s=space.time_budget_s,
                    trial_dirname_creator=_trial_dirname),
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


# ---------------------------------------------------------------- the ablation report


# Besides HR@K / NDCG@K: MRR, the long-tail breakdown (targets with few training interactions),
# sink rate, read-out collapse, embedding health and fidelity. A metric no trial reported is left out.
TEST_PREFIX = "test/"  # the worker's metrics of the test split, after the last epoch
REPORT_METRICS = ("MRR", "tail/HR@10", "tail/NDCG@10", "tail/MRR", "sink_rate_first", "sink_rate_item", "barcode",
                  "effective_rank", "token_f1", "category_match")


def arm_label(trial: TrialSummary, space: Space) -> str:
    if ARM in trial.params:
        return str(trial.params[ARM])
    parts = []
    for key in space.params:
        v = trial.params.get(key)
        parts.append(f"{key.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{key.split('.')[-1]}={v}")
    return ", ".join(parts) or "all"


def report_split(trials: list[TrialSummary]) -> str:
    """"test" when every completed trial reported the held-out test split (`test/...`, written
    after the last epoch), else "valid" (the last epoch's validation metrics)."""
    done = [t for t in trials if t.complete]
    return "test" if done and all(TEST_PREFIX + "HR@10" in t.metrics for t in done) else "valid"


def arms_table(trials: list[TrialSummary], space: Space, ks: list[int]) -> pd.DataFrame:
    """Long table [arm, metric, mean, std, n] over the completed trials (seeds pooled), of the
    test split where every trial has it (see `report_split`)."""
    metrics = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + list(REPORT_METRICS)
    prefix = TEST_PREFIX if report_split(trials) == "test" else ""
    rows = []
    for t in trials:
        if not t.complete:
            continue
        for m in metrics:
            v = t.metrics.get(prefix + m)
            if isinstance(v, (int, float)) and math.isfinite(v):
                rows.append({"arm": arm_label(t, space), "metric": m, "value": float(v)})
    if not rows:
        raise ConfigError(f"sweep {space.name!r} has no completed trials to report")
    df = pd.DataFrame(rows)
    order = list(space.arms) if space.arms else list(dict.fromkeys(df["arm"]))
    g = df.groupby(["arm", "metric"], sort=False)["value"]
    table = g.agg(mean="mean", n="count").reset_index()
    table["std"] = g.std(ddof=1).fillna(0.0).to_numpy()  # sample std over seeds; one seed: 0
    table["arm"] = pd.Categorical(table["arm"], [a for a in order if a in set(table["arm"])], ordered=True)
    table["metric"] = pd.Categorical(table["metric"], [m for m in metrics if m in set(table["metric"])],
                                     ordered=True)
    table = table.sort_values(["arm", "metric"]).reset_index(drop=True)
    table["arm"] = table["arm"].astype(str)
    table["metric"] = table["metric"].astype(str)
    return table[["arm", "metric", "mean", "std", "n"]]


def markdown_table(table: pd.DataFrame) -> str:
    metrics = list(dict.fromkeys(table["metric"]))
    lines = ["| arm | seeds | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for arm, sub in table.groupby("arm", sort=False):
        sub = sub.set_index("metric")
        cells = [f"{sub.loc[m, 'mean']:.4f} ± {sub.loc[m, 'std']:.4f}" if m in sub.index else "–" for m in metrics]
        lines.append(f"| {arm} | {int(sub['n'].max())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class SweepReport:
    markdown: str
    table: pd.DataFrame
    png: Path
    parent_run_id: str


def report_sweep(path: str | Path, out_dir: str | Path | None = None) -> SweepReport:
    """Markdown table and arms plot of a finished sweep; both logged on its MLflow parent run."""
    from mlflow import MlflowClient

    from karma.plots import arms_plot

    path = Path(path)
    manifest = read_manifest(path)
    space = Space(**manifest["space"])
    cfg = from_dict(manifest["config"])
    if not manifest.get("finished"):
        raise ConfigError(f"sweep {space.name!r} at {path} is not finished; resume it with jobs/tune.py "
                          "--resume (same arguments) first")
    trials = summarize(path)
    table = arms_table(trials, space, cfg.train.ks)
    failed = [t for t in trials if t.status == "ERROR"]
    split = "test split" if report_split(trials) == "test" else "validation split (no trial reported test/...)"
    md = f"## Sweep {space.name}: mean ± std over seeds, {split}\n\n{markdown_table(table)}\n"
    if failed:
        md += "\nFailed trials: " + "; ".join(f"{t.trial_id} ({t.error})" for t in failed) + "\n"
    stopped = [t.trial_id for t in trials if t.status == "TERMINATED" and not t.complete]
    if stopped:
        md += "\nStopped early by the scheduler (not in the table): " + ", ".join(stopped) + "\n"
    out = Path(out_dir) if out_dir else path / "report"
    png = out / f"{space.name}_arms.png"
    arms_plot(table, path=png)
    (out / f"{space.name}_arms.md").write_text(md)
    client = MlflowClient(manifest["tracking_uri"])
    run_id = manifest["parent_run_id"]
    client.log_text(run_id, md, "report/arms.md")
    client.log_artifact(run_id, str(png), "report")
    client.log_dict(run_id, {"rows": table.to_dict(orient="records")}, "report/arms.json")
    return SweepReport(md, table, png, run_id)
