"""karma.storage against a real S3-compatible endpoint (moto's server on loopback): a folder's
round trip with its _COMPLETE marker, the node cache reused, a short outage ridden out by the
retries, and a clear error when the endpoint is unreachable."""

from __future__ import annotations

import json
import threading
import time

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from conftest import free_port
from karma import storage


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def _folder(root, rows: int = 10):
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "train.npy", np.arange(rows * 2).reshape(rows, 2))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "meta.json").write_text(json.dumps({"rows": rows}))
    return root


def test_uri_and_path_forms():
    assert storage.is_uri("s3://b/p") and not storage.is_uri("/tmp/x") and not storage.is_uri("runs")
    assert not storage.is_uri("file:///tmp/x")
    assert storage.join("s3://b/p/", "/data/", "x.npy") == "s3://b/p/data/x.npy"
    fs, path = storage.filesystem("s3://bucket/a/b", "http://127.0.0.1:9")
    assert fs.type_name == "s3" and path == "bucket/a/b"
    with pytest.raises(storage.StorageError, match="s3://bucket/prefix"):
        storage.filesystem("s3://")


def test_round_trip_marker_and_node_cache(s3_server, tmp_path, cache):
    endpoint, _ = s3_server
    uri = "s3://karma/unit/data"
    src = _folder(tmp_path / "src")
    assert storage.marker(uri, endpoint) is None
    with pytest.raises(storage.StorageError, match=f"{uri} has no _COMPLETE"):
        storage.local_dir(uri, endpoint)  # unfinished: never read half a folder

    digest = storage.put_dir(src, uri, endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="karma", Prefix="unit/data/")["Contents"])
    assert keys == ["unit/data/_COMPLETE", "unit/data/sub/meta.json", "unit/data/train.npy"]
    assert storage.marker(uri, endpoint)["digest"] == digest

    local = storage.local_dir(uri, endpoint)
    assert local.parent == cache and local.name == digest[:32]
    assert np.array_equal(np.load(local / "train.npy", mmap_mode="r"), np.load(src / "train.npy"))
    assert json.loads((local / "sub" / "meta.json").read_text()) == {"rows": 10}

    # a second reader on the node reuses the copy: nothing is downloaded again
    (local / "train.npy").touch()
    stamp = (local / "train.npy").stat().st_mtime_ns
    assert storage.local_dir(uri, endpoint) == local
    assert (local / "train.npy").stat().st_mtime_ns == stamp

    # new content under the same URI: a new digest, a new cache entry
    _folder(src, rows=12)
    assert storage.put_dir(src, uri, endpoint) != digest
    fresh = storage.local_dir(uri, endpoint)
    assert fresh != local and np.load(fresh / "train.npy").shape == (12, 2)

    # local paths are used in place
    assert storage.local_dir(str(src)) == src.resolve()


def test_bytes_listing_and_missing(s3_server):
    endpoint, _ = s3_server
    storage.write_bytes("s3://karma/unit/b/x.txt", b"hello", endpoint)
    assert storage.read_bytes("s3://karma/unit/b/x.txt", endpoint) == b"hello"
    assert storage.exists("s3://karma/unit/b/x.txt", endpoint)
    assert storage.list_names("s3://karma/unit/b", endpoint) == ["x.txt"]
    assert storage.list_names("s3://karma/unit/none", endpoint) == []
    start = time.time()
    with pytest.raises(FileNotFoundError):  # not transient: no retries
        storage.read_bytes("s3://karma/unit/b/absent.txt", endpoint)
    assert time.time() - start < 2


def test_transient_outage_is_retried(s3_server, monkeypatch):
    """The endpoint goes away for about a second (the server stopped, then started again on
    the same port); the write waits it out instead of failing."""
    endpoint, server = s3_server
    port = int(endpoint.rsplit(":", 1)[1])
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.5, 0.5, 1.0, 1.0, 1.0))
    server.stop()
    restarted = []

    def restart():
        time.sleep(1.0)
        again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        again.start()
        restarted.append(again)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        storage.write_bytes("s3://karma/unit/outage.txt", b"survived", endpoint)
    finally:
        thread.join()
    server._server = restarted[0]._server  # the fixture stops whichever runs now
    server._thread = restarted[0]._thread
    assert storage.read_bytes("s3://karma/unit/outage.txt", endpoint) == b"survived"


def test_unreachable_endpoint_names_the_uri(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.1,))
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes("s3://karma/unit/x.txt", b"x", dead)
    text = str(err.value)
    assert "s3://karma/unit/x.txt" in text and "2 tries" in text and "dist.storage_endpoint" in text


@pytest.mark.parametrize("overrides, needle", [
    (["dist.storage_path=gs://bucket/runs"], r"dist.storage_path: 'gs://bucket/runs' is not supported; give s3://"),
    (["dist.storage_path=s3://b/p", "dist.storage_endpoint=minio:9000"], r"dist.storage_endpoint: .* http\(s\)://host:port"),
    (["dist.storage_endpoint=http://minio:9000"], r"dist.storage_endpoint: set, but dist.storage_path is a local folder"),
    (["dist.data_cpus=0"], r"dist.data_cpus: 0 must be at least 1"),
    (["dist.data_memory_gb=-2"], r"dist.data_memory_gb: -2 must be >= 0"),
    (["dist.scale_up_timeout_s=-1"], r"dist.scale_up_timeout_s: -1 must be >= 0"),
    (["dist.placement_strategy=ANYWHERE"], r"dist.placement_strategy: 'ANYWHERE' is not allowed"),
])
def test_bad_storage_settings_are_refused(overrides, needle):
    from conftest import ROOT
    from karma.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


def test_object_store_config_keeps_no_local_storage(tmp_path, monkeypatch):
    from conftest import ROOT
    from karma.config import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "node"))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["dist.storage_path=s3://b/p",
                                                        "dist.storage_endpoint=http://127.0.0.1:9000"])
    assert cfg.data.cache_dir == str(tmp_path / "node" / "cache")  # a node's own, not ./cache
    assert (cfg.dist.data_cpus, cfg.dist.data_memory_gb, cfg.dist.scale_up_timeout_s) == (1, 0.0, 0)
