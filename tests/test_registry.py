"""karma.registry against a real MLflow sqlite registry: versions, aliases, promotion and the
download cache (with stand-in export folders), and the registered model itself: a tiny KARMA
export registered with "models from code" loads through `mlflow.pyfunc.load_model` in a fresh process that
refuses to unpickle models (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) and predicts what the
export computes; nothing in the model version is a pickle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from conftest import ROOT, tiny_cfg
from karma.export import export_model, load_export
from karma.factory import build_model
from karma.pipeline import prepare
from karma.registry import alias_version, export_dir_of, metric_tags, promote_if_better, register_export, set_alias
from karma.tracking import RunTracker

PICKLE_MAGIC = {bytes([0x80, p]) for p in range(2, 6)}  # protocol 2-5 header


@pytest.fixture(scope="module")
def registered(tmp_path_factory, cache_dir):
    """A freshly built (untrained) tiny KARMA model, exported and registered as version 1."""
    tmp = tmp_path_factory.mktemp("registry")
    cfg = tiny_cfg(cache_dir)
    items = prepare(cfg.data, log=lambda m: None).data.items
    model, tok = build_model(cfg, items, log=lambda m: None)
    export = export_model(model.eval(), tok, cfg, items, tmp / "export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with RunTracker("registry-test", "v1", uri) as tracker:
        version = register_export(tracker, export, "karma-code", "champion")
    return uri, export, version, tmp


def test_registered_model_loads_from_code_and_predicts(registered):
    uri, export, version, tmp = registered
    histories = [[1, 2, 3], [5, 8], [13]]
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])\n"
        "model = mlflow.pyfunc.load_model('models:/karma-code@champion')\n"
        "print(json.dumps(model.predict(pd.DataFrame({'history': json.loads(sys.argv[2])}))))\n"
    )
    # MLflow unpickles pyfunc models by default; refused here, a pickled model fails to load
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "PYTHONPATH": str(ROOT / "platform")}
    out = subprocess.run([sys.executable, "-c", code, uri, json.dumps(histories)], capture_output=True,
                         text=True, env=env, cwd=tmp, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    want = load_export(export).interests(histories)
    assert got.shape == (len(histories), want[0].size)
    np.testing.assert_allclose(got, want.reshape(len(histories), -1), atol=1e-5)


def test_model_version_holds_code_and_no_pickle(registered):
    uri, _, version, tmp = registered
    local = Path(download_artifacts(artifact_uri=f"models:/karma-code/{version}", dst_path=str(tmp / "dl"),
                                    tracking_uri=uri, registry_uri=uri))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / Path(flavor["model_code_path"]).name).read_text().startswith('"""The registered model')
    files = [f for f in local.rglob("*") if f.is_file()]
    assert (local / flavor["artifacts"]["export"]["path"] / "model.safetensors").is_file()
    pickles = [f.relative_to(local) for f in files
               if f.suffix in (".pkl", ".pickle") or f.read_bytes()[:2] in PICKLE_MAGIC]
    assert pickles == []


def test_metric_tags() -> None:
    assert metric_tags({"NDCG@10": 0.25}) == {"metric.NDCG_at_10": "0.25"}


def _export(folder: Path, payload: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"d": 4}')
    (folder / "weights").mkdir()
    (folder / "weights" / "model.bin").write_text(payload)
    return folder


def test_register_versions_alias_and_download(uri: str, tmp_path: Path) -> None:
    tr = RunTracker("exp", "job-reg", uri)
    v1 = register_export(tr, _export(tmp_path / "e1", "one"), "karma-test", "latest",
                         tags=metric_tags({"HR@10": 0.2}))
    v2 = register_export(tr, _export(tmp_path / "e2", "two"), "karma-test", "latest")
    assert (v1, v2) == ("1", "2")
    # MLflow reserves "latest" for the newest version: never stored, always resolved.
    assert alias_version("karma-test", "latest", uri) == "2"
    assert "latest" not in MlflowClient(uri, uri).get_registered_model("karma-test").aliases
    with pytest.raises(ValueError, match="reserved"):
        set_alias("karma-test", "latest", "1", uri)
    assert alias_version("karma-test", "champion", uri) is None
    assert alias_version("no-such-model", "latest", uri) is None
    client = MlflowClient(uri, uri)
    mv1 = client.get_model_version("karma-test", "1")
    assert mv1.run_id == tr.run_id and mv1.tags["metric.HR_at_10"] == "0.2"
    assert client.get_run(tr.run_id).info.status == "RUNNING"  # registration does not end it

    latest = export_dir_of("karma-test", "latest", uri, cache_dir=tmp_path / "cache")
    assert (latest / "weights" / "model.bin").read_text() == "two"
    assert (latest / "config.json").read_text() == '{"d": 4}'
    first = export_dir_of("karma-test", "1", uri, cache_dir=tmp_path / "cache")
    assert (first / "weights" / "model.bin").read_text() == "one"
    # Cached: a second call returns the same folder without downloading again.
    assert export_dir_of("karma-test", "2", uri, cache_dir=tmp_path / "cache") == latest

    set_alias("karma-test", "champion", "1", uri)
    assert alias_version("karma-test", "champion", uri) == "1"
    with pytest.raises(LookupError, match="no version '9'"):
        set_alias("karma-test", "champion", "9", uri)
    with pytest.raises(LookupError, match="no alias 'nope'"):
        export_dir_of("karma-test", "nope", uri, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="export_dir"):
        register_export(tr, tmp_path / "absent", "karma-test", None)
    tr.end()


@pytest.mark.parametrize("mode,better,worse", [("max", 0.5, 0.1), ("min", 0.1, 0.5)])
def test_promote_if_better(uri: str, tmp_path: Path, mode: str, better: float,
                           worse: float) -> None:
    tr = RunTracker("exp", f"job-{mode}", uri)
    name = f"karma-{mode}"
    versions = [register_export(tr, _export(tmp_path / f"e{i}", str(i)), name, "latest",
                                tags=metric_tags({"NDCG@10": v}))
                for i, v in enumerate([0.3, better, worse])]

    first = promote_if_better(name, "champion", versions[0], "NDCG@10", 0.3, mode, uri)
    assert first["promoted"] and first["incumbent_version"] is None
    assert alias_version(name, "champion", uri) == versions[0]

    up = promote_if_better(name, "champion", versions[1], "NDCG@10", better, mode, uri)
    assert up["promoted"] and up["incumbent_version"] == versions[0]
    assert up["incumbent_value"] == pytest.approx(0.3)
    assert alias_version(name, "champion", uri) == versions[1]

    down = promote_if_better(name, "champion", versions[2], "NDCG@10", worse, mode, uri)
    assert not down["promoted"] and down["incumbent_value"] == pytest.approx(better)
    assert alias_version(name, "champion", uri) == versions[1]

    tie = promote_if_better(name, "champion", versions[2], "NDCG@10", better, mode, uri)
    assert not tie["promoted"]  # equal is not strictly better
    nan = promote_if_better(name, "champion", versions[2], "NDCG@10", float("nan"), mode, uri)
    assert not nan["promoted"]
    assert alias_version(name, "champion", uri) == versions[1]
    assert set(up) >= {"promoted", "candidate_version", "candidate_value", "incumbent_version",
                       "incumbent_value", "metric", "mode"}
    with pytest.raises(ValueError, match="mode"):
        promote_if_better(name, "champion", versions[2], "NDCG@10", 1.0, "best", uri)
    tr.end()


def test_promote_reads_run_metric_when_tag_missing(uri: str, tmp_path: Path) -> None:
    tr = RunTracker("exp", "job-runmetric", uri)
    tr.log_metrics({"NDCG@10": 0.4}, step=0)
    v1 = register_export(tr, _export(tmp_path / "a", "a"), "karma-run", "champion")
    other = RunTracker("exp", "job-runmetric-2", uri)
    v2 = register_export(other, _export(tmp_path / "b", "b"), "karma-run", None)
    rec = promote_if_better("karma-run", "champion", v2, "NDCG@10", 0.35, "max", uri)
    assert rec["incumbent_version"] == v1 and rec["incumbent_value"] == pytest.approx(0.4)
    assert not rec["promoted"] and alias_version("karma-run", "champion", uri) == v1


def test_export_dir_of_in_a_fresh_process(uri: str, tmp_path: Path) -> None:
    """A new process (a Serve replica, say) has no global MLflow URIs set beforehand."""
    import subprocess
    import sys

    tr = RunTracker("exp", "job-fresh", uri)
    register_export(tr, _export(tmp_path / "e", "fresh"), "karma-fresh", "champion")
    tr.end()
    code = ("import sys; from karma.registry import export_dir_of; "
            "print(export_dir_of('karma-fresh', 'champion', sys.argv[1], cache_dir=sys.argv[2]))")
    platform = str(Path(__file__).resolve().parents[1] / "platform")
    out = subprocess.run([sys.executable, "-c", code, uri, str(tmp_path / "cache")], capture_output=True,
                         text=True, env={"PYTHONPATH": platform, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (Path(out.stdout.strip()) / "weights" / "model.bin").read_text() == "fresh"
