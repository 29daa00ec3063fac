"""Fault tolerance: a worker raises mid-run once; Ray Train restarts the group, the job resumes
from the last checkpoint and ends at the same step count as an uninterrupted run. Rerunning
the same named job resumes it too."""

from __future__ import annotations

import mlflow
import pytest
import ray

from conftest import tiny_cfg
from karma.pipeline import prepare
from karma.tracking import mlflow_key
from karma.train.ray_job import run_training, steps_plan
from karma.train.worker import FAULT_ENV


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("fault")
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={root}", "tracking.run_name=faulty", "train.epochs=2",
                   "dist.num_workers=2", "dist.zero_stage=1", "train.analysis_examples=0",
                   "train.eval_max_users=100", "tracking.register=false")
    per_epoch, total = steps_plan(cfg, len(prepare(cfg.data, log=lambda m: None).split.train))
    marker = root / "fault-happened"
    fail_at = per_epoch + 2  # inside epoch 2, after epoch 1's checkpoint
    ray.init(address="local", num_cpus=3,
             runtime_env={"env_vars": {FAULT_ENV: f"{fail_at}:{marker}", "OMP_NUM_THREADS": "1"}})
    yield cfg, root, marker, fail_at, per_epoch, total
    ray.shutdown()


def test_worker_failure_resumes_from_checkpoint(setup):
    cfg, root, marker, fail_at, per_epoch, total = setup
    result = run_training(cfg, log=lambda m: None)
    assert marker.read_text() == str(fail_at)  # the fault really happened
    assert result.steps == total == 2 * per_epoch  # same count as an uninterrupted run
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    resumed = client.get_metric_history(result.run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] == [per_epoch]  # restarted from epoch 1's checkpoint, not 0
    curve = client.get_metric_history(result.run_id, "valid/" + mlflow_key("HR@10"))
    assert sorted(m.step for m in curve) == [per_epoch, 2 * per_epoch]


def test_rerun_of_the_same_named_job_resumes(setup):
    cfg, root, _, _, per_epoch, _ = setup
    first = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").search_runs(
        ["1"], filter_string="attributes.run_name = 'faulty'")[0]
    longer = tiny_cfg(cfg.data.cache_dir, f"dist.storage_path={root}", "tracking.run_name=faulty",
                      "train.epochs=3", "dist.num_workers=2", "dist.zero_stage=1", "train.analysis_examples=0",
                      "train.eval_max_users=100", "tracking.register=false")
    result = run_training(longer, log=lambda m: None)
    assert result.run_id == first.info.run_id  # the same MLflow run continues
    assert result.steps == 3 * per_epoch
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    resumed = [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")]
    assert resumed[-1] == 2 * per_epoch  # only the third epoch was trained
