"""A real local cluster: `ray start --head` on 127.0.0.1 with token auth, `ray job submit` of
jobs/train.py from the working tree, wait for SUCCEEDED, then stop that cluster (only it)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from karma.export import load_export

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_ADDRESS": ""}
    gcs, dash = free_port(), free_port()
    short_tmp = tempfile.mkdtemp(prefix="kray", dir="/tmp")  # unix socket paths must stay short
    # --block ties the cluster's processes to this one: terminating it stops just this cluster.
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--disable-usage-stats", f"--temp-dir={short_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        head.terminate()
        pytest.fail("the local Ray cluster did not come up within 120 s")
    yield address, env, tmp
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    shutil.rmtree(short_tmp, ignore_errors=True)


def _submit(address: str, env: dict, *args: str, timeout: float = 600) -> tuple[str, str]:
    """`ray job submit` of jobs/train.py with `args`; waits for the end; returns (status, logs)."""
    sub = f"karma-submit-{secrets.token_hex(3)}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--submission-id", sub, "--no-wait", "--", sys.executable, "jobs/train.py", *args]
    for _ in range(30):  # the node's job agent comes up a little after the dashboard
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deadline, state = time.time() + timeout, ""
    while time.time() < deadline:
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, sub], env=env,
                                capture_output=True, text=True)
        state = (status.stdout + status.stderr).upper()
        if any(s in state for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, sub], env=env,
                          capture_output=True, text=True).stdout
    return state, logs


def test_ray_job_submit_train_succeeds(cluster):
    address, env, tmp = cluster
    storage = tmp / "runs"
    state, logs = _submit(address, env, "--config", "configs/tiny.yaml", f"dist.storage_path={storage}",
                          "dist.zero_stage=3", "train.analysis_examples=0", "train.eval_max_users=100",
                          "model.text_channel=true")
    assert "SUCCEEDED" in state, state + logs[-4000:]
    assert '"model_version": "1"' in logs  # the job's own summary line
    export = storage / "karma-tiny" / "final" / "export"
    assert (export / "model.safetensors").is_file()
    assert (storage / "mlflow.db").is_file()
    # one task embedded the item text into the storage root; the workers loaded it, computing nothing
    [table] = (storage / "text").glob("text-minilm-*.npy")
    assert f"item text embeddings computed into {table}" in logs
    assert f"[karma] item text embeddings loaded from {table}" in logs, logs[-4000:]
    assert not (storage / "cache").exists()
    # rank 0's progress lines reach the job's output once each (Ray Train's print patch doubled them)
    [epoch_line] = [line for line in logs.splitlines() if "[karma] epoch 1: valid" in line]
    assert logs.count("[karma] test (weights of epoch") == 1
    # ZeRO-3, bf16: the export reloaded here computes what the trained model computed
    probe = pd.read_parquet(export / "probe_examples.parquet")
    got = load_export(export).interests([list(h) for h in probe["history"]])
    np.testing.assert_allclose(got, np.load(export / "probe_interests.npy"), atol=1e-5)


def test_ray_job_submit_bad_data_fails_with_exit_code_2(cluster):
    """A DataError raised in the job's Ray data task: the job fails with exit code 2 and the
    error's own message (the missing file and what a data folder needs), no Ray traceback."""
    address, env, tmp = cluster
    empty = tmp / "no-data"
    empty.mkdir()
    state, logs = _submit(address, env, "--config", "configs/tiny.yaml", f"dist.storage_path={tmp / 'runs-bad'}",
                          "data.source=parquet", f"data.path={empty}", timeout=300)
    assert "FAILED" in state and "EXIT CODE 2" in state, state + logs[-4000:]
    assert f"data error: {empty}/items.parquet: file not found" in logs, logs[-4000:]
    assert "RayTaskError" not in logs


def test_job_api_refuses_requests_without_the_token(cluster):
    address, env, _ = cluster
    bare = {**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": "/nonexistent"}
    out = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=bare,
                         capture_output=True, text=True, cwd="/")
    assert out.returncode != 0 and "uthentication" in out.stdout + out.stderr
