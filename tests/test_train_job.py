"""End to end: the Ray Train + DeepSpeed job on 2 CPU workers, MLflow run, registry, export.
The main run is made to peak early (its learning rate keeps rising) and fails once after its
first checkpoint: it must stop early, resume, and test, export and register the best epoch's
weights. SASRec runs through the same job."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
from safetensors.torch import load_file

from conftest import ROOT, tiny_cfg
from karma.config import ConfigError
from karma.data import DataError, Examples, read_examples
from karma.evaluate import validation_subset
from karma.export import load_export
from karma.pipeline import prepare
from karma.retrieval import evaluate_retrieval
from karma.tracking import mlflow_key
from karma.train.loop import steps_plan
from karma.train.ray_job import check_arch, check_resources, resume_conflicts, run_training
from karma.train.worker import FAULT_ENV

EPOCHS = 4
# Linear warm-up over far more steps than the run has: the learning rate keeps rising, so
# validation NDCG@10 peaks early and early stopping (patience 1) ends the run before EPOCHS.
PEAKING = ("train.lr=100", "train.warmup_steps=10000", "train.early_stop_patience=1")
SASREC = ("model.arch=sasrec", "model.sasrec_hidden=32", "model.sasrec_heads=2", "data.text_encoder=none")


@pytest.fixture(scope="module")
def session(tmp_path_factory, cache_dir):
    """One Ray session; a worker of the main run raises once inside epoch 2 (after epoch 1's
    checkpoint). The SASRec run is too short to reach that step."""
    root = tmp_path_factory.mktemp("job")
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={root}", "tracking.run_name=e2e", f"train.epochs={EPOCHS}",
                   "dist.num_workers=2", "dist.zero_stage=2", "dist.precision=bf16", "train.log_every=10", *PEAKING)
    per_epoch, _ = steps_plan(cfg.train, len(prepare(cfg.data, log=lambda m: None).split.train), cfg.dist.num_workers)
    ray.init(address="local", num_cpus=3,
             runtime_env={"env_vars": {FAULT_ENV: f"{per_epoch + 2}:{root / 'fault'}", "OMP_NUM_THREADS": "1"}})
    yield cfg, root, per_epoch
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(session):
    cfg, root, per_epoch = session
    return cfg, run_training(cfg, log=lambda m: None), root, per_epoch


def _export_metrics(export, examples: Examples) -> dict:
    model = load_export(export)
    frame = examples.to_frame()
    z = model.interests([list(h) for h in frame["history"]])
    return evaluate_retrieval(z, np.array(model.item_emb), frame["target"].to_numpy(), ks=(10,))


def test_job_trains_tracks_and_registers(trained):
    cfg, result, root, per_epoch = trained
    epochs = result.metrics["epoch"]
    assert (root / "fault").is_file()  # a worker failed once; the job resumed
    assert result.steps == epochs * per_epoch > 0 and 0 < result.metrics["HR@10"] <= 1
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["dist.zero_stage"] == "2" and run.data.params["dist.precision"] == "bf16"
    # what each stage cost: the data task's seconds and memory, and every worker's peak RSS
    data = result.data
    rounding = 0.005 * (len(data["stages"]) + 1)  # the total and each stage are rounded to 0.01 s
    assert data["n_events"] > data["n_users"] > 0 and data["seconds"] >= sum(data["stages"].values()) - rounding
    assert data["peak_rss_mb"] > 0 and run.data.metrics["cost/data_peak_rss_mb"] == data["peak_rss_mb"]
    for rank in range(cfg.dist.num_workers):
        rss = [result.metrics[f"cost/rank{rank}/rss_mb/{stage}"] for stage in ("setup", "train", "test")]
        assert 0 < rss[0] <= rss[1] <= rss[2], rss  # peaks only grow
    assert result.metrics["cost/test_seconds"] > 0 and run.data.metrics["cost/test_seconds"] > 0
    assert [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")] == [per_epoch]
    curve = client.get_metric_history(result.run_id, "valid/" + mlflow_key("HR@10"))
    assert sorted(m.step for m in curve) == [per_epoch * (e + 1) for e in range(epochs)]
    # the test split once, after the last epoch, with its long tail
    assert 0 <= result.metrics["test/HR@10"] <= 1 and "test/tail/HR@10" in result.metrics
    test_curve = client.get_metric_history(result.run_id, "test/" + mlflow_key("HR@10"))
    assert [(m.step, m.value) for m in test_curve] == [(epochs * per_epoch, result.metrics["test/HR@10"])]
    assert client.get_metric_history(result.run_id, "train/loss_action")  # losses as they happen
    assert client.get_metric_history(result.run_id, "train/tokens_per_s")
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"config.json", "report/eval_report.json", "report/hr_at_k.png", "report/interest_attention.png",
            "report/valid_ndcg_at_10.png", "report/provenance.json"} <= artifacts
    # the final checkpoint is Ray's persisted one, hard-linked (not a second copy on the same disk)
    assert result.checkpoint_dir.name == "final" and (result.export_dir / "meta.json").stat().st_nlink == 2
    version = client.get_model_version_by_alias(cfg.tracking.experiment, cfg.tracking.alias)
    assert str(version.version) == result.model_version and version.run_id == result.run_id
    assert float(version.tags["metric." + mlflow_key("NDCG@10")]) == result.metrics["NDCG@10"]


def test_early_stop_ends_the_job_before_its_epochs(trained):
    cfg, result, root, per_epoch = trained
    epochs, best = result.metrics["epoch"], result.metrics["best_epoch"]
    assert epochs < EPOCHS, "the rising learning rate no longer makes NDCG@10 peak early"
    assert best == epochs - 1  # patience 1: the first epoch without a gain is the last
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    ndcg = [m.value for m in sorted(client.get_metric_history(result.run_id, "valid/" + mlflow_key("NDCG@10")),
                                    key=lambda m: m.step)]
    assert len(ndcg) == epochs and int(np.argmax(ndcg)) + 1 == best
    assert result.metrics["NDCG@10"] == max(ndcg) > ndcg[-1]  # the report carries the best epoch's


def test_test_split_export_and_registry_hold_the_best_epochs_weights(trained):
    cfg, result, root, _ = trained
    data = root / "e2e" / "data"
    splits = read_examples(data)  # what the workers read: valid is the validation subset
    valid, test = splits["valid"], splits["test"]
    again = _export_metrics(result.export_dir, valid)
    # the exported weights score what the best epoch scored, not what the last one did
    assert again["NDCG@10"] == pytest.approx(result.metrics["NDCG@10"], abs=1e-4)
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    last = max(client.get_metric_history(result.run_id, "valid/" + mlflow_key("NDCG@10")), key=lambda m: m.step)
    assert abs(again["NDCG@10"] - last.value) > 5e-3
    assert _export_metrics(result.export_dir, test)["NDCG@10"] == pytest.approx(result.metrics["test/NDCG@10"],
                                                                                abs=1e-4)
    report = json.loads((result.checkpoint_dir / "report" / "eval_report.json").read_text())
    assert report["best_epoch"] == result.metrics["best_epoch"] and report["NDCG@10"] == result.metrics["NDCG@10"]


def test_export_reloads_to_the_trained_interests(trained):
    _, result, _, _ = trained
    export = result.export_dir
    probe = pd.read_parquet(export / "probe_examples.parquet")
    want = np.load(export / "probe_interests.npy")
    model = load_export(export)  # the trained dtype (bf16), so the same arithmetic
    got = model.interests([list(h) for h in probe["history"]])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    meta = json.loads((export / "meta.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["n_items"] == len(model.items)


def test_item_text_table_is_computed_once_and_loaded_by_every_worker(trained, cache_dir):
    """The job's text task stored the catalogue's MiniLM table once under the storage root, and
    the export carries it. A second run over the same catalogue finds it (the file is not
    rewritten), and both its workers build their models from that file: planted with its rows
    rolled by one, which no encoder would produce, the rolled rows are in the export, and the
    job's validation (each worker scores its own slice of users) is what the export scores."""
    _, result, root, _ = trained
    tables = list((root / "text").glob("text-minilm-*.npy"))
    assert len(tables) == 1, tables
    table = tables[0]
    assert sorted(p.name for p in (root / "text").iterdir()) == [table.name, table.name + ".lock"]
    stored = np.load(table)
    np.testing.assert_array_equal(load_file(str(result.export_dir / "model.safetensors"))["items.text_emb"].numpy(),
                                  stored)
    planted = np.roll(stored, 1, axis=0)
    np.save(table, planted)
    written = table.stat().st_mtime_ns
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={root}", "tracking.run_name=e2e-text", "dist.num_workers=2",
                   "train.max_steps=2", "train.analysis_examples=0", "tracking.register=false")
    logs = []
    again = run_training(cfg, log=logs.append)
    assert f"item text embeddings found at {table}" in logs
    assert table.stat().st_mtime_ns == written and list((root / "text").glob("text-minilm-*.npy")) == [table]
    np.testing.assert_array_equal(load_file(str(again.export_dir / "model.safetensors"))["items.text_emb"].numpy(),
                                  planted)
    valid = validation_subset(prepare(cfg.data, log=lambda m: None).split.valid, cfg.train.eval_max_users)
    assert _export_metrics(again.export_dir, valid)["NDCG@10"] == pytest.approx(again.metrics["NDCG@10"], abs=1e-4)


def test_sasrec_through_the_ray_job(session, cache_dir):
    _, root, _ = session
    cfg = tiny_cfg(cache_dir, *SASREC, f"dist.storage_path={root}", "tracking.run_name=sasrec", "train.epochs=2",
                   "train.lr=5e-3", "train.batch_size=128", "dist.num_workers=1", "dist.zero_stage=0",
                   "dist.precision=fp32")
    logs = []
    result = run_training(cfg, log=logs.append)
    assert result.metrics["epoch"] == 2 and 1 <= result.metrics["best_epoch"] <= 2
    assert 0 < result.metrics["test/HR@10"] <= 1 and result.metrics["test/n_queries"] == 300
    assert "sink_rate_first" not in result.metrics  # no language model to analyse
    assert result.export_dir is None and result.model_version is None
    assert any("no inference export and no registration" in m for m in logs)
    report = {a.path for a in mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").list_artifacts(result.run_id,
                                                                                                 "report")}
    assert {"report/eval_report.json", "report/hr_at_k.png", "report/valid_ndcg_at_10.png",
            "report/provenance.json"} == report
    prov = json.loads((result.checkpoint_dir / "report" / "provenance.json").read_text())
    assert prov["config"] == cfg.to_dict() and prov["data_files"] == {}  # synthetic: no data files


@pytest.mark.parametrize("overrides, needle", [
    (["train.bogus=1"], "unknown key(s) ['bogus'] in train"),
    (["dist.zero_stage=4"], "dist.zero_stage: 4 is not a ZeRO stage"),
    (["model.arch=sasrec", "dist.zero_stage=3"], "model.arch=sasrec: dist.zero_stage=3 is not supported"),
])
def test_bad_configs_fail_fast(overrides, needle, capsys):
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    from train import main

    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [["dist.activation_checkpointing=true"], ["dist.compile=decoder"]])
def test_sasrec_refuses_backbone_settings(cache_dir, overrides):
    with pytest.raises(ConfigError, match="model.arch=sasrec"):
        check_arch(tiny_cfg(cache_dir, *SASREC, *overrides))


def test_more_workers_than_cpus(session, cache_dir):
    cfg = tiny_cfg(cache_dir, "dist.num_workers=8")
    with pytest.raises(ConfigError, match=r"dist.num_workers=8 .* needs 9 CPUs but the cluster has"):
        check_resources(cfg)


def _main(argv: list[str]) -> int:
    import sys

    sys.path.insert(0, str(ROOT / "jobs"))
    from train import main

    return main(argv)


def _config_file(path, cfg, **changes) -> str:
    """`cfg` as a YAML file, with {"section.key": value} changes."""
    import yaml

    values = cfg.to_dict()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        values[section][key] = value
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_rerun_with_a_changed_config_is_refused(trained, tmp_path, capsys):
    """The same tracking.run_name with another learning rate and fewer epochs would resume the old
    checkpoints and MLflow run (and register those weights under the new settings): refused by
    name, before anything runs, and the finished run is left as it was."""
    cfg, result, root, _ = trained
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    before = client.get_run(result.run_id)
    changed = _config_file(tmp_path / "changed.yaml", cfg, **{"train.lr": 0.5, "train.epochs": 2})
    assert _main(["--config", changed]) == 2
    err = capsys.readouterr().err
    assert "config error: tracking.run_name='e2e' already has checkpoints" in err
    assert "['train.epochs', 'train.lr']" in err and "train.lr: '100.0' -> '0.5'" in err
    assert "Choose a new tracking.run_name" in err
    after = client.get_run(result.run_id)
    assert after.info.status == "FINISHED" and after.data.params == before.data.params
    assert not any(k.startswith("param_changed.") for k in after.data.tags)
    assert len(client.search_runs([after.info.experiment_id], "attributes.run_name = 'e2e'")) == 1


def test_resume_conflicts_lets_only_epochs_and_max_steps_grow():
    base = {"train.epochs": "4", "train.max_steps": "100", "train.lr": "0.1"}
    assert resume_conflicts(base, {**base, "train.epochs": "6", "train.max_steps": "0"}) == []  # 0: no cap
    assert resume_conflicts(base, {**base, "train.epochs": "3"}) == ["train.epochs"]
    assert resume_conflicts({**base, "train.max_steps": "0"}, {**base, "train.max_steps": "500"}) == [
        "train.max_steps"]
    assert resume_conflicts(base, {**base, "train.lr": "0.2", "model.new": "1"}) == ["model.new", "train.lr"]


def test_data_error_in_the_ray_task_exits_2_naming_it(session, cache_dir, tmp_path, capsys):
    """A DataError raised inside the Ray data task reaches the job as itself (not Ray's wrapper):
    exit code 2 and the error's own message. Fixing the data under the same run name is then no
    'changed config' refusal: that attempt left no checkpoint, so it just gets a new MLflow run."""
    _, root, _ = session
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_cfg(cache_dir, f"dist.storage_path={root}", "tracking.run_name=bad-data", "data.source=parquet",
                   f"data.path={empty}")
    with pytest.raises(DataError, match=r"items\.parquet: file not found") as info:
        run_training(cfg, log=lambda m: None)
    assert not isinstance(info.value, ray.exceptions.RayTaskError)
    other = tmp_path / "other"
    other.mkdir()
    assert _main(["--config", _config_file(tmp_path / "bad.yaml", cfg, **{"data.path": str(other)})]) == 2
    err = capsys.readouterr().err
    assert f"data error: {other}/items.parquet: file not found" in err and "Traceback" not in err
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id,
                              "attributes.run_name = 'bad-data'")
    assert sorted(r.data.params["data.path"] for r in runs) == sorted([str(empty), str(other)])
    assert {r.info.status for r in runs} == {"FAILED"}
