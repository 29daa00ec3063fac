"""The item text table: computed once per catalogue (concurrent callers wait for the one
computing), loaded instead of computed when a stored table is given, refused with a clear error
when that table is missing or does not fit; data.cache_dir resolved under the storage root."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, tiny_cfg
from karma.config import from_dict, load_config
from karma.factory import build_model
from karma.text import MINILM_DIM, ensure_text_table, item_texts, load_text_table, text_table_path


def test_concurrent_callers_compute_the_table_once(items, tmp_path):
    texts = item_texts(items)
    logs: list[str] = []
    results: list[tuple[Path, bool]] = []
    callers = [threading.Thread(target=lambda: results.append(ensure_text_table(texts, "minilm", tmp_path,
                                                                                log=logs.append)))
               for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    path = text_table_path(texts, "minilm", tmp_path)
    assert sorted(computed for _, computed in results) == [False, True]  # one computed, one waited
    assert {p for p, _ in results} == {path}
    assert sum(m.startswith(f"text embeddings {len(texts)}/{len(texts)}") for m in logs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]  # no temp file left
    table = np.load(path)
    assert table.shape == (len(items), MINILM_DIM) and table.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, atol=1e-5)
    assert ensure_text_table(texts, "minilm", tmp_path) == (path, False)


def test_a_given_table_is_loaded_not_computed(items, tmp_path):
    """Rows no encoder would produce: only a model built from this file holds them."""
    table = np.random.default_rng(0).standard_normal((len(items), MINILM_DIM)).astype(np.float32)
    stored = tmp_path / "text" / "text-minilm-given.npy"
    stored.parent.mkdir()
    np.save(stored, table)
    cache = tmp_path / "cache"
    logs: list[str] = []
    model, _ = build_model(tiny_cfg(str(cache)), items, log=logs.append, text_table=stored)
    np.testing.assert_array_equal(model.items.text_emb.numpy(), table)
    assert f"item text embeddings loaded from {stored}" in logs
    assert not any(m.startswith("text embeddings") for m in logs) and not cache.exists()  # nothing computed


def test_a_missing_table_is_refused_naming_the_storage(items, tmp_path):
    missing = tmp_path / "text" / "text-minilm-0123456789abcdef.npy"
    with pytest.raises(FileNotFoundError, match=r"item text table .*text-minilm-0123456789abcdef\.npy not found"
                                                r".*<dist\.storage_path>/text/.*all nodes share"):
        build_model(tiny_cfg(str(tmp_path / "cache")), items, log=None, text_table=missing)
    assert not missing.exists() and not (tmp_path / "cache").exists()  # refused, not recomputed


def test_a_table_of_another_catalogue_is_refused(items, tmp_path):
    other = tmp_path / "text-minilm-other.npy"
    np.save(other, np.zeros((len(items) + 1, MINILM_DIM), np.float32))
    with pytest.raises(ValueError, match=rf"has shape \({len(items) + 1}, {MINILM_DIM}\), expected \[{len(items)}, dim\]"):
        load_text_table(other, len(items))


def test_cache_dir_is_resolved_under_the_storage_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ROOT / "configs" / "tiny.yaml"
    assert load_config(tiny).data.cache_dir == str(tmp_path / "runs" / "cache")  # the defaults
    cfg = load_config(tiny, ["dist.storage_path=/shared/karma", "data.cache_dir=models"])
    assert cfg.data.cache_dir == "/shared/karma/models"
    assert load_config(tiny, ["data.cache_dir=/scratch/karma"]).data.cache_dir == "/scratch/karma"
    assert load_config(tiny, ["data.cache_dir=~/karma"]).data.cache_dir == str(Path.home() / "karma")
    default = load_config(tiny).to_dict()
    monkeypatch.chdir(ROOT)  # a worker rebuilding the config in another folder gets the same one
    assert from_dict(default).data.cache_dir == str(tmp_path / "runs" / "cache")
