"""Two Ray nodes on this machine that share nothing but the network: a head and a second node
(`ray start`, each with its own --temp-dir and node cache), storage in an S3-compatible store
(moto's server on loopback), MLflow a real `mlflow server` with its artifacts in that store, the
driver `python jobs/train.py` as `ray job submit` would run it. The tiny config trains one worker
per node (dist.placement_strategy=STRICT_SPREAD); the worker on the second node is killed
mid-epoch; the job resumes from the checkpoint in the bucket, ends, and the model is registered.
Nothing touches a local storage folder."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import re
import time
import urllib.request
from pathlib import Path

import boto3
import mlflow
import pytest

from conftest import ROOT, S3_ENV, free_port, tiny_cfg
from karma.pipeline import prepare
from karma.storage import CACHE_ENV, COMPLETE
from karma.train.loop import steps_plan
from karma.train.worker import FAULT_ENV

BIN = Path(sys.executable).parent
EVERY = 2  # a step checkpoint every 2 steps
SMALL = ("data.synthetic_users=120", "train.epochs=2", f"train.checkpoint_every_steps={EVERY}")  # short epochs
pytestmark = pytest.mark.timeout(420)


def _wait(what: str, probe, seconds: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{what}: a process it needs exited early")
        try:
            if probe():
                return
        except Exception:  # not up yet
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} did not come up within {seconds:.0f} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the process groups this module started (`ray start --block` takes its node with it),
    all at once; SIGKILL after 5 s, since a Ray node would drain for up to 30 s after SIGTERM
    (no job is left to drain by then)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    endpoint, _ = s3_server
    tmp = tmp_path_factory.mktemp("multi-node")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    marker = tmp / "killed-on-node-b"
    caches = {"a": tmp / "cache-a", "b": tmp / "cache-b"}
    temp_dirs = {n: tempfile.mkdtemp(prefix=f"kmn{n}", dir="/tmp") for n in "ab"}  # short socket paths
    base = {**os.environ, **S3_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
            "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_ADDRESS": ""}
    cfg_probe = tiny_cfg(str(tmp / "unused"), *SMALL)
    per_epoch, total = steps_plan(cfg_probe.train, len(prepare(cfg_probe.data, log=lambda m: None).split.train), 2)
    fail_at = per_epoch + 3  # inside epoch 2, after its step checkpoint at per_epoch + 2
    procs: list[subprocess.Popen] = []
    try:
        ml_port = free_port()
        procs.append(subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
             "--artifacts-destination", "s3://karma/mlflow", "--host", "127.0.0.1", "--port", str(ml_port),
             "--workers", "1"],
            env={**base, "MLFLOW_S3_ENDPOINT_URL": endpoint}, stdout=open(tmp / "mlflow.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True))
        gcs = free_port()

        def node(name: str, *args: str, env: dict | None = None) -> None:
            ports = [f"--{p}={free_port()}" for p in (
                "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
            procs.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                 f"--temp-dir={temp_dirs[name]}", f"--resources={json.dumps({f'node_{name}': 1})}", *ports, *args],
                env={**base, CACHE_ENV: str(caches[name]), **(env or {})}, stdout=open(tmp / f"ray-{name}.log", "w"),
                stderr=subprocess.STDOUT, start_new_session=True))

        # the head: the data task's CPU and one worker's; the second node: one worker's
        node("a", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false")
        time.sleep(3)
        node("b", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
             env={FAULT_ENV: f"{fail_at}:{marker}:kill"})  # only a worker on node b dies
        # the driver's environment, as `ray job submit` gives it on the head
        driver = {**base, "RAY_ADDRESS": f"127.0.0.1:{gcs}", CACHE_ENV: str(tmp / "cache-driver")}
        driver.pop("MLFLOW_TRACKING_URI", None)

        def two_nodes() -> bool:  # asked from a process of its own, with the driver's environment
            probe = "import ray; ray.init(); print('alive', sum(n['Alive'] for n in ray.nodes()))"
            out = subprocess.run([sys.executable, "-c", probe], env=driver, capture_output=True, text=True,
                                 timeout=60).stdout
            return "alive 2" in out

        _wait("mlflow server", lambda: urllib.request.urlopen(f"http://127.0.0.1:{ml_port}/health", timeout=2).status == 200,
              90, procs)
        _wait("the second Ray node", two_nodes, 90, procs)
        yield {"endpoint": endpoint, "tracking": f"http://127.0.0.1:{ml_port}", "tmp": tmp, "marker": marker,
               "caches": caches, "fail_at": fail_at, "per_epoch": per_epoch, "total": total, "env": driver}
    finally:
        _stop(procs)
        for d in temp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def _train(cluster: dict, cwd: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """jobs/train.py on the tiny config against the two-node cluster."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                           *overrides], env=cluster["env"], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_two_nodes_object_store_node_loss_resume_and_register(cluster, tmp_path):
    # tmp_path is the driver's working folder: a stray local storage folder would appear there
    out = _train(cluster, tmp_path, "dist.storage_path=s3://karma/mn", f"dist.storage_endpoint={cluster['endpoint']}",
                 f"tracking.tracking_uri={cluster['tracking']}", "tracking.run_name=two-nodes",
                 "tracking.registered_model=karma-two-nodes", "dist.placement_strategy=STRICT_SPREAD",
                 "dist.zero_stage=1", *SMALL,
                 "train.analysis_examples=0", "train.eval_max_users=100", f"data.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout[out.stdout.index("{\n"):])

    # the fault happened, on the second node, and the job resumed from an object-store checkpoint
    assert cluster["marker"].read_text() == str(cluster["fail_at"])
    assert result["steps"] == cluster["total"] == 2 * cluster["per_epoch"]
    # the registry named too: an earlier test in this process may have set a global registry URI
    client = mlflow.MlflowClient(cluster["tracking"], registry_uri=cluster["tracking"])
    resumed = [m.value for m in client.get_metric_history(result["mlflow_run_id"], "train/resumed_from_step")]
    # from a checkpoint in the bucket: the newest one Ray's controller had collected before the
    # kill (epoch 1's end or a step checkpoint of epoch 2), not from the start
    assert len(resumed) == 1 and cluster["per_epoch"] <= resumed[0] < cluster["fail_at"]
    assert resumed[0] == cluster["per_epoch"] or resumed[0] % EVERY == 0
    # registered in the server's registry, its files in the bucket
    version = client.get_model_version_by_alias("karma-two-nodes", "candidate")
    assert version.version == result["model_version"] and version.run_id == result["mlflow_run_id"]

    s3 = boto3.client("s3", endpoint_url=cluster["endpoint"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="karma")
            for o in page.get("Contents", [])]
    assert f"mn/two-nodes/data/{COMPLETE}" in keys and "mn/two-nodes/job_config.json" in keys
    text = [k.split("/")[-1] for k in keys if k.startswith("mn/text/")]
    assert sorted(n.rsplit(".", 1)[-1] for n in text) == [COMPLETE, "npy"], text  # the table and its marker
    assert any(k.startswith("mn/ray/two-nodes/checkpoint_") and "/export/" in k for k in keys)
    assert any(k.startswith("mlflow/") for k in keys)  # MLflow's artifacts
    # each node read the prepared data through its own cache; nothing local stood in for storage
    for name, cache in cluster["caches"].items():
        assert any((d / COMPLETE).is_file() and (d / "counts.npy").is_file() for d in cache.iterdir()), name
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert Path(result["export_dir"]).is_relative_to(cluster["tmp"] / "cache-driver")


def test_sqlite_tracking_and_missing_nodes_are_refused(cluster, tmp_path):
    """Two refusals, run side by side: a sqlite tracking URI on a two-node cluster, and more
    workers than the cluster holds after waiting dist.scale_up_timeout_s for nodes."""
    common = ["tracking.run_name=refused", f"data.cache_dir={tmp_path / 'cache'}"]
    sqlite = f"tracking.tracking_uri=sqlite:///{tmp_path}/x.db"
    jobs = {
        "sqlite": [f"dist.storage_path={tmp_path / 'runs'}", sqlite, *common],
        "sqlite_s3": ["dist.storage_path=s3://karma/refused", f"dist.storage_endpoint={cluster['endpoint']}", sqlite,
                      *common],
        "nodes": ["dist.storage_path=s3://karma/refused", f"dist.storage_endpoint={cluster['endpoint']}",
                  f"tracking.tracking_uri={cluster['tracking']}", "dist.num_workers=6", "dist.scale_up_timeout_s=2",
                  *common],
    }
    procs = {k: subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                                  str(ROOT / "configs" / "tiny.yaml"), *v], env=cluster["env"], cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, v in jobs.items()}
    try:
        out = {k: p.communicate(timeout=120) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 2 for p in procs.values()), out
    assert re.search(r"tracking.tracking_uri: sqlite:///\S+ is a file on this machine, but the Ray cluster has 2 "
                     r"nodes.*mlflow server.*MLFLOW_TRACKING_URI", out["sqlite"][1]), out["sqlite"][1]
    assert "dist.storage_path is s3://karma/refused" in out["sqlite_s3"][1], out["sqlite_s3"][1]
    assert re.search(r"needs 7 CPUs but the cluster has 3 \(after waiting dist.scale_up_timeout_s=2 s for nodes\)",
                     out["nodes"][1]), out["nodes"][1]
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "runs").exists()
