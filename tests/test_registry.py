"""The registered model against a real MLflow sqlite registry: a tiny KARMA export registered
with "models from code" loads through `mlflow.pyfunc.load_model` in a fresh process that
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
from mlflow.artifacts import download_artifacts

from conftest import ROOT, tiny_cfg
from karma.export import export_model, load_export
from karma.factory import build_model
from karma.pipeline import prepare
from karma.tracking import RunTracker, register_export

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
