"""Exact ranks and top-k chunked over users as well as items: the same answers as a full score
matrix, whatever the chunk sizes, on inputs full of ties, NaNs, duplicates and exclusions."""

import numpy as np
import pytest
import torch

from karma.metrics import long_tail_report, ranking_report, target_ranks
from karma.retrieval import ItemIndex, evaluate_retrieval, exact_ranks, exact_topk

N, B, D, H = 400, 150, 8, 3


def reference_ranks(q: torch.Tensor, items: torch.Tensor, t: torch.Tensor, ex: torch.Tensor | None = None):
    """karma.metrics.target_ranks on the full [B,N] score matrix (pessimistic ties, NaN scores
    against the target, a NaN target last); a target in its own exclude row still competes."""
    s = torch.einsum("bhd,nd->bhn", q if q.dim() == 3 else q[:, None], items).amax(1)
    mask = torch.zeros_like(s, dtype=torch.bool)
    if ex is not None:
        for b, i in (ex >= 0).nonzero().tolist():
            mask[b, ex[b, i]] = True
    mask[torch.arange(len(t)), t] = False
    return target_ranks(s, t, mask)


def quantised(*shape, generator) -> torch.Tensor:
    """Multiples of 0.5 in [-1.5, 1.5]: every score is exact in float32 whatever the summation
    order, and many scores tie."""
    return torch.randint(-3, 4, shape, generator=generator).float() / 2


@pytest.fixture(scope="module")
def tied():
    g = torch.Generator().manual_seed(0)
    items = quantised(N, D, generator=g)
    items[300:340] = items[:40]  # duplicated rows: targets tie with their copies
    items[7] = float("nan")  # a NaN item beats every target
    q1, qh = quantised(B, D, generator=g), quantised(B, H, D, generator=g)
    q1[5], qh[6, 1] = float("nan"), float("nan")  # NaN queries: NaN targets
    t = torch.randint(0, N, (B,), generator=g)
    t[:40] = torch.arange(40)  # targets whose copies compete
    ex = torch.randint(0, N, (B, 6), generator=g)
    ex[::4, 4:] = -1  # padding
    ex[1::5, 0] = t[1::5]  # a target in its own history
    ex[2::7, 1] = ex[2::7, 2]  # the same id twice
    ex[3, :3] = torch.tensor([300, 301, 302])  # copies of the first targets, excluded
    ex[8, 5] = 7  # the NaN item, excluded: it no longer counts
    return items, q1, qh, t, ex


@pytest.mark.parametrize("user_chunk,chunk_size", [(1, N), (7, 13), (64, 97), (B, N), (1000, 4096), (33, N - 1)])
def test_chunked_ranks_equal_the_full_score_matrix(tied, user_chunk, chunk_size):
    items, q1, qh, t, ex = tied
    for q in (q1, qh):
        for e in (None, ex):
            ref = reference_ranks(q, items, t, e)
            got = exact_ranks(q, items, t, e, chunk_size, user_chunk=user_chunk)
            assert got.dtype == torch.long
            assert torch.equal(got, ref), (q.dim(), e is None, (got != ref).nonzero()[:5].tolist())
        if e is None:  # the NaNs and ties did bite: NaN targets last, many targets below rank 1
            assert (ref[[5, 6]] == N).all() and (ref > 1).sum() > B // 2


def test_targets_sharing_one_item_chunk_take_the_one_matmul_path(tied):
    """All of a block's targets in one item chunk (not the first): that chunk is scored first."""
    items, _, qh, t, ex = tied
    t_late = 350 + t % 50  # chunks of 50: every target in the last chunk
    for user_chunk in (16, B):
        got = exact_ranks(qh, items, t_late, ex, chunk_size=50, user_chunk=user_chunk)
        assert torch.equal(got, reference_ranks(qh, items, t_late, ex))


def test_ties_count_against_the_target(tied):
    items, q1, _, _, _ = tied
    q = q1[10:11]
    t = torch.tensor([3])  # item 303 is its copy: they tie, so the target cannot rank first
    with_copy = exact_ranks(q, items, t, chunk_size=64, user_chunk=1)
    without = exact_ranks(q, items, t, torch.tensor([[303]]), chunk_size=64, user_chunk=1)
    assert with_copy.item() == without.item() + 1


def _ranks_before_user_chunks(queries, items, targets, exclude=None, chunk_size=65536):
    """exact_ranks as it was before user chunks: every user against each item chunk at once."""
    q = (queries if queries.dim() == 3 else queries[:, None]).to(items.dtype)
    B, N = q.shape[0], items.shape[0]

    def scores(qq, start, end):
        return torch.einsum("bhd,nd->bhn", qq, items[start:end]).amax(1).float()

    tgt = torch.empty(B)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        rows = ((targets >= start) & (targets < end)).nonzero(as_tuple=True)[0]
        if rows.numel():
            tgt[rows] = scores(q[rows], start, end)[torch.arange(rows.numel()), targets[rows] - start]
    rank = torch.ones(B, dtype=torch.long)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        s = scores(q, start, end)
        if exclude is not None:
            hit = (exclude >= start) & (exclude < end)
            r, c = hit.nonzero(as_tuple=True)
            s[r, exclude[r, c] - start] = float("-inf")
        rows = ((targets >= start) & (targets < end)).nonzero(as_tuple=True)[0]
        s[rows, targets[rows] - start] = float("-inf")
        rank += ((s >= tgt.unsqueeze(1)) | s.isnan() | tgt.isnan().unsqueeze(1)).sum(dim=1)
    return rank


def test_same_ranks_as_before_on_float_embeddings():
    """Unit vectors (no designed ties): the ranks of the pre-user-chunk code, for every split."""
    g = torch.Generator().manual_seed(1)
    items = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(200, 2, 16, generator=g), dim=-1)
    t = torch.randint(0, 2000, (200,), generator=g)
    ex = torch.randint(-1, 2000, (200, 10), generator=g)
    ex = ex.masked_fill(ex == t[:, None], -1)
    for chunk_size in (300, 2000):
        before = _ranks_before_user_chunks(q, items, t, ex, chunk_size)
        for user_chunk in (1, 37, 200):
            assert torch.equal(exact_ranks(q, items, t, ex, chunk_size, user_chunk=user_chunk), before)


def test_evaluate_retrieval_metrics_equal_the_reference(tied):
    items, _, qh, t, ex = tied
    counts = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(2)).numpy()
    ks = (1, 10, 50)
    ref_ranks = reference_ranks(qh, items, t, ex.masked_fill(ex == t[:, None], -1))
    expected = {**ranking_report(ref_ranks.double(), ks), "n_queries": B,
                **long_tail_report(ref_ranks, counts[t.numpy()], 5, ks)}
    for user_chunk, chunk_size in ((None, 65536), (17, 101), (B, 1000)):
        got = evaluate_retrieval(qh, items, t, ks=ks, exclude=ex, chunk_size=chunk_size, target_counts=counts,
                                 user_chunk=user_chunk)
        assert got.keys() == expected.keys()
        for key, v in expected.items():
            assert got[key] == v or (np.isnan(v) and np.isnan(got[key])), (user_chunk, key)


def test_index_path_searched_in_user_chunks_matches_one_search():
    g = torch.Generator().manual_seed(3)
    items = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(90, 2, 16, generator=g), dim=-1)
    t = torch.randint(0, 500, (90,), generator=g)
    ex = torch.randint(-1, 500, (90, 4), generator=g)
    index = ItemIndex(items.numpy(), kind="flat", use_gpu=False)
    whole = evaluate_retrieval(q, items, t, ks=(5, 20), index=index, exclude=ex, user_chunk=90)
    for user_chunk in (1, 13):
        assert evaluate_retrieval(q, items, t, ks=(5, 20), index=index, exclude=ex, user_chunk=user_chunk) == whole
    assert whole["HR@20"] > 0  # some targets are found, so the index half is exercised


def test_exact_topk_in_user_chunks_equals_one_block(tied):
    """Exact scores (quantised inputs), so any user split gives the same rows, ties included."""
    items, _, qh, _, ex = tied
    items = items.nan_to_num(0.0)
    qh = qh.nan_to_num(0.0)
    whole = exact_topk(qh, items, 30, exclude=ex, chunk_size=128, user_chunk=B)
    for user_chunk in (1, 7, B - 1):
        part = exact_topk(qh, items, 30, exclude=ex, chunk_size=128, user_chunk=user_chunk)
        assert torch.equal(part[0], whole[0]) and torch.equal(part[1], whole[1])


def test_embeddings_that_require_grad_are_ranked_without_a_graph(tied):
    """A model's outputs (SASRec's interests, say) may still require grad."""
    items, q1, _, t, ex = tied
    q = q1.nan_to_num(0.0).requires_grad_()
    ranks = exact_ranks(q, items.clone().requires_grad_(), t, ex, chunk_size=97, user_chunk=64)
    assert not ranks.requires_grad and torch.equal(ranks, reference_ranks(q.detach(), items.detach(), t, ex))
    scores, _ = exact_topk(q, items, 5, user_chunk=64)
    assert not scores.requires_grad


def test_chunk_arguments_are_checked(tied):
    items, q1, _, t, _ = tied
    for kw in ({"user_chunk": 0}, {"chunk_size": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            exact_ranks(q1, items, t, **kw)
        with pytest.raises(ValueError, match=next(iter(kw))):
            exact_topk(q1, items, 5, **kw)
