"""Search spaces: the YAML file's parsing and checks (also against the sweep's config), what a
space expands to (trials, arms), and its sampling: Tune domains and the seeded search algorithm.

See tune_spaces/README.md for the file format."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from ray.tune.search.sample import BaseSampler, Domain

from karma.config import Config, ConfigError, from_dict, load_config

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
                from_dict(base, dotted={key: value})
            except ConfigError as err:
                raise _fail(space.source, where, str(err)) from err
        try:
            from_dict(base, dotted={**values, **sample})
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
    # Strings in, strings out: nothing here can break a checked rule, so no second validation.
    cfg.dist.storage_path = _absolute(cfg.dist.storage_path)  # (data.cache_dir already is: load_config)
    cfg.data.path = _absolute(cfg.data.path)
    cfg.tracking.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.dist.storage_path)
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


# ---------------------------------------------------------------- sampling


class ZeroOrLogUniform(Domain):
    """Exactly 0 with probability `zero_prob`, else log-uniform in [low, high]: the "off"
    setting of a loss weight is a point a log scale never reaches. A Tune domain, so it draws
    from the search algorithm's (seeded) generator like Tune's own distributions."""

    class _Sampler(BaseSampler):
        def sample(self, domain: ZeroOrLogUniform, config: Any = None, size: int = 1,
                   random_state: Any = None) -> float | list[float]:
            # Domain.sample hands in Tune's generator wrapper; np.random when none was given.
            rng = random_state if random_state is not None else np.random
            draws = [domain.draw(rng) for _ in range(size)]
            return draws if size > 1 else draws[0]

    default_sampler_cls = _Sampler

    def __init__(self, low: float, high: float, zero_prob: float) -> None:
        self.low, self.high, self.zero_prob = float(low), float(high), float(zero_prob)

    def draw(self, rng: Any) -> float:
        """One value from `rng` (a numpy Generator or RandomState, or Tune's wrapper of one)."""
        if rng.uniform(0.0, 1.0) < self.zero_prob:
            return 0.0
        return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))

    def __call__(self, config: Any = None) -> float:
        # Sweeps saved before this was a domain hold it inside tune.sample_from: a resumed one
        # calls it for its remaining trials, from NumPy's global state as it did then.
        return self.draw(np.random)

    def is_valid(self, value: Any) -> bool:
        return value == 0 or self.low <= value <= self.high

    @property
    def domain_str(self) -> str:
        return f"(0 with p={self.zero_prob:g}, else loguniform {self.low:g}..{self.high:g})"


def param_space(space: Space) -> dict[str, Any]:
    """The space as Tune's param_space: a domain or grid per dotted key (plus arm and seed grids)."""
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
            out[key] = ZeroOrLogUniform(*spec["loguniform"], spec["zero_prob"])
        else:
            out[key] = tune.loguniform(*spec["loguniform"])
    if space.arms:
        out[ARM] = tune.grid_search(list(space.arms))
    if space.seeds:
        out["train.seed"] = tune.grid_search(list(space.seeds))
    return out


def search_algorithm(seed: int, max_concurrent: int = 0) -> Any:
    """Tune's grid/random search with its sampling seeded: the same space, seed and number of
    samples draw the same trial configs, so a sweep can be repeated (unseeded, Tune draws from
    NumPy's global state). `max_concurrent` bounds the trials running at once (0 = no bound)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
