"""karma.serving: feature maths against hand-computed values, request validation, and the
batched model path against the plain InferenceModel on a small real (untrained) export."""

from __future__ import annotations

import math
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_cfg
from karma.export import export_model, load_export
from karma.factory import build_model
from karma.retrieval import exact_topk
from karma.serving import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    BusyWait,
    ExposureError,
    Job,
    ModelHandle,
    ModelNotFoundError,
    ModelSpec,
    NonFiniteError,
    RequestError,
    ServingLimits,
    build_job,
    check_item_ids,
    check_exposure,
    check_k,
    check_query,
    rank_features,
    read_token,
    run_jobs,
    token_matches,
    user_features,
)
from karma.registry import _cache_root, export_dir_of, register_export
from karma.tracking import RunTracker

R = 1 / math.sqrt(2)

# Two orthogonal unit heads, mixture logits giving weights (0.25, 0.75), three candidates.
Z = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
MIX = np.array([0.0, math.log(3.0)], np.float32)
CAND = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)


def test_rank_features_hand_computed() -> None:
    f = rank_features(Z, MIX, CAND)
    np.testing.assert_allclose(f["head_scores"], [[1, 0], [0, 1], [0.6, 0.8]], atol=1e-7)
    np.testing.assert_allclose(f["max"], [1, 1, 0.8], atol=1e-7)
    # 0.25*s0 + 0.75*s1
    np.testing.assert_allclose(f["mixture"], [0.25, 0.75, 0.25 * 0.6 + 0.75 * 0.8], atol=1e-6)
    # mean interest (0.5, 0.5) has norm 1/sqrt(2): cos = <(.5,.5), e> / (|e| / sqrt 2)
    np.testing.assert_allclose(f["cosine"], [R, R, 0.7 * math.sqrt(2)], atol=1e-6)


def test_mixture_equals_max_without_mixture_head() -> None:
    f = rank_features(Z, None, CAND)
    np.testing.assert_array_equal(f["mixture"], f["max"])


def test_cosine_ignores_candidate_norm_and_survives_opposite_heads() -> None:
    f = rank_features(Z, None, CAND * 3.0)
    np.testing.assert_allclose(f["cosine"], [R, R, 0.7 * math.sqrt(2)], atol=1e-6)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)  # mean interest is the zero vector
    np.testing.assert_array_equal(rank_features(opposite, None, CAND)["cosine"], [0, 0, 0])


def test_rank_features_shape_errors() -> None:
    with pytest.raises(ValueError, match="same d"):
        rank_features(Z, None, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="mix"):
        rank_features(Z, np.zeros(3, np.float32), CAND)


def test_user_features_hand_computed() -> None:
    u = user_features(np.array([[2.0, 0.0], [0.0, 1.0]]), MIX, history_length=7)
    assert u["history_length"] == 7 and u["n_heads"] == 2
    assert u["interest_norm_mean"] == pytest.approx(1.5)
    assert u["interest_norm_min"] == pytest.approx(1.0)
    assert u["interest_norm_max"] == pytest.approx(2.0)
    assert u["mean_interest_norm"] == pytest.approx(math.sqrt(1.0 + 0.25))  # |(1, 0.5)|
    assert u["head_pairwise_cosine"] == pytest.approx(0.0)
    assert u["mixture_weights"] == pytest.approx([0.25, 0.75])
    three = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # pairs: 1, 0, 0
    assert user_features(three, None, 1)["head_pairwise_cosine"] == pytest.approx(1 / 3)
    one = user_features(np.array([[0.6, 0.8]]), None, 1)
    assert one["head_pairwise_cosine"] == 1.0 and one["mixture_weights"] is None


@pytest.mark.parametrize("value, field, fragment", [
    (None, "history", "null"),
    ("1,2", "history", "str"),
    ({"a": 1}, "history", "dict"),
    ([], "history", "empty"),
    (list(range(6)), "history", "limit is 5"),
    ([1, 2.0], "history[1]", "float"),
    ([True], "history[0]", "bool"),
    ([np.bool_(False)], "history[0]", "bool"),
    (["3"], "history[0]", "str"),
    ([2**63], "history[0]", "64-bit"),
])
def test_check_item_ids_rejects(value, field, fragment) -> None:
    with pytest.raises(RequestError) as e:
        check_item_ids(value, "history", 5)
    assert e.value.field == field and fragment in e.value.message


def test_check_item_ids_accepts_ints_and_numpy_ints() -> None:
    out = check_item_ids([1, np.int32(2), -(2**63), 2**63 - 1], "candidates", 5)
    assert out.dtype == np.int64 and out.tolist() == [1, 2, -(2**63), 2**63 - 1]


def test_check_k_and_query() -> None:
    assert check_k(1, 10) == 1 and check_k(10, 10) == 10
    for bad in (0, 11, -1, True, 2.0, "3"):
        with pytest.raises(RequestError) as e:
            check_k(bad, 10)
        assert e.value.field == "k"
    assert check_query(None, 4) is None and check_query("", 4) is None and check_query("abcd", 4) == "abcd"
    for bad in ("abcde", 5, ["a"]):
        with pytest.raises(RequestError) as e:
            check_query(bad, 4)
        assert e.value.field == "query"


def test_limits_and_spec_validation() -> None:
    assert ServingLimits().history_limit(20) == 20 and ServingLimits(max_history=50).history_limit(20) == 50
    for bad in ({"max_k": 0}, {"max_candidates": True}, {"max_k": 1.5}):
        with pytest.raises(ValueError, match="limits"):
            ServingLimits.from_dict(bad)
    with pytest.raises(ValueError, match="unknown limits keys"):
        ServingLimits.from_dict({"max_kk": 3})
    assert ModelSpec.from_dict({"registered_name": "m"}).ref == "champion"
    assert ModelSpec.from_dict({"registered_name": "m", "version": 3}).ref == "3"
    for bad, msg in [({}, "exactly one"), ({"export_path": "a", "registered_name": "m"}, "exactly one"),
                     ({"export_path": "a", "alias": "x"}, "registered_name"),
                     ({"registered_name": "m", "alias": "a", "version": "1"}, "not both"),
                     ({"registered_name": "m", "version": "latest"}, "version number"),
                     ({"export_path": "a", "index": "hnsw"}, "index"), ({"export_path": "a", "colour": 1}, "unknown")]:
        with pytest.raises(ValueError, match=msg):
            ModelSpec.from_dict(bad)


# ---- the model path on a real export ---------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(items, cache_dir, tmp_path_factory) -> Path:
    cfg = tiny_cfg(cache_dir, "model.n_interest=2", "model.head_reduce=mixture", "data.max_history=6")
    model, tok = build_model(cfg, items, log=None)
    return export_model(model, tok, cfg, items, tmp_path_factory.mktemp("serving-export"))


@pytest.fixture(scope="module")
def handle(export_dir) -> ModelHandle:
    return ModelHandle.from_export(export_dir)


def test_build_job_validates_against_the_item_table(handle) -> None:
    limits = ServingLimits(max_candidates=4)
    job = build_job("rank", handle, limits, history=[100, 105], query="gloves", candidates=[101, 129])
    assert job.rows.tolist() == [0, 5] and job.cand_rows.tolist() == [1, 29] and job.query == "gloves"
    with pytest.raises(RequestError) as e:
        build_job("recall", handle, limits, history=[100, 7, 100000, 7])
    assert e.value.field == "history" and "[7, 100000]" in e.value.message
    with pytest.raises(RequestError) as e:
        build_job("rank", handle, limits, history=[100], candidates=[5])
    assert e.value.field == "candidates" and "[5]" in e.value.message
    with pytest.raises(RequestError) as e:
        build_job("rank", handle, limits, history=[100], candidates=[100] * 5)
    assert e.value.field == "candidates" and "limit is 4" in e.value.message
    with pytest.raises(RequestError) as e:  # the model's max_history (6) is the default limit
        build_job("interests", handle, limits, history=[100] * 7)
    assert e.value.field == "history"
    with pytest.raises(RequestError) as e:
        build_job("recall", handle, limits, history=[100], exclude_history="yes")
    assert e.value.field == "exclude_history"


def test_handle_run_matches_inference_model(handle, export_dir) -> None:
    """A batch mixing kinds, lengths and queries answers each request as a lone forward pass
    of the plain InferenceModel would (fp32, atol 1e-5)."""
    ref = load_export(export_dir)
    limits = ServingLimits()
    reqs = [("interests", dict(history=[100, 101, 102])),
            ("recall", dict(history=[103, 104], query="soldering", k=5)),
            ("recall", dict(history=[110], k=40, exclude_history=False)),
            ("rank", dict(history=[105, 106, 107, 108], candidates=[100, 120, 103]))]
    jobs = [build_job(kind, handle, limits, **kw) for kind, kw in reqs]
    out = handle.run(jobs)
    for job, res in zip(jobs, out):
        z = ref.interests([job.rows.tolist()], [job.query or ""])  # [1,H,d]
        if job.kind == "interests":
            np.testing.assert_allclose(res["interests"], z[0], atol=1e-5)
        elif job.kind == "recall":
            ex = torch.as_tensor(job.rows[None] if job.exclude_history else np.full((1, 1), -1))
            s, ids = exact_topk(torch.from_numpy(z), torch.tensor(ref.item_emb), job.k, ex)
            found = ids[0].numpy() >= 0  # slots past the corpus size hold -1
            want = ref.items["item_id"].to_numpy()[ids[0].numpy()[found]]
            assert res["item_ids"].tolist() == want.tolist()
            np.testing.assert_allclose(res["scores"], s[0].numpy()[found], atol=1e-5)
            if job.exclude_history:
                assert not set(res["item_ids"].tolist()) & {103, 104}
        else:
            heads = ref.item_emb[job.cand_rows] @ z[0].T
            np.testing.assert_allclose(res["head_scores"], heads, atol=1e-5)
            np.testing.assert_allclose(res["max"], heads.max(1), atol=1e-5)
            assert res["user"]["history_length"] == 4 and len(res["user"]["mixture_weights"]) == 2
    assert len(out[2]["item_ids"]) == 30  # k=40 > 30 items: every item, no padding


def test_run_jobs_answers_each_request_on_its_own_handle(handle, export_dir) -> None:
    other = ModelHandle.from_export(export_dir, ModelSpec(export_path=str(export_dir), dtype="bfloat16"))
    job = Job("interests", np.array([0, 1], np.int64))
    a, b, c = run_jobs([(handle, job), (other, job), (handle, job)])
    np.testing.assert_array_equal(a["interests"], c["interests"])
    assert not np.array_equal(a["interests"], b["interests"])  # bf16 weights: a different model
    np.testing.assert_allclose(a["interests"], b["interests"], atol=0.1)
    assert run_jobs([]) == []


def test_busy_wait_waits_only_while_batches_hold_several_requests() -> None:
    w = BusyWait(0.02)
    assert [w.observe(1) for _ in range(50)] == [0.0] * 50  # a lone client never waits
    assert w.observe(4) == 0.02  # 0.8 * 1 + 0.2 * 4 = 1.6 >= 1.25: busy, wait for company
    waits = [w.observe(1) for _ in range(10)]  # load gone: the average decays back below 1.25
    assert waits[0] == 0.02 and waits[-1] == 0.0
    assert BusyWait(0.02, threshold=0.0).observe(1) == 0.02  # not adaptive: always the full wait
    with pytest.raises(ValueError, match="max_wait_s"):
        BusyWait(-1.0)
    with pytest.raises(ValueError, match="decay"):
        BusyWait(0.01, decay=1.0)


# ---- the model cache (karma.registry.export_dir_of, what replicas load versions through) -------

CACHED = "karma-cache-test"


@pytest.fixture(scope="module")
def registry(export_dir, tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with RunTracker("serving-test", "cache", uri) as t:
        assert register_export(t, export_dir, CACHED, "champion") == "1"
    return uri


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_model_cache_is_private_and_per_user(registry, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("KARMA_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "karma" / "models"
    path = export_dir_of(CACHED, "champion", registry)
    assert path.is_relative_to(root) and (path / "model.safetensors").is_file()
    assert _mode(root) == 0o700
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cache_root() == tmp_path / "home" / ".cache" / "karma" / "models"
    monkeypatch.setenv("KARMA_MODEL_CACHE", str(tmp_path / "mine"))
    assert _cache_root() == tmp_path / "mine"


def test_model_cache_does_not_follow_planted_links_or_markers(registry, tmp_path) -> None:
    cache = tmp_path / "cache"
    first = export_dir_of(CACHED, "1", registry, cache_dir=cache)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    marker = entry / ".karma-export-path"
    planted = tmp_path / "planted"
    (planted / "export").mkdir(parents=True)
    (planted / "marker").write_text(str(planted / "export"))
    # the marker swapped for a symlink to a file that names someone else's folder
    marker.unlink()
    marker.symlink_to(planted / "marker")
    assert export_dir_of(CACHED, "1", registry, cache_dir=cache) == first
    assert not marker.is_symlink() and (first / "model.safetensors").is_file()
    # a plain marker that climbs out of its entry
    marker.write_text("../../planted/export")
    assert export_dir_of(CACHED, "1", registry, cache_dir=cache) == first
    # the whole entry swapped for a symlink to a look-alike folder
    shutil.copytree(entry, planted / "entry")
    shutil.rmtree(entry)
    entry.symlink_to(planted / "entry")
    assert export_dir_of(CACHED, "1", registry, cache_dir=cache) == first
    assert not entry.is_symlink() and entry.is_dir()


def test_model_cache_owned_by_another_user_is_refused(registry, tmp_path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if os.getuid() == 0:
        os.chown(theirs, 65534, 65534)  # nobody
    else:
        theirs = Path("/")  # root's
    with pytest.raises(PermissionError, match="KARMA_MODEL_CACHE"):
        export_dir_of(CACHED, "1", registry, cache_dir=theirs)
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o777)  # ours, but open to others: tightened before use
    export_dir_of(CACHED, "1", registry, cache_dir=mine)
    assert _mode(mine) == 0o700


def test_registry_errors_name_the_model_and_list_what_exists(registry) -> None:
    with pytest.raises(ModelNotFoundError) as e:
        ModelSpec(registered_name=CACHED, alias="nope", tracking_uri=registry).resolve_version()
    msg = str(e.value)
    assert msg.startswith("model.alias:") and f"{CACHED!r} has no alias 'nope'" in msg
    assert "its aliases: {'champion': '1'}" in msg and "get_registered_model" in msg and "set_alias" in msg
    with pytest.raises(ModelNotFoundError, match=r"model.version: .* has no version 9 .* its versions: \[1\]"):
        ModelSpec(registered_name=CACHED, version="9", tracking_uri=registry).resolve_version()
    with pytest.raises(ModelNotFoundError, match=rf"no registered model 'karma-x' .*'{CACHED}'"):
        ModelSpec(registered_name="karma-x", tracking_uri=registry).resolve_version()
    assert ModelSpec(registered_name=CACHED, alias="champion", tracking_uri=registry).resolve_version() == "1"


# ---- authentication ----------------------------------------------------------------------------

GOOD = "a-serving-token-of-32-characters"


def test_read_token_from_the_environment_or_a_file(tmp_path) -> None:
    assert read_token({}) is None and read_token({TOKEN_ENV: ""}) is None
    assert read_token({TOKEN_ENV: GOOD}) == GOOD
    path = tmp_path / "token"
    path.write_text(GOOD + "\n")  # a trailing newline, as `echo` writes it
    assert read_token({TOKEN_FILE_ENV: str(path)}) == GOOD
    for env, fragment in [({TOKEN_ENV: GOOD, TOKEN_FILE_ENV: str(path)}, "set only one"),
                          ({TOKEN_FILE_ENV: str(tmp_path / "missing")}, "cannot read the token file"),
                          ({TOKEN_ENV: "short"}, "at least 16")]:
        with pytest.raises(ValueError, match=fragment):
            read_token(env)
    path.write_text("\n")
    with pytest.raises(ValueError, match=f"{TOKEN_FILE_ENV}=.*is empty"):
        read_token({TOKEN_FILE_ENV: str(path)})


def test_token_matches() -> None:
    assert token_matches(GOOD, GOOD)
    assert not token_matches(GOOD[:-1], GOOD) and not token_matches(GOOD + "x", GOOD) and not token_matches("", GOOD)


@pytest.mark.parametrize("host", [None, "127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_serves_without_a_token(host) -> None:
    assert check_exposure(host, has_token=False, allow_unauthenticated=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "ranker.internal"])
def test_beyond_loopback_needs_a_token_or_the_opt_out(host) -> None:
    with pytest.raises(ExposureError) as e:
        check_exposure(host, has_token=False, allow_unauthenticated=False)
    assert repr(host) in str(e.value) and TOKEN_FILE_ENV in str(e.value) and "allow_unauthenticated=true" in str(e.value)
    assert check_exposure(host, has_token=True, allow_unauthenticated=False) is None
    warning = check_exposure(host, has_token=False, allow_unauthenticated=True)
    assert "WITHOUT authentication" in warning and repr(host) in warning


# ---- non-finite model output --------------------------------------------------------------------


def _broken_copy(export_dir: Path, dst: Path) -> Path:
    shutil.copytree(export_dir, dst)
    return dst


def test_nan_weights_give_an_error_per_request_not_nan(export_dir, tmp_path) -> None:
    bad = _broken_copy(export_dir, tmp_path / "nan-weights")
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k in state if "layers.0" in k and state[k].is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(bad / "model.safetensors"))
    broken, good = ModelHandle.from_export(bad), ModelHandle.from_export(export_dir)
    limits = ServingLimits()
    jobs = [build_job(kind, broken, limits, history=[100, 101], candidates=[102]) for kind in ("interests", "recall",
                                                                                                "rank")]
    out = run_jobs([(h, j) for j in jobs for h in (broken, good)])
    for i in range(0, len(out), 2):
        assert set(out[i]) == {"error"} and isinstance(out[i]["error"], NonFiniteError)
        assert "NaN or infinite" in str(out[i]["error"]) and str(bad) not in str(out[i]["error"])
        assert "error" not in out[i + 1]  # the same batch's requests on a sound model are answered


def test_nan_item_embeddings_are_refused_at_load(export_dir, tmp_path) -> None:
    bad = _broken_copy(export_dir, tmp_path / "nan-items")
    table = pq.read_table(bad / "items.parquet")
    emb = [list(map(float, row)) for row in table.column("embedding").to_pylist()]
    emb[3][0] = float("nan")
    col = table.schema.get_field_index("embedding")
    table = table.set_column(col, "embedding", pa.array(emb, type=table.schema.field("embedding").type))
    pq.write_table(table, bad / "items.parquet")
    with pytest.raises(NonFiniteError, match="1 of 30 item embeddings hold NaN"):
        ModelHandle.from_export(bad)


@pytest.mark.parametrize("offset", [-0.5, 0.3])
def test_seen_offset_model_recalls_its_kept_history_shifted(items, cache_dir, tmp_path, offset) -> None:
    """model.seen_offset served: with exclude_history=false the last max_history items of the
    history are ranked at their score + the learned offset, exactly; older ones and everything
    else at their plain score; with exclude_history (the default) the history is left out as before."""
    cfg = tiny_cfg(cache_dir, "model.seen_offset=true", "loss.history_negatives=true", "data.max_history=3")
    model, tok = build_model(cfg, items, log=None)
    model.seen.value.data.fill_(offset)
    h = ModelHandle.from_export(export_model(model.eval(), tok, cfg, items, tmp_path / "export"))
    limits = ServingLimits(max_history=10)  # a longer history than the model reads (as batch recall sends)
    history = [100, 101, 102, 103, 104]  # rows 0..4: the model reads the last 3
    kept, dropped = h.run([build_job("recall", h, limits, history=history, k=30, exclude_history=False),
                           build_job("recall", h, limits, history=history, k=10)])
    z = h.model.interests([list(range(5))])[0]
    scores = (h.model.item_emb @ z.T).max(axis=1)
    scores[2:5] += offset
    order = np.argsort(-scores, kind="stable")
    np.testing.assert_allclose(kept["scores"], scores[order], atol=1e-5)
    assert sorted(kept["item_ids"].tolist()) == list(range(100, 130))
    assert kept["item_ids"].tolist() != (100 + np.argsort(-(h.model.item_emb @ z.T).max(1))).tolist()  # it moved
    assert not set(dropped["item_ids"].tolist()) & set(history)
