"""Fault tolerance: a worker process is killed (SIGKILL) once in the middle of epoch 2; Ray Train
restarts the group, the job resumes from its last step checkpoint (`train.checkpoint_every_steps`),
not from the epoch's start, and ends at the same step count as an uninterrupted run. Rerunning
the same named job resumes it too."""

from __future__ import annotations

import mlflow
import pytest
import ray

from conftest import tiny_cfg
from karma.pipeline import prepare
from karma.tracking import mlflow_key
from karma.train.loop import steps_plan
from karma.train.ray_job import run_training
from karma.train.worker import FAULT_ENV

EVERY = 2  # a checkpoint every 2 steps inside an epoch


WORKERS = ("dist.num_workers=2", "dist.zero_stage=1", "train.analysis_examples=0", "train.eval_max_users=100",
           "tracking.register=false", f"train.checkpoint_every_steps={EVERY}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("fault")
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={root}", "tracking.run_name=faulty", "train.epochs=2",
                   *WORKERS)
    per_epoch, total = steps_plan(cfg.train, len(prepare(cfg.data, log=lambda m: None).split.train),
                                  cfg.dist.num_workers)
    marker = root / "fault-happened"
    fail_at = per_epoch + 5  # inside epoch 2, after its step checkpoints at per_epoch + 1..4
    ray.init(address="local", num_cpus=3,
             runtime_env={"env_vars": {FAULT_ENV: f"{fail_at}:{marker}:kill", "OMP_NUM_THREADS": "1"}})
    yield cfg, root, marker, fail_at, per_epoch, total
    ray.shutdown()


@pytest.fixture(scope="module")
def faulty(setup):
    """The job run once with its injected fault, and what MLflow held right after it, so each
    test below reads its own facts whatever ran before it."""
    cfg, root, *_ = setup
    result = run_training(cfg, log=lambda m: None)
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    resumed = [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")]
    curve = sorted(m.step for m in client.get_metric_history(result.run_id, "valid/" + mlflow_key("HR@10")))
    return result, resumed, curve


def test_worker_failure_resumes_from_checkpoint(setup, faulty):
    cfg, root, marker, fail_at, per_epoch, total = setup
    result, resumed, curve = faulty
    assert marker.read_text() == str(fail_at)  # the fault really happened
    assert result.steps == total == 2 * per_epoch  # same count as an uninterrupted run
    # restarted from a step checkpoint inside epoch 2, not from the epoch's start (the newest one
    # Ray's controller had collected from the workers before the kill)
    assert len(resumed) == 1 and per_epoch < resumed[0] < fail_at and resumed[0] % EVERY == 0
    assert curve == [per_epoch, 2 * per_epoch]


def test_rerun_of_the_same_named_job_resumes(setup, faulty):
    cfg, root, _, _, per_epoch, _ = setup
    first = faulty[0]
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_run(first.run_id).info.run_name == "faulty"
    longer = tiny_cfg(cfg.data.cache_dir, f"dist.storage_path={root}", "tracking.run_name=faulty",
                      "train.epochs=3", *WORKERS)
    result = run_training(longer, log=lambda m: None)
    assert result.run_id == first.run_id  # the same MLflow run continues
    assert result.steps == 3 * per_epoch
    resumed = [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")]
    assert resumed[-1] == 2 * per_epoch  # only the third epoch was trained
