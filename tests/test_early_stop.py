"""The early-stopping rule: a noise spike on the raw curve stops a still-improving run; the
trailing mean does not, and still stops a run that has truly peaked. The loop follows the rule
and resumes deciding alike."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT, tiny_cfg
from karma.config import ConfigError, load_config
from karma.train.early_stop import StopRule


def noisy_rise(epochs: int, peak_at: int, noise: float, seed: int) -> list[float]:
    """A validation curve that rises to `peak_at`, then sags, with +-noise per epoch."""
    e = np.arange(1, epochs + 1)
    clean = 0.06 * np.minimum(e, peak_at) / peak_at - 0.0004 * np.maximum(e - peak_at, 0)
    return list(clean + np.random.default_rng(seed).uniform(-noise, noise, epochs))


def stop_epoch(rule: StopRule, curve: list[float]) -> int:
    for n in range(1, len(curve) + 1):
        if rule.should_stop(curve[:n]):
            return n
    return len(curve)


def test_the_trailing_mean_is_exact():
    rule = StopRule(patience=2, window=3)
    np.testing.assert_allclose(rule.smoothed([3.0, 6.0, 9.0, 0.0]), [3.0, 4.5, 6.0, 5.0])
    assert rule.stale([3.0, 6.0, 9.0, 0.0]) == 1
    assert StopRule(window=1).stale([0.1, 0.3, 0.3, 0.2]) == 2  # a tie is no gain: the first best counts


def test_a_single_lucky_epoch_stops_the_raw_rule_but_not_the_smoothed_one():
    curve = [0.010, 0.020, 0.045, 0.030, 0.034, 0.038, 0.041, 0.044, 0.047, 0.050]  # epoch 3 is a spike
    raw, smooth = StopRule(patience=3), StopRule(patience=3, window=3)
    assert stop_epoch(raw, curve) == 6  # three epochs below the spike
    assert stop_epoch(smooth, curve) == len(curve)  # the mean keeps rising: no stop
    assert smooth.should_stop(curve + [0.02, 0.02, 0.02])  # a real fall does stop it


def test_over_many_noisy_curves_the_smoothed_rule_stops_nearer_the_peak():
    late_raw, late_smooth = [], []
    for seed in range(40):
        curve = noisy_rise(60, peak_at=25, noise=0.008, seed=seed)
        late_raw.append(stop_epoch(StopRule(patience=3), curve) - 25)
        late_smooth.append(stop_epoch(StopRule(patience=3, window=3), curve) - 25)
    # the raw rule often quits well before the peak; the smoothed one rarely does
    assert np.mean(np.array(late_raw) < -5) > np.mean(np.array(late_smooth) < -5)
    assert np.median(late_smooth) > np.median(late_raw)


def test_min_epochs_holds_off_any_stop():
    falling = [0.05, 0.04, 0.03, 0.02, 0.01, 0.0]
    assert stop_epoch(StopRule(patience=2), falling) == 3
    assert stop_epoch(StopRule(patience=2, min_epochs=5), falling) == 5
    assert not StopRule(patience=0, window=3).should_stop(falling)  # 0 = never


@pytest.mark.parametrize("field, value", [("early_stop_window", 0), ("early_stop_min_epochs", -1)])
def test_bad_rule_settings_name_the_field(field, value, cache_dir):
    with pytest.raises(ConfigError, match=rf"train\.{field}"):
        tiny_cfg(cache_dir, f"train.{field}={value}")


def test_the_recipes_share_one_rule():
    rules = {name: load_config(ROOT / "configs" / name).train for name in
             ("karma-scientific.yaml", "sasrec-scientific.yaml")}
    keys = ("early_stop_patience", "early_stop_window", "early_stop_min_epochs")
    assert len({tuple(getattr(t, k) for k in keys) for t in rules.values()}) == 1, rules


def test_the_loop_stops_by_the_rule_and_a_restored_state_decides_alike(cache_dir):
    import torch

    from karma.evaluate import validation_subset
    from karma.factory import build_model
    from karma.pipeline import prepare
    from karma.train.loop import LoopState, PlainBackend, TrainData, Trainer, steps_plan

    cfg = tiny_cfg(cache_dir, "train.epochs=50", "train.early_stop_patience=3", "train.early_stop_window=3",
                   "train.analysis_examples=0")
    prep = prepare(cfg.data, log=lambda m: None)
    data = TrainData(prep.split.train, validation_subset(prep.split.valid, 50), prep.split.test, prep.data.items,
                     prep.counts)
    model, tok = build_model(cfg, prep.data.items, log=lambda m: None)
    _, total = steps_plan(cfg.train, len(data.train))
    spike = [0.010, 0.020, 0.045, 0.030, 0.034, 0.038]  # raw patience 3 would stop here

    def trainer(curve):
        state = LoopState.from_dict({"epoch": len(curve), "curve": list(curve)})
        return Trainer(PlainBackend(model, cfg.train, total, torch.device("cpu")), data, tok, cfg,
                       log=lambda m: None, state=state)

    assert not trainer(spike).done
    assert not trainer(spike + [0.041]).done  # still rising
    assert trainer(spike + [0.02, 0.02]).done  # the mean has not risen since epoch 5
