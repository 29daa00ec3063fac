"""Batch recall (karma.recall, `karma-recall`) end to end: one real Ray session for the module, a
tiny model registered in a real MLflow sqlite registry, the real Serve app on 127.0.0.1 to
compare against, and Parquet inputs the tests write. Checks that need no Ray come first."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, tiny_cfg
from karma.cli import recall as recall_cli
from karma.config import ConfigError, load_config
from karma.data import DataError
from karma.export import export_model
from karma.factory import build_model
from karma.recall import METADATA_KEY, REJECTED_DIR, RecallSettings, input_files, row_problems, run_recall
from karma.registry import register_export, set_alias
from karma.serving import ModelSpec
from karma.tracking import RunTracker, resolve_tracking_uri

NAME = "karma-recall-test"
K = 8
ATOL = 1e-5
MAX_HISTORY = 6  # the model's data.max_history: longer histories are cut to their last 6 items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_users(path: Path, rows: list[tuple], query: bool = True) -> Path:
    """rows: (user_id, history, query) -> a Parquet file with the recall input schema."""
    cols = {"user_id": pa.array([r[0] for r in rows], pa.int64()),
            "history": pa.array([r[1] for r in rows], pa.list_(pa.int64()))}
    if query:
        cols["query"] = pa.array([r[2] for r in rows], pa.string())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(items, cache_dir, tmp_path_factory) -> Path:
    cfg = tiny_cfg(cache_dir, "model.n_interest=2", "model.head_reduce=mixture", f"data.max_history={MAX_HISTORY}")
    model, tok = build_model(cfg, items, log=None)
    return export_model(model, tok, cfg, items, tmp_path_factory.mktemp("recall-export"))


@pytest.fixture(scope="module")
def registry(export, store) -> str:
    """Version 1 holds `champion` and `candidate`; version 2 (the same files) holds no alias."""
    uri = f"sqlite:///{store / 'recall.db'}"
    with RunTracker("recall-test", "v1", uri) as t:
        assert register_export(t, export, NAME, "champion") == "1"
    set_alias(NAME, "candidate", "1", uri)
    with RunTracker("recall-test", "v2", uri) as t:
        assert register_export(t, export, NAME, None) == "2"
    return uri


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The model cache in a temporary folder, for the driver and (inherited) every Ray worker."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KARMA_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def ids(items) -> np.ndarray:
    return items["item_id"].to_numpy(np.int64)


@pytest.fixture(scope="module")
def users(tmp_path_factory, ids) -> Path:
    """Three files of 15 users: histories of 1-12 items (longer than the model reads, too),
    a query on every third user (null on the others)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("users")
    for f in range(3):
        rows = []
        for u in range(15):
            uid = 1000 * (f + 1) + u
            hist = rng.choice(ids, size=int(rng.integers(1, 13))).tolist()
            rows.append((uid, hist, "soldering iron" if u % 3 == 0 else None))
        write_users(folder / f"part-{f}.parquet", rows)
    return folder


@pytest.fixture(scope="module")
def cluster(env, registry):
    """One Ray session for the module, with the Serve app on 127.0.0.1 serving `champion`
    (limits.max_history above every test history, so Serve answers what batch recall scores)."""
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT))  # serve_apps, as Serve imports it
    from serve_apps.ranker import app_builder

    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "platform")])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
                                       "KARMA_MODEL_CACHE": os.environ["KARMA_MODEL_CACHE"]}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_builder({"registered_name": NAME, "alias": "champion", "tracking_uri": registry,
                           "limits": {"max_history": 64}, "ray_actor_options": {"num_cpus": 0.5}})
        serve.run(app, name="ranker", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(240):
                try:
                    if client.get("/healthz").json().get("status") == "ok":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.5)
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def settings(registry: str, input: Path, output: Path, **kw) -> RecallSettings:
    spec = ModelSpec(registered_name=NAME, alias=kw.pop("alias", None), version=kw.pop("version", None),
                     tracking_uri=registry)
    kw = {"k": K, "batch_size": 4, "actors": 1, "cpus_per_actor": 0.5, "progress_every_s": 0.0, **kw}
    return RecallSettings(str(input), str(output), spec, **kw)


@pytest.fixture(scope="module")
def first_run(cluster, registry, users, tmp_path_factory):
    """The three files scored by a pool of two actors, in batches of 4 (ragged at each file's end)."""
    out = tmp_path_factory.mktemp("recall") / "out"
    lines: list[str] = []
    result = run_recall(settings(registry, users, out, actors=2), log=lines.append)
    return out, result, lines


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.parquet"))}


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*") if p.is_file()], list(folder.rglob(".*"))


# ---- input checks (no Ray) -----------------------------------------------------------------------


def test_row_problems_names_each_refused_row_once() -> None:
    table = pa.table({
        "user_id": pa.array([1, None, 3, 4, 5, 6, 7, 7], pa.int64()),
        "history": pa.array([[10, 11], [10], None, [], [10, None], [10, 99, 98], [11], [10]], pa.list_(pa.int64())),
    })
    reason, unknown = row_problems(table, np.array([10, 11], np.int64), np.array([7], np.int64))
    assert reason.tolist() == ["", "null user_id", "null history", "empty history", "null item id in history",
                               "unknown item ids", "duplicate user_id", "duplicate user_id"]
    assert unknown.tolist() == [99, 98]
    # a slice of a table (as Ray hands an actor a batch) is judged by its own rows
    assert row_problems(table.slice(4, 2), np.array([10, 11], np.int64), np.zeros(0, np.int64))[0].tolist() == [
        "null item id in history", "unknown item ids"]


def test_bad_schemas_are_refused_naming_the_column(tmp_path) -> None:
    pq.write_table(pa.table({"user": [1], "history": [[1]]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: missing column\(s\) \['user_id'\]"):
        input_files(tmp_path / "a.parquet")
    pq.write_table(pa.table({"user_id": [1], "history": [[1.5]]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet: column 'history' is list<element: double>; it must be a list of "
                                        "integer item ids"):
        input_files(tmp_path / "b.parquet")
    with pytest.raises(DataError, match="no such file or folder"):
        input_files(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \*.parquet files"):
        input_files(empty)
    mixed = tmp_path / "mixed"
    write_users(mixed / "q.parquet", [(1, [100], "x")])
    write_users(mixed / "noq.parquet", [(2, [100], None)], query=False)
    with pytest.raises(DataError, match=r"1 of 2 files have a query column and \['noq.parquet'\] do not"):
        input_files(mixed)


def test_bad_input_is_refused_before_scoring_with_counts_and_examples(env, registry, ids, tmp_path, capsys) -> None:
    """Unknown items, an empty history, a null user id and a user on two rows (across files):
    a DataError naming the file, each count with example users and items and the fix; nothing
    is written. The command line says the same with exit code 2."""
    good = [(1, ids[:3].tolist(), None), (2, ids[3:5].tolist(), None)]
    bad_rows = [(3, [int(ids[0]), 987654, 55], None), (4, [123456], None), (5, [], None), (None, ids[:1].tolist(), None),
                (2, ids[:2].tolist(), None), (6, ids[:2].tolist(), None)]
    write_users(tmp_path / "in" / "a.parquet", good + bad_rows)
    write_users(tmp_path / "in" / "b.parquet", [(6, ids[5:7].tolist(), None), (7, ids[7:8].tolist(), None)])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        run_recall(settings(registry, tmp_path / "in", out), log=lambda _: None)
    msg = str(e.value)
    a, b = tmp_path / "in" / "a.parquet", tmp_path / "in" / "b.parquet"
    assert f"{a}: 7 of 8 rows cannot be scored" in msg  # users 2 and 6 are on two rows each: all four refused
    assert "2 with unknown item ids (e.g. user_id 3, 4; item ids 987654, 55, 123456 are not among the 30 items of " \
           f"registered model '{NAME}' version 1)" in msg
    assert "1 with empty history (e.g. user_id 5)" in msg and "1 with null user_id (e.g. row 5)" in msg
    assert "3 with duplicate user_id (e.g. user_id 2, 6)" in msg and "keep one row per user" in msg
    assert f"{b}: 1 of 2 rows cannot be scored" in msg and "--skip-invalid" in msg
    assert "Nothing was scored" in msg and not out.exists()

    capsys.readouterr()
    code = recall_cli(["--input", str(tmp_path / "in"), "--output", str(out), "--model", NAME,
                       "--tracking-uri", registry])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("data error: ") and "2 with unknown item ids" in err
    assert not out.exists()


def test_a_bad_alias_or_an_output_inside_the_input_is_refused(env, registry, users, tmp_path, capsys) -> None:
    code = recall_cli(["--input", str(users), "--output", str(tmp_path / "out"), "--model", NAME, "--alias", "nope",
                       "--tracking-uri", registry])
    err = capsys.readouterr().err
    assert code == 2 and "has no alias 'nope'" in err and "'champion': '1'" in err
    with pytest.raises(ConfigError, match="inside the input folder"):
        run_recall(settings(registry, users, users / "out"), log=lambda _: None)


# ---- scoring (Ray, Serve) ---------------------------------------------------------------------------


def test_batch_recall_equals_serve_recall(first_run, cluster, users) -> None:
    """Every user's top-k and scores equal /v1/recall's for the same history and query: the
    history cut to the model's last 6 items, its items left out, scores within 1e-5."""
    out, result, lines = first_run
    assert result.written_files == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert result.users == 45 and result.skipped_files == 0 and result.rejected == 0
    assert any("45 / 45 users (100.0%)" in line and "users/s" in line for line in lines)
    long = 0
    for f in range(3):
        name = f"part-{f}.parquet"
        got = pq.read_table(out / name)
        assert got.schema.field("user_id").type == pa.int64()
        assert got.schema.field("item_ids").type.value_type == pa.int64()
        assert got.schema.field("scores").type.value_type == pa.float32()
        inp = pq.read_table(users / name).to_pylist()
        assert got.column("user_id").to_pylist() == [r["user_id"] for r in inp]  # input order, every user
        for row, ans in zip(inp, got.to_pylist()):
            long += len(row["history"]) > MAX_HISTORY
            r = cluster.post("/v1/recall", json={"history": row["history"], "query": row["query"], "k": K})
            assert r.status_code == 200, r.text
            assert ans["item_ids"] == r.json()["item_ids"], row
            np.testing.assert_allclose(ans["scores"], r.json()["scores"], atol=ATOL)
            assert len(ans["item_ids"]) == K and not set(ans["item_ids"]) & set(row["history"])
    assert long >= 5  # the cut to the model's max_history was exercised
    _no_temporaries(out)


def test_interrupted_run_resumes_without_redoing_complete_files(cluster, registry, users, tmp_path) -> None:
    """The driver is interrupted (KeyboardInterrupt, as Ctrl+C) right after the first file
    completes: that file stays, no partial file is left; the rerun scores only the other two."""
    out = tmp_path / "out"

    def interrupt(line: str) -> None:
        if "1 of 3 files written" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recall(settings(registry, users, out), log=interrupt)
    assert [p.name for p in out.glob("*.parquet")] == ["part-0.parquet"]
    _no_temporaries(out)
    before = _mtimes(out)
    (out / ".part-1.parquet.99999.tmp").write_bytes(b"half a file")  # as a killed driver leaves it
    lines: list[str] = []
    result = run_recall(settings(registry, users, out), log=lines.append)
    assert result.skipped_files == 1 and result.written_files == ["part-1.parquet", "part-2.parquet"]
    assert result.users == 30
    assert _mtimes(out)["part-0.parquet"] == before["part-0.parquet"]
    _no_temporaries(out)
    assert any("3 input files, 1 already complete, 2 to score" in line for line in lines)


def test_rerun_rescores_only_a_deleted_or_damaged_output(first_run, registry, users, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    before = _mtimes(out)
    (out / "part-1.parquet").unlink()
    result = run_recall(settings(registry, users, out), log=lambda _: None)
    assert result.written_files == ["part-1.parquet"] and result.skipped_files == 2
    after = _mtimes(out)
    assert after["part-0.parquet"] == before["part-0.parquet"] and after["part-2.parquet"] == before["part-2.parquet"]
    assert pq.read_table(out / "part-1.parquet").equals(pq.read_table(first_run[0] / "part-1.parquet"))

    (out / "part-2.parquet").write_bytes(b"not parquet")  # e.g. copied in half by hand
    lines: list[str] = []
    result = run_recall(settings(registry, users, out), log=lines.append)
    assert result.written_files == ["part-2.parquet"]
    assert any("part-2.parquet is unreadable" in line for line in lines)

    nothing = run_recall(settings(registry, users, out), log=lambda _: None)  # all complete: no Ray work
    assert nothing.written_files == [] and nothing.skipped_files == 3 and nothing.users == 0


def test_rerun_with_other_settings_is_refused(first_run, registry, users, tmp_path) -> None:
    """k or the model version differing from what the folder holds: refused before anything runs,
    naming the changed keys (and how to pin the version); the files are untouched."""
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    (out / "part-0.parquet").unlink()
    before = _mtimes(out)
    with pytest.raises(ConfigError, match=r"k: 8 -> 5.*write to a new --output folder"):
        run_recall(settings(registry, users, out, k=5), log=lambda _: None)
    with pytest.raises(ConfigError, match=r"version: '1' -> '2'.*pin --version 1"):
        run_recall(settings(registry, users, out, version="2"), log=lambda _: None)
    assert _mtimes(out) == before
    meta = pq.read_metadata(out / "part-1.parquet").metadata[METADATA_KEY]
    assert b'"version": "1"' in meta and b'"input_rows": 15' in meta


def test_skip_invalid_scores_the_rest_and_writes_the_refused_rows_with_their_reason(
        cluster, registry, ids, tmp_path) -> None:
    rows = [(1, ids[:3].tolist(), None), (2, [int(ids[0]), 987654], None), (3, [], None),
            (4, ids[2:9].tolist(), "gloves"), (4, ids[:1].tolist(), None), (5, ids[9:10].tolist(), None)]
    write_users(tmp_path / "in" / "a.parquet", rows)
    write_users(tmp_path / "in" / "b.parquet", [(9, [555], None)])  # every row refused: an empty output
    out = tmp_path / "out"
    lines: list[str] = []
    result = run_recall(settings(registry, tmp_path / "in", out, skip_invalid=True), log=lines.append)
    assert result.users == 2 and result.rejected == 5
    assert result.written_files == ["b.parquet", "a.parquet"]  # b has nothing to score: done first
    assert pq.read_table(out / "a.parquet").column("user_id").to_pylist() == [1, 5]
    assert pq.read_table(out / "b.parquet").num_rows == 0
    rejected = pq.read_table(out / REJECTED_DIR / "a.parquet").to_pylist()
    assert [(r["user_id"], r["reason"]) for r in rejected] == [
        (2, "unknown item ids"), (3, "empty history"), (4, "duplicate user_id"), (4, "duplicate user_id")]
    assert rejected[2]["query"] == "gloves" and rejected[0]["history"] == [int(ids[0]), 987654]
    assert pq.read_table(out / REJECTED_DIR / "b.parquet").column("reason").to_pylist() == ["unknown item ids"]
    assert any("a.parquet: 4 of 6 rows refused" in line for line in lines)
    again = run_recall(settings(registry, tmp_path / "in", out, skip_invalid=True), log=lambda _: None)
    assert again.written_files == [] and again.skipped_files == 2  # complete, rejected rows counted in


def _readme_recall_argv() -> list[str]:
    """The arguments of the batch recall command in README's "Serving" section."""
    section = (ROOT / "README.md").read_text().split("## Serving (Ray Serve)", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n([^`]*jobs/recall.py[^`]*)```", section).group(1).replace("\\\n", " ")
    argv = shlex.split(next(ln for ln in block.splitlines() if "jobs/recall.py" in ln).split("#")[0])
    return argv[argv.index("jobs/recall.py") + 1:]


def test_readme_batch_recall_command_scores_what_the_main_job_registers(cluster, registry, users, tmp_path,
                                                                        monkeypatch, capsys) -> None:
    """README's command names the model, alias and registry the default training job writes;
    run with its flags (input, output and registry swapped for the test's), it exits 0."""
    from karma.train.ray_job import storage_root

    argv = _readme_recall_argv()
    opts = dict(zip(argv[::2], argv[1::2]))
    default = load_config(None)  # what `python jobs/train.py` without arguments trains
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)
    assert opts["--model"] == (default.tracking.registered_model or default.tracking.experiment)
    assert opts["--alias"] == default.tracking.alias and default.tracking.register
    job_uri = resolve_tracking_uri(default.tracking.tracking_uri, storage_root(default))
    assert opts["--tracking-uri"].replace("$PWD", str(ROOT)) == job_uri

    swap = {"--input": str(users), "--output": str(tmp_path / "out"), "--model": NAME, "--tracking-uri": registry}
    run = [x for k, v in opts.items() for x in (k, swap.get(k, v))] + ["--actors", "1", "--cpus-per-actor", "0.5"]
    capsys.readouterr()
    assert recall_cli(run) == 0
    out = capsys.readouterr().out  # progress lines, then the summary as indented JSON
    summary = json.loads(out[out.rindex("\n{") + 1:])
    assert summary["users"] == 45 and summary["version"] == "1"
    assert int(opts["--k"]) >= 30  # README's k is past the test catalogue: every item not in the history comes back
    got = pq.read_table(tmp_path / "out" / "part-0.parquet").column("item_ids").to_pylist()
    inp = pq.read_table(users / "part-0.parquet").column("history").to_pylist()
    assert [len(x) for x in got] == [30 - len(set(h)) for h in inp]
