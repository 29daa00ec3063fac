import math
import sys

import numpy as np
import pytest
import torch

from karma.metrics import ranking_report, target_ranks
from karma.retrieval import ItemIndex, evaluate_retrieval, exact_ranks, exact_topk, ranks_from_topk


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    items = _unit(torch.randn(3000, 16, generator=g))
    q1 = _unit(torch.randn(40, 16, generator=g))
    qh = _unit(torch.randn(40, 3, 16, generator=g))
    # histories: 5 ids per user, some rows padded with -1
    ex = torch.randint(0, 3000, (40, 5), generator=g)
    ex[::3, 3:] = -1
    return items, q1, qh, ex


def _brute(q, items, k, ex=None):
    s = torch.einsum("bhd,nd->bhn", q if q.dim() == 3 else q[:, None], items).amax(1)
    if ex is not None:
        for b in range(s.shape[0]):
            for i in ex[b].tolist():
                if i >= 0:
                    s[b, i] = float("-inf")
    return s.topk(k, dim=1)


def test_exact_topk_matches_brute_force_across_chunks(data):
    items, q1, qh, ex = data
    for q in (q1, qh):
        for e in (None, ex):
            ref_s, ref_i = _brute(q, items, 25, e)
            s, i = exact_topk(q, items, 25, exclude=e, chunk_size=97)  # k < chunk, many merges
            torch.testing.assert_close(s, ref_s)
            assert torch.equal(i, ref_i)
    s, i = exact_topk(qh, items, 120, chunk_size=50)  # k larger than a chunk
    ref_s, ref_i = _brute(qh, items, 120)
    assert torch.equal(i, ref_i)


def test_exact_topk_excluded_ids_never_returned(data):
    items, q1, _, ex = data
    _, ids = exact_topk(q1, items, 50, exclude=ex, chunk_size=1000)
    for b in range(q1.shape[0]):
        assert not set(ids[b].tolist()) & set(x for x in ex[b].tolist() if x >= 0)


def test_exact_topk_pads_when_too_few_items():
    items = torch.eye(3)
    q = torch.tensor([[1.0, 0.5, 0.0]])
    s, i = exact_topk(q, items, 5, exclude=torch.tensor([[1, -1]]))
    assert i.tolist() == [[0, 2, -1, -1, -1]]
    assert s[0, :2].tolist() == [1.0, 0.0] and torch.isinf(s[0, 2:]).all()
    with pytest.raises(ValueError, match="queries"):
        exact_topk(torch.zeros(2, 4), items, 1)
    with pytest.raises(ValueError, match="exclude"):
        exact_topk(q, items, 1, exclude=torch.tensor([1, 2]))


def test_exact_ranks_pessimistic_ties_match_target_ranks():
    # items 0 and 1 are identical, so they tie for the query [1, 0]
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 0 target 0: item 1 ties -> rank 2; row 1 target 3 (0.8) below item 2 (1.0) -> rank 2
    assert exact_ranks(q, items, torch.tensor([0, 3]), chunk_size=3).tolist() == [2, 2]
    # excluding the tying item lifts row 0 to rank 1; a target listed in its own
    # exclude row still competes
    ex = torch.tensor([[1, -1], [3, 2]])
    assert exact_ranks(q, items, torch.tensor([0, 3]), ex, chunk_size=3).tolist() == [1, 1]


def test_exact_ranks_agree_with_full_score_ranks(data):
    items, _, qh, ex = data
    t = torch.arange(40) * 7
    full = torch.einsum("bhd,nd->bhn", qh, items).amax(1)
    mask = torch.zeros_like(full, dtype=torch.bool)
    for b in range(40):
        for i in ex[b].tolist():
            if i >= 0 and i != t[b]:
                mask[b, i] = True
    ex_clean = ex.masked_fill(ex == t[:, None], -1)
    assert torch.equal(exact_ranks(qh, items, t, ex_clean, chunk_size=256), target_ranks(full, t, mask))


@pytest.mark.parametrize("offset", [-0.3, 0.05, 0.4])
def test_exact_ranks_with_an_offset_on_the_excluded_ids_match_the_shifted_score_matrix(data, offset):
    items, _, qh, ex = data
    t = torch.arange(40) * 7
    t[1], t[2] = ex[1, 0], ex[2, 4]  # two targets inside their own history: shifted with it
    ex = ex.clone()
    ex[4, 1] = ex[4, 0]  # a repeated history id is shifted once
    full = torch.einsum("bhd,nd->bhn", qh, items).amax(1)
    shifted = full.clone()
    for b in range(40):
        for i in set(ex[b].tolist()) - {-1}:
            shifted[b, i] += offset
    want = target_ranks(shifted, t, torch.zeros_like(full, dtype=torch.bool))
    for chunk in (97, 4096):  # targets' scores read in a chunk other than the history's
        assert torch.equal(exact_ranks(qh, items, t, ex, chunk_size=chunk, exclude_offset=offset), want)
    assert not torch.equal(want, exact_ranks(qh, items, t, ex, chunk_size=97))


def test_ranks_from_topk():
    r = ranks_from_topk(np.array([[5, 3, 9], [1, 2, 4]]), np.array([9, 7]))
    assert r[0].item() == 3.0 and math.isinf(r[1].item())


def test_flat_index_single_and_multi_head_match_exact(data):
    items, q1, qh, ex = data
    index = ItemIndex(items.numpy(), kind="flat", use_gpu=False)
    assert index.ntotal == 3000 and index.dim == 16 and index.device == "cpu" and index.kind == "flat"
    for q in (q1, qh):
        for e in (None, ex):
            s, i = index.search(q.numpy(), 30, exclude=None if e is None else e.numpy())
            ref_s, ref_i = exact_topk(q, items, 30, exclude=e)
            assert i.dtype == np.int64 and s.shape == (40, 30)
            np.testing.assert_array_equal(i, ref_i.numpy())
            np.testing.assert_allclose(s, ref_s.numpy(), atol=1e-5)
    # multi-head results never repeat an item
    _, i = index.search(qh, 30)
    assert all(len(set(row)) == 30 for row in i.tolist())


def test_index_pads_with_minus_one():
    index = ItemIndex(np.eye(3, dtype=np.float32), use_gpu=False)
    s, i = index.search(np.array([[[1.0, 0.5, 0.0], [0.0, 0.9, 0.0]]], dtype=np.float32), 5, exclude=np.array([[0, -1]]))
    # head scores: item1 max(0.5, 0.9) = 0.9, item2 0; item0 excluded
    assert i.tolist() == [[1, 2, -1, -1, -1]]
    np.testing.assert_allclose(s[0, :2], [0.9, 0.0], atol=1e-6)
    assert np.isneginf(s[0, 2:]).all()


def test_ivf_recall_on_clustered_data():
    rng = np.random.default_rng(0)
    d, n_clusters = 32, 64
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    items = centers[rng.integers(0, n_clusters, 20000)] + 0.3 * rng.standard_normal((20000, d)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = centers[rng.integers(0, n_clusters, 200)] + 0.3 * rng.standard_normal((200, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = ItemIndex(items, kind="ivf", nprobe=16, use_gpu=False)
    assert index.kind == "ivf" and index.index.nlist == round(4 * math.sqrt(20000))
    _, approx = index.search(queries, 10)
    _, exact = exact_topk(torch.from_numpy(queries), torch.from_numpy(items), 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert recall >= 0.9


def test_save_load_roundtrip(tmp_path, data):
    items, q1, _, _ = data
    for kind in ("flat", "ivf"):
        index = ItemIndex(items.numpy(), kind=kind, nlist=20, nprobe=5, use_gpu=False)
        path = tmp_path / f"{kind}.faiss"
        index.save(str(path))
        loaded = ItemIndex.load(str(path), use_gpu=False)
        assert loaded.kind == kind and loaded.ntotal == 3000 and loaded.dim == 16
        if kind == "ivf":
            assert loaded.index.nprobe == 5
        a, b = index.search(q1.numpy(), 10), loaded.search(q1.numpy(), 10)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


def test_evaluate_retrieval_exact_and_through_a_faiss_index(data, monkeypatch):
    items, _, qh, ex = data
    t = torch.arange(40) * 11
    ex = ex.clone()
    ex[0, 0] = t[0]  # a target inside its own history stays rankable
    ex_clean = ex.masked_fill(ex == t[:, None], -1)
    ref = ranking_report(exact_ranks(qh, items, t, ex_clean), ks=(1, 10, 50))
    flat = ItemIndex(items.numpy(), kind="flat", use_gpu=False)
    through_index = evaluate_retrieval(qh, items, t, ks=(1, 10, 50), exclude=ex, index=flat)
    monkeypatch.setitem(sys.modules, "faiss", None)  # a host without faiss (e.g. a bare GPU box)
    exact = evaluate_retrieval(qh, items, t, ks=(1, 10, 50), exclude=ex)
    for out in (exact, through_index):
        assert out["n_queries"] == 40
        for key, v in ref.items():
            assert out[key] == pytest.approx(v, abs=1e-12), key
    # targets chosen as each user's best item give perfect scores
    best = exact_topk(qh, items, 1)[1][:, 0]
    perfect = evaluate_retrieval(qh.numpy(), items.numpy(), best.numpy(), ks=(1, 10))
    assert perfect == pytest.approx({"HR@1": 1.0, "NDCG@1": 1.0, "HR@10": 1.0, "NDCG@10": 1.0, "MRR": 1.0, "n_queries": 40})
    with pytest.raises(ValueError, match="targets"):
        evaluate_retrieval(qh, items, t[:5])


# ---- the GPU-shaped exact path: native-dtype selection, two-stage top-k, sync-free exclusion ----

def _reference_topk(queries, items, k, exclude=None, chunk_size=65536):
    """exact_topk as it was before the fast path: fp32 upcast of every chunk's scores,
    exclusions through nonzero(), one top-k per chunk merged into a running top-k."""
    q = queries if queries.dim() == 3 else queries[:, None]
    q = q.to(items.dtype)
    B, N = q.shape[0], items.shape[0]
    best_s = torch.full((B, k), float("-inf"))
    best_i = torch.full((B, k), -1, dtype=torch.long)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        s = torch.einsum("bhd,nd->bhn", q, items[start:end]).amax(dim=1).float()
        if exclude is not None:
            hit = (exclude >= start) & (exclude < end)
            rows, cols = hit.nonzero(as_tuple=True)
            s[rows, exclude[rows, cols] - start] = float("-inf")
        cs, ci = s.topk(min(k, end - start), dim=1)
        best_s, pick = torch.cat([best_s, cs], 1).topk(k, dim=1)
        best_i = torch.cat([best_i, ci + start], 1).gather(1, pick)
    return best_s, best_i.masked_fill(best_s == float("-inf"), -1)


@pytest.mark.parametrize("block", [0, 64, 100, 512])
def test_fast_path_returns_the_reference_items(data, block):
    """Same chunking, so the same matmul roundings: identical ids and scores, bit for bit."""
    items, q1, qh, ex = data
    for q in (q1, qh):
        for e in (None, ex):
            for k in (1, 37, 200):
                ref_s, ref_i = _reference_topk(q, items, k, e, chunk_size=997)
                s, i = exact_topk(q, items, k, exclude=e, chunk_size=997, block=block)
                assert torch.equal(i, ref_i), (k, block)
                assert torch.equal(s, ref_s), (k, block)


def test_bigger_chunks_differ_only_in_rounding_ties(data):
    """Another chunk width changes matmul blocking by an ulp; ids may swap only between
    scores that close."""
    items, q1, _, ex = data
    ref_s, ref_i = _reference_topk(q1, items, 200, ex, chunk_size=997)
    s, i = exact_topk(q1, items, 200, exclude=ex, chunk_size=3000, block=256)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-6)
    for row in range(i.shape[0]):
        for col in (i[row] != ref_i[row]).nonzero().flatten().tolist():
            near = (ref_s[row] - s[row, col]).abs() <= 1e-6
            assert int(i[row, col]) in ref_i[row][near].tolist()


def test_low_precision_scoring_selects_in_that_dtype(data):
    items, q1, qh, ex = data
    for dtype in (torch.bfloat16, torch.float16):
        ref_s, ref_i = _reference_topk(qh.to(dtype), items.to(dtype), 50, ex)
        s, i = exact_topk(qh, items, 50, exclude=ex, block=128, score_dtype=dtype)
        assert s.dtype == torch.float32
        # low precision makes exact ties: the scores agree, and ids only trade places within a tie
        assert torch.equal(s, ref_s)
        for row in range(i.shape[0]):
            for col in (i[row] != ref_i[row]).nonzero().flatten().tolist():
                assert s[row, col] in ref_s[row][ref_s[row] == s[row, col]]
                assert int(i[row, col]) not in ref_i[row].tolist() or ref_s[row][ref_i[row] == i[row, col]] == s[row, col]


def test_exclusion_scatter_handles_duplicates_padding_and_chunk_edges():
    items = _unit(torch.randn(50, 8, generator=torch.Generator().manual_seed(3)))
    q = items[:2] * 10  # each query's best item is itself
    ex = torch.tensor([[0, 0, -1, 49, 20], [-1, -1, -1, -1, 1]])
    for chunk in (7, 20, 49, 50):
        _, ids = exact_topk(q, items, 50, exclude=ex, chunk_size=chunk, block=4)
        assert not ({0, 49, 20} & set(ids[0].tolist())) and 1 not in ids[1].tolist()
        assert (ids[0] == -1).sum() == 3 and (ids[1] == -1).sum() == 1


def test_fast_path_arguments():
    items = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="block"):
        exact_topk(torch.zeros(1, 4), items, 1, block=-1)
    from karma.retrieval import _defaults

    assert _defaults(torch.device("cuda")) == (1 << 20, 0) and _defaults(torch.device("cpu")) == (65_536, 0)
