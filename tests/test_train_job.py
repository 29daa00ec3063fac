"""End to end: the Ray Train + DeepSpeed job on 2 CPU workers, MLflow run, registry, export."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray

from conftest import ROOT, tiny_cfg
from karma.config import ConfigError
from karma.export import load_export
from karma.tracking import mlflow_key
from karma.train.ray_job import check_resources, init_ray, run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("job")
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={root}", "tracking.run_name=e2e", "train.epochs=2",
                   "dist.num_workers=2", "dist.zero_stage=2", "dist.precision=bf16", "train.log_every=10")
    init_ray(cfg)
    yield cfg, run_training(cfg, log=lambda m: None), root
    ray.shutdown()


def test_job_trains_tracks_and_registers(trained):
    cfg, result, root = trained
    steps_per_epoch = result.steps // 2
    assert result.steps == 2 * steps_per_epoch > 0
    assert result.metrics["epoch"] == 2 and 0 < result.metrics["HR@10"] <= 1
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["dist.zero_stage"] == "2" and run.data.params["dist.precision"] == "bf16"
    curve = client.get_metric_history(result.run_id, "valid/" + mlflow_key("HR@10"))
    assert [m.step for m in curve] == [steps_per_epoch, 2 * steps_per_epoch]
    # the test split once, after the last epoch, with its long tail
    assert 0 <= result.metrics["test/HR@10"] <= 1 and "test/tail/HR@10" in result.metrics
    test_curve = client.get_metric_history(result.run_id, "test/" + mlflow_key("HR@10"))
    assert [(m.step, m.value) for m in test_curve] == [(2 * steps_per_epoch, result.metrics["test/HR@10"])]
    assert client.get_metric_history(result.run_id, "train/loss_action")  # losses as they happen
    assert client.get_metric_history(result.run_id, "train/tokens_per_s")
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"config.json", "report/eval_report.json", "report/hr_at_k.png",
            "report/interest_attention.png"} <= artifacts
    # the final checkpoint is Ray's persisted one, hard-linked (not a second copy on the same disk)
    assert result.checkpoint_dir.name == "final" and (result.export_dir / "meta.json").stat().st_nlink == 2
    version = client.get_model_version_by_alias(cfg.tracking.experiment, cfg.tracking.alias)
    assert str(version.version) == result.model_version and version.run_id == result.run_id


def test_export_reloads_to_the_trained_interests(trained):
    _, result, _ = trained
    export = result.export_dir
    probe = pd.read_parquet(export / "probe_examples.parquet")
    want = np.load(export / "probe_interests.npy")
    model = load_export(export)  # the trained dtype (bf16), so the same arithmetic
    got = model.interests([list(h) for h in probe["history"]])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    meta = json.loads((export / "meta.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["n_items"] == len(model.items)


@pytest.mark.parametrize("overrides, needle", [
    (["train.bogus=1"], "unknown key(s) ['bogus'] in train"),
    (["dist.zero_stage=4"], "dist.zero_stage: 4 is not a ZeRO stage"),
])
def test_bad_configs_fail_fast(overrides, needle, capsys):
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    from train import main

    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]) == 2
    assert needle in capsys.readouterr().err


def test_more_workers_than_cpus(trained, cache_dir):
    cfg = tiny_cfg(cache_dir, "dist.num_workers=8")
    with pytest.raises(ConfigError, match=r"dist.num_workers=8 .* needs 9 CPUs but the cluster has"):
        check_resources(cfg)
