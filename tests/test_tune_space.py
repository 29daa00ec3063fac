"""Search-space files: parsing, validation against the config, the Tune space they build.
No Ray cluster: these run in a second."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from conftest import ROOT
from karma.config import ConfigError, load_config
from karma.tune import (ARM, SpaceError, ZeroOrLogUniform, check_space, concurrency, expected_trials, load_space,
                        param_space, parse_seeds, parse_space, search_algorithm, sweep_config, trial_values)

BASE = {"name": "s", "metric": "NDCG@10", "mode": "max", "params": {"loss.w_gen": {"uniform": [0.0, 1.0]}}}


def space(**changes):
    return parse_space({**BASE, **changes}, "s.yaml")


def tiny():
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize("file", ["loss_weights.yaml", "ablation.yaml", "recipe.yaml"])
def test_shipped_spaces_load_and_fit_the_configs(file, tmp_path):
    sp = load_space(ROOT / "tune_spaces" / file)
    for config in ("tiny.yaml", "smollm2.yaml", "qwen0.5b-gpu.yaml"):
        cfg = sweep_config(ROOT / "configs" / config, [f"dist.storage_path={tmp_path}"], sp)
        assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_loss_weights_space_has_the_zero_option_and_asha():
    sp = load_space(ROOT / "tune_spaces" / "loss_weights.yaml")
    assert sp.params["loss.w_gen"]["zero_prob"] > 0 and sp.params["loss.w_rec"]["zero_prob"] > 0
    assert "loss.tau_init" in sp.params
    assert sp.scheduler["type"] == "asha" and sp.metric in ("NDCG@10", "HR@10")
    assert any(o.startswith("train.epochs=") for o in sp.overrides)


def test_ablation_space_names_the_four_arms():
    sp = load_space(ROOT / "tune_spaces" / "ablation.yaml")
    arms = {name: (v["loss.w_gen"], v["loss.w_rec"]) for name, v in sp.arms.items()}
    w = arms["KARMA"][0]
    assert w > 0 and arms == {"action-only": (0, 0), "+generation": (w, 0), "+reconstruction": (0, w),
                              "KARMA": (w, w)}
    assert len(sp.seeds) >= 2 and sp.scheduler is None
    ps = param_space(sp)
    assert ps[ARM] == {"grid_search": list(sp.arms)} and ps["train.seed"] == {"grid_search": sp.seeds}


def test_part_of_a_grid_as_its_own_sweep():
    sp = load_space(ROOT / "tune_spaces" / "ablation.yaml", name="ablation-s12", seeds=parse_seeds("1, 2"))
    assert sp.name == "ablation-s12" and sp.seeds == [1, 2] and expected_trials(sp) == 4 * 2
    assert sp.digest() != load_space(ROOT / "tune_spaces" / "ablation.yaml").digest()  # no resume across them
    for bad in ("", "1,x", " , "):
        with pytest.raises(SpaceError, match="--seeds: expected comma-separated integers"):
            parse_seeds(bad)


@pytest.mark.parametrize("changes, needle", [
    ({"bogus": 1}, "unknown key(s) ['bogus']; valid keys"),
    ({"mode": "maximize"}, "mode: 'maximize': use max or min"),
    ({"name": "a b"}, "name: 'a b': use letters"),
    ({"metric": ""}, "metric: required"),
    ({"params": {"loss.w_gen": {"normal": [0, 1]}}}, "params.loss.w_gen: unknown key(s) ['normal']"),
    ({"params": {"loss.w_gen": {"uniform": [1.0, 0.1]}}}, "params.loss.w_gen: uniform low 1.0 > high 0.1; swap"),
    ({"params": {"loss.w_gen": {"loguniform": [0.0, 1.0]}}}, "loguniform low must be > 0, got 0.0; to include 0 "
                                                             "add zero_prob"),
    ({"params": {"loss.w_gen": {"uniform": [0.1]}}}, "uniform needs [low, high] as two numbers"),
    ({"params": {"loss.w_gen": {"uniform": [0, 1], "zero_prob": 0.2}}}, "zero_prob only goes with loguniform"),
    ({"params": {"loss.w_gen": {"loguniform": [0.1, 1], "zero_prob": 1.5}}}, "zero_prob must be a number in [0, 1)"),
    ({"params": {"loss.w_gen": {"choice": []}}}, "choice needs a non-empty list"),
    ({"params": {"loss.w_gen": {"choice": [1], "grid": [2]}}}, "exactly one distribution"),
    ({"params": {"tracking.run_name": {"choice": ["x"]}}}, "params.tracking.run_name: is fixed by the sweep"),
    ({"params": {"dist.num_workers": {"grid": [1, 2]}}}, "params.dist.num_workers: is fixed by the sweep"),
    ({"params": {"lr": {"grid": [1]}}}, "params.lr: keys are dotted config paths"),
    ({"params": {}}, "nothing to sweep"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type: 'pbt' is not supported; use asha"),
    ({"scheduler": {"type": "asha", "grace_period": 4, "max_t": 2}}, "scheduler.grace_period: 4 exceeds max_t=2"),
    ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor: must be a number > 1"),
    ({"scheduler": {"type": "asha", "patience": 1}}, "scheduler: unknown key(s) ['patience']"),
    ({"seeds": [0, "1"]}, "seeds: expected a list of integers"),
    ({"params": {"train.seed": {"grid": [1, 2]}}, "seeds": [0]}, "train.seed is also set in params/arms"),
    ({"num_samples": 0}, "num_samples: must be an integer >= 1"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials: must be an integer >= 1"),
    ({"overrides": ["train.epochs"]}, "overrides: expected a list of 'section.key=value'"),
    ({"budget": {"hours": 1}}, "budget: expected {time_budget_s: seconds}"),
    ({"budget": {"time_budget_s": -5}}, "budget.time_budget_s: must be a number of seconds > 0"),
    ({"champion_alias": "latest"}, "champion_alias: 'latest'"),
    ({"arms": {"a": {"loss.w_gen": 0.1}}}, "arms.a: ['loss.w_gen'] are also swept in params"),
    ({"arms": {"a": [0.1]}}, "arms.a: expected a mapping of dotted config keys"),
])
def test_bad_spaces_name_the_field(changes, needle):
    with pytest.raises(SpaceError) as err:
        space(**changes)
    assert needle in str(err.value) and str(err.value).startswith("s.yaml: ")


@pytest.mark.parametrize("changes, needle", [
    ({"params": {"loss.w_gne": {"uniform": [0.0, 1.0]}}}, "params.loss.w_gne: unknown key(s) ['w_gne'] in loss"),
    ({"params": {"modle.n_interest": {"grid": [1, 2]}}}, "params.modle.n_interest: unknown key(s) ['modle']"),
    ({"params": {"model.n_interest": {"choice": ["two"]}}}, "params.model.n_interest: model.n_interest: expected "
                                                            "an integer"),
    ({"params": {"model.head_reduce": {"grid": ["mean"]}}}, "params.model.head_reduce: model.head_reduce: 'mean' is"
                                                            " not allowed"),
    ({"params": {}, "arms": {"x": {"loss.w_gen": -1.0}}}, "arms.x.loss.w_gen: loss.w_gen / loss.w_rec: weights "
                                                          "must be >= 0"),
    ({"metric": "HR@20"}, "metric: HR@20 needs K=20 in train.ks"),
    ({"metric": "tail/NDCG@20"}, "metric: tail/NDCG@20 needs K=20 in train.ks"),
    ({"metric": "tail/recall"}, "metric: 'tail/recall' is not reported by training"),
    ({"metric": "accuracy"}, "metric: 'accuracy' is not reported by training"),
])
def test_space_is_checked_against_the_config(changes, needle):
    with pytest.raises(ConfigError) as err:
        check_space(space(**changes), tiny())
    assert needle in str(err.value)


@pytest.mark.parametrize("metric, near_miss, needle", [
    ("tail/HR@10", "tail/HR@20", "needs K=20 in train.ks"),
    ("tail/NDCG@10", "tail/NDCG@20", "needs K=20 in train.ks"),
    ("tail/MRR", "tail/MRR@10", "is not reported by training"),
])
def test_long_tail_metrics_are_sweep_objectives(metric, near_miss, needle, tmp_path):
    cfg = sweep_config(ROOT / "configs" / "tiny.yaml", [f"dist.storage_path={tmp_path}"], space(metric=metric))
    assert cfg.train.ks == [10, 50, 200]
    # Its near miss (a K the config does not compute, a cut-off MRR does not take) is refused.
    with pytest.raises(SpaceError, match=f"metric: '?{near_miss}'? {needle}"):
        check_space(space(metric=near_miss), cfg)


def test_only_a_sample_is_checked_so_a_bad_grid_value_fails_its_own_trial(tmp_path):
    # n_interest=0 breaks a cross-field rule; the sweep starts and that trial errors.
    sp = space(params={"model.n_interest": {"grid": [1, 0]}})
    cfg = sweep_config(ROOT / "configs" / "tiny.yaml", [f"dist.storage_path={tmp_path}"], sp)
    assert trial_values({"model.n_interest": 0}, sp) == {"model.n_interest": 0}
    assert expected_trials(sp) == 2
    # The first grid value is the sample checked up front; with 0 first the sweep is refused.
    with pytest.raises(SpaceError, match="params.model.n_interest: model.n_interest: must be at least 1"):
        check_space(space(params={"model.n_interest": {"grid": [0, 1]}}), cfg)


def test_space_overrides_then_command_line_then_params(tmp_path):
    sp = space(overrides=["train.epochs=4", "train.lr=0.01"])
    cfg = sweep_config(ROOT / "configs" / "tiny.yaml", ["train.lr=0.02", f"dist.storage_path={tmp_path}"], sp)
    assert cfg.train.epochs == 4 and cfg.train.lr == 0.02
    assert cfg.data.cache_dir.startswith("/")  # trials run in other folders
    with pytest.raises(ConfigError, match=r"train.epochs: .* \(the space's overrides"):
        sweep_config(ROOT / "configs" / "tiny.yaml", [], space(overrides=["train.epochs=many"]))


def test_arms_expand_and_params_win():
    sp = space(params={"loss.tau_init": {"grid": [0.05]}},
               arms={"gen": {"loss.w_gen": 0.5, "loss.w_rec": 0.0}})
    assert trial_values({ARM: "gen", "loss.tau_init": 0.05}, sp) == {
        "loss.w_gen": 0.5, "loss.w_rec": 0.0, "loss.tau_init": 0.05}
    with pytest.raises(ConfigError, match="arm 'nope' is not in the space's arms"):
        trial_values({ARM: "nope"}, sp)


def test_zero_or_loguniform_draws_zero_at_the_given_rate_and_stays_in_range():
    draws = np.array(ZeroOrLogUniform(0.01, 2.0, 0.25).sample(size=4000, random_state=0))
    assert abs((draws == 0).mean() - 0.25) < 0.03
    nonzero = draws[draws > 0]
    assert nonzero.min() >= 0.01 and nonzero.max() <= 2.0
    # Log-uniform: the median sits at the geometric mean of the bounds.
    assert math.isclose(np.median(nonzero), math.sqrt(0.01 * 2.0), rel_tol=0.15)


def test_param_space_builds_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    sp = space(params={"a.x": {"choice": [1, 2]}, "a.y": {"uniform": [0, 1]}, "a.z": {"loguniform": [0.1, 1]},
                       "a.w": {"loguniform": [0.1, 1], "zero_prob": 0.3}, "a.g": {"grid": [3, 4]}},
               seeds=[0, 1])
    ps = param_space(sp)
    assert isinstance(ps["a.x"], Categorical) and isinstance(ps["a.y"], Float)
    assert isinstance(ps["a.z"], Float) and isinstance(ps["a.w"], ZeroOrLogUniform)
    assert ps["a.g"] == {"grid_search": [3, 4]} and ps["train.seed"] == {"grid_search": [0, 1]}


def sampled_trials(sp, seed: int) -> list[dict]:
    """The trial configs the sweep's search algorithm draws, in order; no trial runs."""
    alg = search_algorithm(seed)
    alg.add_configurations({sp.name: {"run": lambda config: None, "config": param_space(sp),
                                      "num_samples": sp.num_samples}})
    trials = []
    while (trial := alg.next_trial()) is not None:
        trials.append(trial.config)
    return trials


def test_a_seeded_sweep_draws_the_same_trials_again():
    sp = space(params={"loss.w_gen": {"loguniform": [0.01, 2.0], "zero_prob": 0.3},
                       "loss.tau_init": {"uniform": [0.03, 0.1]}, "model.head_reduce": {"choice": ["max", "mixture"]},
                       "loss.w_rec": {"loguniform": [0.01, 1.0]}, "model.n_interest": {"grid": [1, 2]}},
               num_samples=6)
    np.random.seed(123)  # NumPy's global state must not matter
    first = sampled_trials(sp, seed=7)
    np.random.seed(456)
    again = sampled_trials(sp, seed=7)
    assert len(first) == 12 and first == again
    other = sampled_trials(sp, seed=8)
    assert len(other) == 12 and other != first
    # Every distribution really varies, so equality above is not two constant streams.
    for key in ("loss.w_gen", "loss.tau_init", "loss.w_rec"):
        assert len({t[key] for t in first}) > 3
    assert {t["model.head_reduce"] for t in first + other} == {"max", "mixture"}
    assert any(t["loss.w_gen"] == 0.0 for t in first + other)


@pytest.mark.parametrize("overrides, requested, cluster, want", [
    (["dist.num_workers=1"], None, {"CPU": 3}, (2, None)),
    (["dist.num_workers=1"], 4, {"CPU": 3}, (2, "max_concurrent_trials=4 clipped to 2")),
    (["dist.num_workers=2"], 1, {"CPU": 9}, (1, None)),
    (["dist.num_workers=2", "dist.cpus_per_worker=2"], 8, {"CPU": 17}, (4, "clipped to 4")),
    (["dist.num_workers=2", "dist.use_gpu=true"], 8, {"CPU": 64, "GPU": 4}, (2, "2 GPU worker(s) x 1 GPU per trial on 4 GPUs")),
    (["dist.num_workers=1", "dist.use_gpu=true", "dist.gpus_per_worker=0.25"], 8, {"CPU": 16, "GPU": 1},
     (4, "1 GPU worker(s) x 0.25 GPU per trial on 1 GPUs")),
])
def test_concurrency_is_bounded_by_the_cluster(overrides, requested, cluster, want):
    n, note = concurrency(load_config(ROOT / "configs" / "tiny.yaml", overrides), requested, cluster)
    assert n == want[0]
    assert (note is None) if want[1] is None else (want[1] in note)


def test_concurrency_refuses_a_trial_the_cluster_cannot_hold():
    with pytest.raises(ConfigError, match=r"one trial needs 2 worker\(s\) x 1 CPU .* lower dist.num_workers"):
        concurrency(tiny(), None, {"CPU": 2})


def test_load_space_errors(tmp_path):
    with pytest.raises(SpaceError, match="does not exist; see tune_spaces/"):
        load_space(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpaceError, match="is not valid YAML"):
        load_space(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(BASE))
    assert load_space(ok, name="other").name == "other"


def test_recipe_space_has_the_three_arms_of_the_recipe():
    sp = load_space(ROOT / "tune_spaces" / "recipe.yaml")
    arms = {name: (v["loss.w_gen"], v["loss.w_rec"], v["model.history_text_items"]) for name, v in sp.arms.items()}
    assert arms["action-only"] == (0, 0, 0)
    assert arms["KARMA"][2] == 0 and min(arms["KARMA"][:2]) > 0
    assert arms["text-KARMA"][:2] == arms["KARMA"][:2] and arms["text-KARMA"][2] > 0
    assert sp.seeds == [0, 1, 2] and sp.scheduler is None
    assert any(o.startswith("train.early_stop_patience=") and not o.endswith("=0") for o in sp.overrides)
