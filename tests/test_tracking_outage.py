"""RunLogger through a tracking-server outage, with real processes: a real `mlflow server`
(sqlite store) is killed in the middle of a run and restarted on the same port and store. The
training side must never block or raise, and every value must arrive."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from karma.tracking import RunLogger

BIN = Path(sys.executable).parent
FAST = 0.05  # seconds: a log_metrics call only queues; anything slower waited on the network


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1:port over one sqlite file, started and killed at will."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.tmp, self.proc = _free_port(), tmp, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
             "--artifacts-destination", str(self.tmp / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(self.tmp / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, (self.tmp / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        self.kill()
        pytest.fail("mlflow server did not come up within 180 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, nothing else
            self.proc.wait(timeout=30)
        self.proc = None


def _log(logger: RunLogger, steps) -> None:
    for step in steps:
        start = time.perf_counter()
        logger.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": math.inf if step == 7 else float(step)},
                           step=step)
        assert time.perf_counter() - start < FAST, f"log_metrics blocked at step {step}"


def test_metrics_survive_a_server_outage(tmp_path: Path) -> None:
    server = Server(tmp_path)  # one server for the whole test: each start costs seconds
    server.start()
    try:
        _outage_then_recovery(server)
        _bounded_close_while_down(server)
    finally:
        server.kill()


def _outage_then_recovery(server: Server) -> None:
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    notes: list[str] = []
    logger = RunLogger(server.uri, run_id, retry_initial_s=0.2, retry_max_s=1.0, request_timeout_s=5,
                       log=notes.append)
    _log(logger, range(0, 20))
    assert logger.flush(60) and logger.delivered == 40

    server.kill()
    _log(logger, range(20, 50))  # the server is down: still no wait, no error
    deadline = time.time() + 30
    while logger.failed_attempts < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert logger.failed_attempts >= 2 and logger.pending > 0  # sends really failed and were kept
    assert any("retrying" in n for n in notes)

    server.start()  # same port, same store
    _log(logger, range(50, 60))
    assert logger.close(timeout=90) == 0
    assert logger.delivered == 120 and logger.pending == 0

    history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(60))
    inf = [m for m in MlflowClient(server.uri).get_metric_history(run_id, "grad_norm") if m.step == 7]
    assert inf and inf[0].value >= 1.7e308  # inf is logged, not dropped (the store caps it)


def _bounded_close_while_down(server: Server) -> None:
    """A server that never comes back: close gives up at its deadline and says how much is lost."""
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("down")).info.run_id
    notes: list[str] = []
    logger = RunLogger(server.uri, run_id, retry_initial_s=0.2, retry_max_s=0.5, log=notes.append)
    server.kill()
    _log(logger, range(5))
    start = time.monotonic()
    assert logger.close(timeout=2) == 10
    assert time.monotonic() - start < 10
    assert any("10 metric values" in n and "not delivered" in n for n in notes), notes
    logger.log_metrics({"loss": 1.0}, step=99)  # after close: counted, not raised
