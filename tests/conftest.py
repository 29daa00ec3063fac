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
