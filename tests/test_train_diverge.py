"""A diverging Ray job: the weights turn to NaN inside epoch 2 (an injected fault). The loop's
finite-loss guard stops the job at the next step with a named error and no retry, nothing from
the diverged epoch is checkpointed, and the run resumes from epoch 1's checkpoint when rerun."""

from __future__ import annotations

import mlflow
import pytest
import ray

from conftest import tiny_cfg
from karma.pipeline import prepare
from karma.train.loop import NonFiniteLoss, steps_plan
from karma.train.ray_job import run_training
from karma.train.worker import FAULT_ENV

ONE_WORKER = ("dist.num_workers=1", "dist.zero_stage=0", "dist.precision=fp32", "train.epochs=2",
              "train.analysis_examples=0", "train.eval_max_users=100", "tracking.register=false",
              "tracking.run_name=diverging")


@pytest.fixture(scope="module")
def session(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("diverge")
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={root}", *ONE_WORKER)
    per_epoch, _ = steps_plan(cfg.train, len(prepare(cfg.data, log=lambda m: None).split.train))
    ray.init(address="local", num_cpus=2,
             runtime_env={"env_vars": {FAULT_ENV: f"{per_epoch + 2}:{root / 'nan'}:nan", "OMP_NUM_THREADS": "1"}})
    yield cfg, root, per_epoch
    ray.shutdown()


def test_a_nan_stops_the_job_and_keeps_the_last_good_checkpoint(session):
    cfg, root, per_epoch = session
    with pytest.raises(NonFiniteLoss, match=rf"not finite \(NaN or inf\) at step {per_epoch + 3}, in epoch 2"):
        run_training(cfg, log=lambda m: None)
    assert (root / "nan").read_text() == str(per_epoch + 2)  # the fault happened, once
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                             filter_string="attributes.run_name = 'diverging'")[0]
    assert run.info.status == "FAILED"
    # The rerun (the fault's marker is there: it does not fire again) resumes from epoch 1's
    # checkpoint, the last good one, and finishes.
    result = run_training(cfg, log=lambda m: None)
    assert result.run_id == run.info.run_id and result.steps == 2 * per_epoch
    resumed = [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")]
    assert resumed == [per_epoch]
