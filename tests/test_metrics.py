import math

import numpy as np
import pytest
import torch

from karma.metrics import (
    auc,
    category_match,
    effective_rank,
    fidelity_report,
    gauc,
    hit_rate,
    long_tail_report,
    mean_pairwise_cosine,
    mrr,
    ndcg,
    ranking_report,
    readout_collapse,
    sink_stats,
    target_ranks,
    token_f1,
    uniform_sink_rate,
)


def test_target_ranks_pessimistic_ties_and_exclusion():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.5, 0.9, 0.5, 0.1]])
    # target 0 (0.5): item 1 (0.9) and item 2 (tie at 0.5) count -> rank 3
    assert target_ranks(scores, torch.tensor([0, 3])).tolist() == [3, 4]
    # excluding item 1 in row 0 removes one competitor; row 1 excludes the target itself
    ex = torch.tensor([[False, True, False, False], [False, False, False, True]])
    assert target_ranks(scores, torch.tensor([0, 3]), ex).tolist() == [2, 4]
    assert target_ranks(scores.numpy(), np.array([1, 2])).dtype == torch.int64
    assert target_ranks(scores, torch.tensor([1, 2])).tolist() == [1, 3]
    with pytest.raises(ValueError, match="targets"):
        target_ranks(scores, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="exclude_mask"):
        target_ranks(scores, torch.tensor([0, 1]), ex[:, :3])


def test_all_equal_scores_rank_last():
    assert target_ranks(torch.zeros(1, 5), torch.tensor([2])).tolist() == [5]
    nan_target = torch.tensor([[float("nan"), 0.1, 0.2]])
    assert target_ranks(nan_target, torch.tensor([0])).tolist() == [3]


def test_ranking_metrics_by_hand():
    ranks = torch.tensor([1, 3, 11])
    assert hit_rate(ranks, 10) == pytest.approx(2 / 3)
    # NDCG@10 = (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3
    assert ndcg(ranks, 10) == pytest.approx(0.5)
    assert mrr(ranks) == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
    rep = ranking_report([1, 3, 11], ks=(1, 10))
    assert rep == pytest.approx({"HR@1": 1 / 3, "NDCG@1": 1 / 3, "HR@10": 2 / 3, "NDCG@10": 0.5, "MRR": 0.4747475})
    # rank 7: 1/log2(8) = 1/3
    assert ndcg([7], 10) == pytest.approx(1 / 3)


def test_infinite_ranks_are_misses():
    ranks = np.array([1.0, math.inf])
    assert hit_rate(ranks, 200) == 0.5
    assert ndcg(ranks, 200) == 0.5
    assert mrr(ranks) == 0.5
    with pytest.raises(ValueError, match="ranks"):
        mrr([0])


def test_auc_by_hand_and_vs_brute_force():
    # pairs: (0.9>0.5)=1, (0.9>0.1)=1, (0.5=0.5)=0.5, (0.5>0.1)=1 -> 3.5/4
    assert auc([0.9, 0.5], [0.5, 0.1]) == pytest.approx(0.875)
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 6, size=40).astype(float)  # few distinct values -> many ties
    neg = rng.integers(0, 5, size=55).astype(float)
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (40 * 55)
    assert auc(pos, neg) == pytest.approx(brute, abs=1e-12)
    assert auc(torch.tensor(pos), torch.tensor(neg)) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError, match="neg_scores"):
        auc([1.0], [])


def test_gauc_by_hand():
    # group 7: labels [1,0,0], scores [.8,.9,.1] -> AUC 0.5, 3 rows
    # group 3: labels [1,1,0,0], scores [.7,.2,.2,.1] -> (1+1+0.5+1)/4 = 0.875, 4 rows
    # group 5: only positives -> skipped
    # gAUC = (3*0.5 + 4*0.875) / 7 = 5/7
    g = [3, 7, 5, 3, 7, 3, 7, 3, 5]
    y = [1, 1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.7, 0.8, 0.3, 0.2, 0.9, 0.2, 0.1, 0.1, 0.4]
    assert gauc(g, y, s) == pytest.approx(5 / 7)
    assert math.isnan(gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3]))


def test_gauc_vs_per_group_brute_force():
    rng = np.random.default_rng(1)
    n = 300
    g = rng.integers(0, 20, size=n)
    y = rng.integers(0, 2, size=n)
    s = rng.integers(0, 4, size=n).astype(float)  # ties across and within groups
    num = den = 0.0
    for gid in np.unique(g):
        m = g == gid
        p, q = s[m & (y == 1)], s[m & (y == 0)]
        if len(p) and len(q):
            a = np.mean([1.0 if i > j else 0.5 if i == j else 0.0 for i in p for j in q])
            num += a * m.sum()
            den += m.sum()
    assert gauc(g, y, s) == pytest.approx(num / den, abs=1e-12)


def _sink_fixture():
    # 1 layer, 2 heads, T=4. Example 0 unpadded, example 1 left-padded (first valid = 1).
    a = torch.zeros(2, 2, 4, 4)
    a[0, 0] = torch.tensor([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0.1, 0.1, 0], [0.7, 0.1, 0.1, 0.1]])
    a[0, 1] = torch.eye(4)  # self-attention
    a[1, 0] = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0.2, 0.8, 0], [0, 0.2, 0.6, 0.2]])
    a[1, 1] = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0.9, 0.1, 0], [0, 0.9, 0.05, 0.05]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    items = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    return a, mask, items


def test_sink_stats_constructed():
    # importance = mean over valid queries q >= k of a[q, k]
    # ex0 h0: k0 = (1+.9+.8+.7)/4 = .85 (first sink); items k1,k2 = .1      -> first
    # ex0 h1: k0 = 1/4; k1 = 1/3, k2 = 1/2 (items, > .3)                     -> item
    # ex1 h0: k1 = (1+.2+.2)/3 = .467 (first valid); item k2 = (.8+.6)/2 = .7 -> first, item
    # ex1 h1: k1 = (1+.9+.9)/3 = .933; item k2 = (.1+.05)/2 = .075           -> first
    # first: 3 of 4 triples, item: 2 of 4
    a, mask, items = _sink_fixture()
    out = sink_stats([a], mask, items, threshold=0.3)
    assert out == pytest.approx({"sink_rate_first": 0.75, "sink_rate_item": 0.5})
    # two identical layers leave the shares unchanged
    assert sink_stats([a, a], mask, items) == pytest.approx(out)
    # a higher threshold drops ex1 h0 (0.467) and ex0 h1's items (1/3, 1/2)
    # but keeps ex1 h0's item k2 (0.7): first 2/4, item 1/4
    assert sink_stats([a], mask, items, threshold=0.6) == pytest.approx(
        {"sink_rate_first": 0.5, "sink_rate_item": 0.25}
    )
    with pytest.raises(ValueError, match="item_mask"):
        sink_stats([a], mask, items[:, :3])


def test_readout_collapse_constructed():
    T = 4
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    qpos = torch.tensor([[3], [3], [2], [3]])  # example 2 is right-padded: its INT row is at 2
    rows = [
        [0.1, 0.1, 0.7, 0.1],  # argmax 2, last valid 3 -> offset 1
        [0.0, 0.1, 0.7, 0.2],  # argmax 2, offset 1
        [0.1, 0.8, 0.1, 0.0],  # argmax 1, last valid 2 -> offset 1
        [0.6, 0.2, 0.1, 0.1],  # argmax 0, offset 3
    ]
    a = torch.zeros(4, 1, T, T)
    for b, r in enumerate(rows):
        a[b, 0, qpos[b, 0]] = torch.tensor(r)
    out = readout_collapse([a], mask, qpos)

    def h(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    ent = [h(rows[0]) / math.log(4), h(rows[1][1:]) / math.log(3), h(rows[2][:3]) / math.log(3), h(rows[3]) / math.log(4)]
    assert out["top1_share"] == pytest.approx((0.7 + 0.7 + 0.8 + 0.6) / 4)
    assert out["entropy"] == pytest.approx(sum(ent) / 4, abs=1e-6)
    assert out["barcode"] == pytest.approx(3 / 4)
    # a [B] query vector is read as H=1
    assert readout_collapse([a], mask, qpos[:, 0]) == pytest.approx(out)
    with pytest.raises(ValueError, match="query_positions"):
        readout_collapse([a], mask, torch.tensor([[4], [3], [2], [3]]))


def test_effective_rank():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    u = torch.tensor([[1.0], [2.0], [-1.0]])
    assert effective_rank(u @ torch.tensor([[0.5, 1.0, 2.0, -1.0]])) == pytest.approx(1.0, abs=1e-6)
    # singular values [2,1,1] -> p = [.5,.25,.25], H = 1.5 ln 2, exp(H) = 2**1.5
    assert effective_rank(np.diag([1.0, 2.0, 1.0])) == pytest.approx(2.8284271)


def test_mean_pairwise_cosine():
    # pairs: cos([1,0],[0,1]) = 0, cos([1,0],[1,1]) = cos([0,1],[1,1]) = 1/sqrt2 -> sqrt2/3
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    assert mean_pairwise_cosine(z) == pytest.approx(0.4714045)
    assert mean_pairwise_cosine(torch.ones(4, 3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="z"):
        mean_pairwise_cosine(torch.ones(1, 3))


def test_token_f1_by_hand():
    # pred -> [cat, sat, on, mat], ref -> [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert token_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    # pred [red, red, blue], ref [red, green]: common 1 -> P = 1/3, R = 1/2, F1 = 0.4
    assert token_f1("red red blue", "Red, green!") == pytest.approx(0.4)
    assert token_f1("", "") == 1.0
    assert token_f1("!!!", "the") == 1.0  # both empty after normalisation
    assert token_f1("", "x") == 0.0
    assert token_f1("x", "y") == 0.0


def test_category_match_and_report():
    assert category_match("Great Sci-Fi movie", "sci-fi") == 1.0
    assert category_match("Movies & TV box set", "Movies & TV") == 1.0
    assert category_match("a drama", "Movies & TV") == 0.0
    assert math.isnan(category_match("x", ""))
    rep = fidelity_report(["red red blue", "cat"], ["red green", "cat"], ["blue", ""])
    assert rep == pytest.approx({"token_f1": 0.7, "category_match": 1.0})
    assert math.isnan(fidelity_report(["a"], ["a"], None)["category_match"])
    with pytest.raises(ValueError, match="refs"):
        fidelity_report(["a"], [], None)


def test_long_tail_report_by_hand():
    ranks = [1, 3, 20, math.inf, 2, 7]
    counts = [0, 4, 5, 2, 10, 5]  # a count equal to the threshold is not in the tail
    r = long_tail_report(ranks, counts, threshold=5, ks=(2, 10))
    # tail = queries 0, 1, 3 with ranks 1, 3, inf
    assert r["tail/n_queries"] == 3
    assert r["tail/HR@2"] == pytest.approx(1 / 3)
    assert r["tail/HR@10"] == pytest.approx(2 / 3)
    assert r["tail/NDCG@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert r["tail/MRR"] == pytest.approx((1 + 1 / 3) / 3)
    assert set(r) == {"tail/HR@2", "tail/NDCG@2", "tail/HR@10", "tail/NDCG@10", "tail/MRR", "tail/n_queries"}
    # the threshold is a parameter: below 1 leaves only the never-trained target
    one = long_tail_report(torch.tensor(ranks), np.array(counts), threshold=1, ks=(10,), prefix="cold/")
    assert one == {"cold/HR@10": 1.0, "cold/NDCG@10": 1.0, "cold/MRR": 1.0, "cold/n_queries": 1}


def test_long_tail_report_without_tail_and_bad_input():
    r = long_tail_report([1, 2], [5, 9], threshold=5, ks=(10,))
    assert r["tail/n_queries"] == 0 and math.isnan(r["tail/HR@10"]) and math.isnan(r["tail/MRR"])
    with pytest.raises(ValueError, match="one count per rank"):
        long_tail_report([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        long_tail_report([1, 2], [0, -1])
    with pytest.raises(ValueError, match="ranks"):
        long_tail_report([0, 2], [0, 1])


def test_uniform_sink_rate_matches_sink_stats_on_uniform_attention():
    # left-padded prompts of 3, 9, 10 and 12 valid tokens: H_n / n > 0.3 exactly for n <= 9
    T = 12
    lengths = [3, 9, 10, 12]
    mask = torch.tensor([[t >= T - n for t in range(T)] for n in lengths])
    assert uniform_sink_rate(mask) == pytest.approx(0.5)
    causal = torch.tril(torch.ones(T, T)).bool() & mask.unsqueeze(1) & mask.unsqueeze(2)
    uniform = causal.float() / causal.float().sum(-1, keepdim=True).clamp(min=1)
    attn = [uniform.unsqueeze(1).expand(-1, 2, -1, -1)]  # one layer, two heads
    stats = sink_stats(attn, mask, torch.zeros_like(mask))
    assert stats["sink_rate_first"] == pytest.approx(uniform_sink_rate(mask))
    assert uniform_sink_rate(mask, threshold=0.2) == 1.0
    with pytest.raises(ValueError, match="no valid token"):
        uniform_sink_rate(torch.zeros(1, 3, dtype=torch.bool))
