"""One loop, one protocol: the tiny config trained through the plain backend and through the Ray
job (one worker, DeepSpeed ZeRO-0, fp32, the same seed) ends with the same best epoch and the
same validation and test metrics. A NaN loss stops the loop with an error that names the step."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from conftest import tiny_cfg
from karma.evaluate import validation_subset
from karma.factory import build_model
from karma.pipeline import prepare
from karma.train.loop import NonFiniteLoss, PlainBackend, TrainData, Trainer, steps_plan
from karma.train.plain import train_plain
from karma.train.ray_job import run_training

ONE_WORKER = ("dist.num_workers=1", "dist.zero_stage=0", "dist.precision=fp32", "train.epochs=3",
              "train.early_stop_patience=1", "train.analysis_examples=0", "train.eval_max_users=100",
              "train.bucket_batches=4", "tracking.register=false", "tracking.run_name=one-loop")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_plain_and_ray_paths_measure_the_same(ray_session, cache_dir, tmp_path):
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={tmp_path}", *ONE_WORKER)
    plain = train_plain(cfg, log=lambda m: None)
    job = run_training(cfg, log=lambda m: None)
    assert job.metrics["best_epoch"] == plain["best_epoch"] >= 1
    assert job.steps == plain["steps"] == job.metrics["step"]
    for key in ("HR@10", "NDCG@10", "MRR", "HR@50"):
        assert job.metrics[key] == pytest.approx(plain["best"][key], abs=1e-6), key  # the best epoch's validation
        assert job.metrics[f"test/{key}"] == pytest.approx(plain["test"][key], abs=1e-6), key


def test_a_nan_loss_stops_the_loop_and_names_the_step(cache_dir):
    cfg = tiny_cfg(cache_dir, "train.epochs=2", "train.analysis_examples=0")
    prep = prepare(cfg.data, log=lambda m: None)
    data = TrainData(prep.split.train, validation_subset(prep.split.valid, 50), prep.split.test, prep.data.items,
                     prep.counts)
    model, tok = build_model(cfg, prep.data.items, log=lambda m: None)
    per_epoch, total = steps_plan(cfg.train, len(data.train))

    def poison(state, stats):  # the weights diverge after step 3
        if state.step == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    trainer = Trainer(PlainBackend(model, cfg.train, total, torch.device("cpu")), data, tok, cfg,
                      log=lambda m: None, on_step=poison)
    epochs = trainer.epochs()
    with pytest.raises(NonFiniteLoss, match=r"at step 4, in epoch 1.*train\.lr"):
        next(epochs)
    assert trainer.state.step == 4 and trainer.state.epoch == 0 and per_epoch > 4
    assert trainer.best_weights is None  # nothing of the diverged epoch was kept
    assert np.isnan(next(model.parameters()).detach().numpy()).all()


def test_best_weights_hold_what_training_changes(items, cache_dir):
    """The best epoch's copy holds every parameter and none of the build-time buffers (the frozen
    text table, the items' token ids); loading it back restores the parameters and leaves the
    buffers as built."""
    cfg = tiny_cfg(cache_dir, "model.text_channel=true")
    model, _ = build_model(cfg, items, log=None)
    backend = PlainBackend(model, cfg.train, total_steps=10, device=torch.device("cpu"))
    saved = backend.weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(saved) == set(params) and "items.text_emb" not in saved and "item_tokens" not in saved
    table = model.items.text_emb.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    backend.load_weights(saved)
    assert all(torch.equal(params[k], saved[k]) for k in saved)
    assert torch.equal(model.items.text_emb, table)
