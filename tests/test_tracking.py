"""karma.tracking against a real MLflow sqlite store in a temporary folder."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from karma.tracking import (
    PARAM_VALUE_MAX,
    ParamConflictError,
    RunTracker,
    flatten,
    mlflow_key,
    resolve_tracking_uri,
)


def test_resolve_tracking_uri_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow.internal:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = resolve_tracking_uri(None, tmp_path / "new" / "dir")
    assert uri == f"sqlite:///{(tmp_path / 'new' / 'dir').resolve()}/mlflow.db"
    assert (tmp_path / "new" / "dir").is_dir()


def test_flatten_nested_lists_and_long_values() -> None:
    flat = flatten({"train": {"lr": 0.001, "epochs": 3}, "model": {"ks": [1, 5], "opt": {}},
                    "name": "x" * (PARAM_VALUE_MAX + 10), "flag": True, "none": None})
    assert flat["train.lr"] == "0.001"
    assert flat["train.epochs"] == "3"
    assert flat["model.ks"] == "[1, 5]"
    assert flat["model.opt"] == "{}"
    assert flat["flag"] == "True" and flat["none"] == "None"
    assert len(flat["name"]) == PARAM_VALUE_MAX
    assert all(isinstance(v, str) for v in flat.values())


def test_mlflow_key() -> None:
    assert mlflow_key("valid/HR@10") == "valid/HR_at_10"
    assert mlflow_key("a:b,c") == "a_b_c"


def test_params_metrics_artifacts_and_status(uri: str, store: Path, tmp_path: Path) -> None:
    with RunTracker("exp", "job-a", uri, tags={"stage": "test"}) as tr:
        run_id = tr.run_id
        assert tr.log_params({"train": {"lr": 0.01, "ks": [10, 20]}}) == {
            "train.lr": "0.01", "train.ks": "[10, 20]"}
        # Same values again: nothing new, no error. A changed value is refused by name.
        assert tr.log_params({"train": {"lr": 0.01}}) == {}
        with pytest.raises(ParamConflictError, match="train.lr"):
            tr.log_params({"train": {"lr": 0.02}})
        for step in range(3):
            logged = tr.log_metrics({"loss": 1.0 / (step + 1), "HR@10": np.float32(0.1 * step),
                                     "text": "x", "flag": True}, step=step)
            assert set(logged) == {"loss", "HR_at_10"}  # non-numbers are left out
        tr.log_dict({"a": 1}, "cfg/config.json")
        tr.log_text("hello", "notes.txt")
        (tmp_path / "f.txt").write_text("file")
        tr.log_artifact(tmp_path / "f.txt", "files")
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            tr.log_artifact(tmp_path / "missing.txt")
        import matplotlib.figure

        tr.log_figure(matplotlib.figure.Figure(), "plots/empty.png")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.01", "train.ks": "[10, 20]"}
    assert run.data.tags["stage"] == "test"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert [m.step for m in client.get_metric_history(run_id, "HR_at_10")] == [0, 1, 2]
    assert "text" not in run.data.metrics and "flag" not in run.data.metrics
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"cfg", "notes.txt", "files", "plots"} <= names
    # Artifacts sit next to the sqlite file, not in the current directory.
    assert not (tmp_path / "mlruns").exists()
    assert (store / "mlartifacts").is_dir()


def test_nan_and_inf_metrics_reach_mlflow(uri: str) -> None:
    """A diverging loss must be visible in MLflow, not silently missing from the curve."""
    with RunTracker("exp", "job-nan", uri) as tr:
        logged = tr.log_metrics({"loss": float("nan"), "grad_norm": math.inf, "neg": -math.inf,
                                 "t": np.float32("nan")}, step=3)
        assert set(logged) == {"loss", "grad_norm", "neg", "t"}
    client = MlflowClient(uri)
    [loss] = client.get_metric_history(tr.run_id, "loss")
    assert loss.step == 3 and math.isnan(loss.value)
    assert math.isnan(client.get_metric_history(tr.run_id, "t")[0].value)
    # MLflow's SQL store keeps NaN and stores +-inf as the largest float
    assert client.get_metric_history(tr.run_id, "grad_norm")[0].value >= 1.7e308
    assert client.get_metric_history(tr.run_id, "neg")[0].value <= -1.7e308


def test_failed_block_marks_run_failed(uri: str) -> None:
    with pytest.raises(RuntimeError):
        with RunTracker("exp", "job-fail", uri) as tr:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(tr.run_id).info.status == "FAILED"


def test_resume_by_name_and_fresh_run(uri: str) -> None:
    first = RunTracker("exp", "job-r", uri)
    first.log_params({"lr": 1})
    first.log_metrics({"loss": 2.0}, step=0)
    first.end("FAILED")
    again = RunTracker("exp", "job-r", uri)
    assert again.resumed and again.run_id == first.run_id
    assert MlflowClient(uri).get_run(again.run_id).info.status == "RUNNING"
    assert again.log_params({"lr": 1}) == {}  # identical on resume: skipped
    with pytest.raises(ParamConflictError, match="'lr'"):
        again.log_params({"lr": 2})
    assert again.log_params({"lr": 2, "epochs": 5}, on_conflict="tag") == {"epochs": "5"}
    resumed = MlflowClient(uri).get_run(again.run_id).data
    assert resumed.params == {"lr": "1", "epochs": "5"}
    assert resumed.tags["param_changed.lr"] == "2"
    again.log_metrics({"loss": 1.0}, step=1)
    again.end()
    steps = [m.step for m in MlflowClient(uri).get_metric_history(first.run_id, "loss")]
    assert steps == [0, 1]
    fresh = RunTracker("exp", "job-r", uri, resume=False)
    assert not fresh.resumed and fresh.run_id != first.run_id
    fresh.end()


def test_nested_child_under_parent(uri: str) -> None:
    parent = RunTracker("sweep", "sweep-1", uri)
    child = RunTracker("sweep", "trial-0", uri, parent_run_id=parent.run_id)
    client = MlflowClient(uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    # Resuming the child finds it again; a top-level run of the same name is a different run.
    child.end()
    assert RunTracker("sweep", "trial-0", uri, parent_run_id=parent.run_id).run_id == child.run_id
    top = RunTracker("sweep", "trial-0", uri)
    assert top.run_id != child.run_id
    assert "mlflow.parentRunId" not in client.get_run(top.run_id).data.tags
    # The parent is still running: children never touch the global active run.
    assert client.get_run(parent.run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None


