"""Ray Tune sweeps end to end on a 3-CPU local cluster: trials are real training runs (1 CPU
worker, a few steps), MLflow parent/child runs, champion promotion, failure, resume, report."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import mlflow
import pytest
import ray
from ray import tune

from conftest import ROOT
from karma.config import ConfigError
from karma.registry import alias_version
from karma.tracking import mlflow_key
from karma.tune import SweepResult, parse_space, report_sweep, run_sweep, sweep_config

# The first test's fixture runs a whole 4-trial sweep: more than the suite's default timeout
# allows on a busy 2-core machine.
pytestmark = pytest.mark.timeout(1800)

TINY = ["train.max_steps=6", "train.analysis_examples=8", "train.eval_max_users=64",
        "data.synthetic_users=150", "dist.num_workers=1", "dist.zero_stage=0", "dist.precision=fp32"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # address="local": always a fresh cluster of our own, never one someone else started.
    ray.init(num_cpus=3, address="local", include_dashboard=False)
    yield
    ray.shutdown()


def sweep(root: Path, cache_dir: str, raw: dict, resume: bool = False, callbacks=None) -> SweepResult:
    space = parse_space(raw, "test-space")
    # An explicit store per sweep: MLflow exports the last URI it was given to the environment.
    cfg = sweep_config(ROOT / "configs" / "tiny.yaml",
                       [f"dist.storage_path={root}", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
                        f"data.cache_dir={cache_dir}", *TINY], space)
    return run_sweep(space, cfg, resume=resume, log=lambda m: None, callbacks=callbacks)


def uri(result: SweepResult) -> str:
    return f"sqlite:///{result.path.parent.parent}/mlflow.db"  # the store under dist.storage_path


def client(result: SweepResult) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(uri(result))


def children(result: SweepResult) -> list:
    c = client(result)
    exp = c.get_run(result.parent_run_id).info.experiment_id
    return c.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")


ARMS = {"name": "arms", "metric": "NDCG@10", "mode": "max", "scheduler": "none",
        "arms": {"action-only": {"loss.w_gen": 0.0, "loss.w_rec": 0.0},
                 "KARMA": {"loss.w_gen": 0.5, "loss.w_rec": 0.5}},
        "seeds": [0, 1]}


@pytest.fixture(scope="module")
def arms_sweep(tmp_path_factory, cache_dir) -> SweepResult:
    return sweep(tmp_path_factory.mktemp("arms"), cache_dir, ARMS)


def test_sweep_tracks_trials_and_promotes_the_best(arms_sweep):
    r = arms_sweep
    assert not r.interrupted and len(r.trials) == 4
    assert all(t.status == "TERMINATED" and t.complete and t.model_version for t in r.trials)
    assert {(t.params["arm"], t.params["train.seed"]) for t in r.trials} == {
        (a, s) for a in ("action-only", "KARMA") for s in (0, 1)}
    c = client(r)
    parent = c.get_run(r.parent_run_id)
    assert parent.info.run_name == "arms" and parent.info.status == "FINISHED"
    kids = children(r)
    assert sorted(k.info.run_name for k in kids) == sorted(f"arms-{t.trial_id}" for t in r.trials)
    key = "valid/" + mlflow_key("NDCG@10")
    for kid in kids:
        assert kid.info.status == "FINISHED"
        assert kid.data.tags["karma.arm"] in ("action-only", "KARMA")
        assert len(c.get_metric_history(kid.info.run_id, key)) == 1  # one epoch, one point
    # The config each trial ran with is the arm's and seed's.
    by_run = {t.run_id: t for t in r.trials}
    for kid in kids:
        t = by_run[kid.info.run_id]
        want = "0.5" if t.params["arm"] == "KARMA" else "0.0"
        assert kid.data.params["loss.w_gen"] == want == kid.data.params["loss.w_rec"]
        assert kid.data.params["train.seed"] == str(t.params["train.seed"])
    # Every epoch reached Tune through the trainer's report (ASHA's input), then the final one.
    for t in r.trials:
        assert t.metrics["training_iteration"] == 2 and t.metrics["epoch"] == 1
    best = max(r.trials, key=lambda t: t.metrics["NDCG@10"])
    assert r.best.trial_id == best.trial_id
    assert alias_version("karma-tiny", "champion", uri(r)) == best.model_version
    assert r.promotion["promoted"] and r.promotion["candidate_version"] == best.model_version
    assert parent.data.tags["karma.best_version"] == best.model_version
    arts = {a.path for a in c.list_artifacts(r.parent_run_id)}
    assert {"champion.json", "trials.json", "space.json", "config.json"} <= arts


def test_ablation_report_renders_table_and_plot(arms_sweep, tmp_path):
    rep = report_sweep(arms_sweep.path, tmp_path)
    lines = rep.markdown.splitlines()
    header = next(line for line in lines if line.startswith("| arm"))
    assert all(m in header for m in ("HR@10", "NDCG@10", "sink_rate_first", "token_f1", "category_match"))
    rows = [line for line in lines if line.startswith("| action-only") or line.startswith("| KARMA")]
    assert [row.split("|")[1].strip() for row in rows] == ["action-only", "KARMA"]  # the space's order
    assert all(row.split("|")[2].strip() == "2" for row in rows)  # two seeds each
    # The cell is the mean ± sample std of the two seeds' test metric (every trial reported test/...).
    assert "test split" in lines[0]
    hr = [t.metrics["test/HR@10"] for t in arms_sweep.trials if t.params["arm"] == "KARMA"]
    cell = rows[1].split("|")[header.split("|").index(" HR@10 ")].strip()
    mean, std = (float(x) for x in cell.split("±"))
    assert mean == pytest.approx(sum(hr) / 2, abs=1e-4)
    assert std == pytest.approx(abs(hr[0] - hr[1]) / 2 ** 0.5, abs=1e-4)
    assert rep.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rep.png.stat().st_size > 5000
    arts = {a.path for a in client(arms_sweep).list_artifacts(arms_sweep.parent_run_id, "report")}
    assert {"report/arms.md", f"report/{rep.png.name}", "report/arms.json"} <= arts


def test_a_failing_trial_does_not_stop_the_sweep(tmp_path, cache_dir):
    raw = {"name": "bad", "metric": "HR@10", "mode": "max",
           "params": {"model.n_interest": {"grid": [1, 0]}},  # 0 passes load-time checks, fails its trial
           "scheduler": {"type": "asha", "grace_period": 1, "max_t": 1}}
    r = sweep(tmp_path, cache_dir, raw)
    status = {t.params["model.n_interest"]: t for t in r.trials}
    assert status[1].status == "TERMINATED" and status[1].model_version
    assert status[0].status == "ERROR" and "model.n_interest: must be at least 1" in status[0].error
    assert [t.trial_id for t in r.errored] == [status[0].trial_id]
    parent = client(r).get_run(r.parent_run_id)
    assert parent.data.tags["karma.trials_errored"] == "1"
    assert parent.data.tags["karma.trials_errored_ids"] == status[0].trial_id
    assert r.best.trial_id == status[1].trial_id and r.promotion["promoted"]


class InterruptOnce(tune.Callback):
    """Stops the sweep like Ctrl+C once the first trial has finished (once per marker file:
    Tune keeps run-config callbacks when it restores the sweep)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: stop, save state, return


def test_resume_runs_only_the_unfinished_trials(tmp_path, cache_dir):
    raw = {"name": "resumable", "metric": "NDCG@10", "mode": "max", "max_concurrent_trials": 1,
           "params": {"loss.w_gen": {"grid": [0.0, 0.25, 0.5]}}, "scheduler": "none"}
    marker = tmp_path / "interrupted"
    first = sweep(tmp_path / "runs", cache_dir, raw, callbacks=[InterruptOnce(str(marker))])
    assert first.interrupted and first.promotion is None
    done = [t for t in first.trials if t.status == "TERMINATED"]
    assert [t.trial_id for t in done] == [marker.read_text()] and done[0].model_version
    with pytest.raises(ConfigError, match="is not finished; resume it"):
        report_sweep(first.path)
    assert client(first).get_run(first.parent_run_id).info.status == "KILLED"

    second = sweep(tmp_path / "runs", cache_dir, raw, resume=True)
    assert not second.interrupted and second.parent_run_id == first.parent_run_id
    assert [t.status for t in second.trials] == ["TERMINATED"] * 3
    again = next(t for t in second.trials if t.trial_id == done[0].trial_id)
    assert again.run_id == done[0].run_id and again.model_version == done[0].model_version
    # One registered version per trial: the finished one did not train (and register) again.
    versions = client(second).search_model_versions("name = 'karma-tiny'")
    assert sorted(v.run_id for v in versions) == sorted(t.run_id for t in second.trials)
    assert len(children(second)) == 3
    assert alias_version("karma-tiny", "champion", uri(second)) == second.best.model_version


def test_a_new_sweep_refuses_an_existing_name(arms_sweep, cache_dir):
    with pytest.raises(ConfigError, match="already exists .* pass --resume"):
        sweep(arms_sweep.path.parent.parent, cache_dir, ARMS)
