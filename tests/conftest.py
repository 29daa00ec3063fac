"""Shared fixtures: a tiny item table and a tiny built model (random weights, offline)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

from karma.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store per test module: creating its schema costs about a second. Tests
    use their own run, experiment and model names, so they do not see each other's records."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture()
def uri(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The store's tracking URI, with MLFLOW_TRACKING_URI unset and the test run inside its own
    tmp_path: any stray ./mlruns would land there, where a test can look for it."""
    from karma.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return resolve_tracking_uri(None, store)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One text-embedding cache for the whole test session (MiniLM runs once per item set)."""
    return str(tmp_path_factory.mktemp("karma-cache"))


def load_script(rel: str):
    """A bench/ or jobs/ script (not a package) imported as a module, by its path under the root."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_cfg(cache_dir: str, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"data.cache_dir={cache_dir}", *overrides])


@pytest.fixture(scope="session")
def items() -> pd.DataFrame:
    cats = ["soldering tools", "laboratory glassware", "safety gloves"]
    brands = ["acme", "hakko", "pyrex", "ansell"]
    rows = []
    for i in range(30):
        cat, brand = cats[i % 3], brands[i % 4]
        rows.append({"item_id": 100 + i, "title": f"{brand} {cat.split()[0]} model {i}", "category": cat,
                     "brand": brand, "text": ""})
    return pd.DataFrame(rows)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Credentials an S3 emulator accepts; set for the test process and the Ray nodes it starts.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible endpoint on loopback (moto's server mode, in this process) with one
    bucket `karma`; yields (endpoint, server) with the AWS_* variables set while it runs."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="karma")
        yield endpoint, server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
