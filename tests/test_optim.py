"""Optimizer groups: weight decay by parameter kind, a separate learning rate for what KARMA adds
to the backbone, and the warm-up/cosine schedule over both."""

import pytest

from conftest import tiny_cfg
from karma.factory import build_model
from karma.config import TrainConfig
from karma.optim import make_optimizer, make_scheduler, param_groups


@pytest.fixture(scope="module")
def model(items, cache_dir):
    return build_model(tiny_cfg(cache_dir), items, log=None)[0]


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_scale_one_keeps_the_two_decay_groups(model):
    groups = param_groups(model, 0.01, 1e-3)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and {g["lr"] for g in groups} == {1e-3}
    decay, plain = (_names(model, g) for g in groups)
    assert decay | plain == {n for n, p in model.named_parameters() if p.requires_grad} and not decay & plain
    assert "items.id_emb.weight" in plain and "temperature.log_tau" in plain and "item_head.weight" in decay


def test_new_parameters_get_the_scaled_lr(model):
    groups = param_groups(model, 0.01, 1e-3, new_lr_scale=10)
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["lr"], set()).update(_names(model, g))
    assert sorted(by_lr) == pytest.approx([1e-3, 1e-2])
    slow, fast = by_lr[min(by_lr)], by_lr[max(by_lr)]
    assert slow and all(n.startswith("backbone.") for n in slow)
    assert fast == {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")}
    assert {"items.id_emb.weight", "interest_head.weight", "temperature.log_tau"} <= fast
    # decay still follows the parameter's kind inside each lr
    kinds = {(round(g["lr"], 6), g["weight_decay"]) for g in groups}
    assert kinds == {(1e-3, 0.01), (1e-3, 0.0), (1e-2, 0.01), (1e-2, 0.0)}


def test_schedule_keeps_the_ratio(model):
    opt = make_optimizer(model, TrainConfig(lr=1e-3, new_lr_scale=10))
    sched = make_scheduler(opt, warmup=2, total=10)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[0] < 1e-3 and lrs[1] == pytest.approx(10 * lrs[0])
