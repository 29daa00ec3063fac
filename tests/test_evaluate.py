"""karma.evaluate: the long-tail breakdown agrees with the overall metrics on the same queries,
the attention read-out of one example is labelled position by position, and the Ray worker's
eval report carries the breakdown."""


import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_cfg
from karma.data import Examples
from karma.evaluate import interest_attention, longest_history, semantic_analyses
from karma.factory import build_model
from karma.metrics import TAIL_THRESHOLD
from karma.retrieval import evaluate_retrieval


def tail_metrics(z, items, targets, counts, ks, threshold=TAIL_THRESHOLD) -> dict:
    """The `tail/` part of evaluate_retrieval's report with training counts."""
    out = evaluate_retrieval(z, items, targets, ks=ks, target_counts=counts, tail_threshold=threshold)
    return {k: v for k, v in out.items() if k.startswith("tail/")}


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 8)).astype(np.float32)
    items = rng.normal(size=(60, 8)).astype(np.float32)
    targets = rng.integers(0, 60, size=200)
    return z, items, targets


def test_tail_of_everything_is_the_overall_report(vectors):
    z, items, targets = vectors
    overall = evaluate_retrieval(z, items, targets, ks=(10, 50))
    tail = tail_metrics(z, items, targets, np.zeros(60, dtype=np.int64), ks=(10, 50))
    assert tail["tail/n_queries"] == overall["n_queries"] == 200
    for key in ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR"):
        assert tail[f"tail/{key}"] == pytest.approx(overall[key], abs=1e-9), key


def test_tail_selects_the_rare_targets(vectors):
    z, items, targets = vectors
    counts = np.where(np.arange(60) % 3 == 0, 2, 7)  # every third item is rare
    tail = tail_metrics(z, items, targets, counts, ks=(10,))
    rare = counts[targets] < 5
    sub = evaluate_retrieval(z[rare], items, targets[rare], ks=(10,))
    assert tail["tail/n_queries"] == int(rare.sum()) > 0
    assert tail["tail/HR@10"] == pytest.approx(sub["HR@10"]) and tail["tail/MRR"] == pytest.approx(sub["MRR"])
    # torch inputs (as the Ray worker passes them) give the same numbers
    again = tail_metrics(torch.from_numpy(z), torch.from_numpy(items), targets, counts, ks=(10,))
    assert again == pytest.approx(tail)
    assert tail_metrics(z, items, targets, counts, ks=(10,), threshold=100)["tail/n_queries"] == 200


@pytest.fixture(scope="module")
def built(items, cache_dir):
    return build_model(tiny_cfg(cache_dir, "model.dropout=0.0"), items, log=None)


def examples(n: int) -> Examples:
    hist = [[(u + j) % 30 for j in range(1 + u % 5)] for u in range(n)]
    return Examples.from_frame(pd.DataFrame({"user_id": range(n), "history": hist,
                                             "target": [(u * 7) % 30 for u in range(n)],
                                             "query": [""] * n, "shown": [[]] * n}))


def test_interest_attention_of_one_example(built):
    model, tok = built
    ex = examples(12)
    row = longest_history(ex)
    assert row == 4 and ex.history_lengths[row] == 5  # the first of the longest
    attn, rows, keys = interest_attention(model, ex.take([row]), tok, 20, "cpu")
    layers, heads = model.cfg.tiny_layers, model.cfg.tiny_heads
    assert attn.shape == (layers * heads, 6) and rows[0] == "L1 H1" and rows[-1] == f"L{layers} H{heads}"
    assert keys == ["item-5", "item-4", "item-3", "item-2", "item-1", "INT1"]
    np.testing.assert_allclose(attn.sum(axis=1), 1.0, atol=1e-5)  # INT_1 is the last token: it sees all


def test_semantic_analyses_report_the_uniform_reference(built, items):
    model, tok = built
    report, pairs = semantic_analyses(model, examples(10), items, tok, 20, "cpu", n=10, decode_tokens=4)
    # histories of 1..5 items + INT_1: 2..6 tokens, all short enough to "sink" under uniform attention
    assert report["sink_rate_first_uniform"] == 1.0
    assert 0 <= report["sink_rate_first"] <= 1 and report["effective_rank"] >= 1 and len(pairs) == 8


def test_training_loop_eval_report_has_the_tail(built, items):
    from karma.train.loop import PlainBackend, TrainData, Trainer

    model, tok = built
    cfg = tiny_cfg("unused", "train.analysis_examples=0", "train.batch_size=8")
    valid = examples(40)
    counts = np.where(np.arange(30) < 10, 1, 20)
    data = TrainData(train=valid, valid=valid, test=valid, items=items, counts=counts)
    trainer = Trainer(PlainBackend(model, cfg.train, 1, torch.device("cpu")), data, tok, cfg, log=lambda m: None)
    metrics = trainer.evaluate(valid)
    ranks = trainer.target_ranks(valid, served=True)  # column 1 without history: a target can only move up
    assert torch.equal(ranks[:, 0], trainer.target_ranks(valid)) and (ranks[:, 1] <= ranks[:, 0]).all()
    served = trainer.report(ranks[:, 1], valid)
    assert served["MRR"] > metrics["MRR"] and served["HR@10"] >= metrics["HR@10"]
    assert metrics["tail/n_queries"] == int((counts[valid.targets] < 5).sum()) > 0
    assert {"tail/HR@10", "tail/NDCG@10", "tail/MRR", "HR@10"} <= set(metrics)


def test_seen_offset_ranks_the_history_shifted(items, cache_dir):
    """model.seen_offset at 0 ranks as the plain model; very negative, as the history excluded
    (the served ranks) for every target outside its history; a target in its history falls with it."""
    from karma.evaluate import target_ranks

    model, tok = build_model(tiny_cfg(cache_dir, "model.dropout=0.0", "model.seen_offset=true",
                                      "loss.history_negatives=true"), items, log=None)
    valid = examples(40)
    ranks = target_ranks(model, valid, tok, 10, "cpu", served=True)
    seen, model.seen = model.seen, None
    assert torch.equal(ranks[:, 0], target_ranks(model, valid, tok, 10, "cpu"))  # offset 0 = plain
    model.seen = seen
    model.seen.value.data.fill_(-1e3)
    low = target_ranks(model, valid, tok, 10, "cpu")
    model.seen.value.data.fill_(1e3)
    high = target_ranks(model, valid, tok, 10, "cpu")
    model.seen.value.data.zero_()
    repeat = np.array([t in h for t, h in zip(valid.targets, valid.to_frame().history)])
    assert repeat.any() and not repeat.all()
    assert torch.equal(low[~repeat], ranks[~repeat, 1]) and not torch.equal(ranks[:, 0], low)
    assert (low[repeat] > len(items) - 6).all()  # behind every item outside the history
    assert (high[repeat] <= 5).all() and (high[~repeat] > 1).all()


def test_seen_items_bench_counts_history_in_the_top_10(built):
    """bench/seen_items.py: the share of top-10 slots held by history items, and ranks with the
    history excluded, which can only move a target up (a target is never excluded)."""
    from conftest import load_script

    from karma.batch import prepare_batch
    from karma.retrieval import exact_topk

    model, tok = built
    ex = examples(40)
    report = load_script("bench/seen_items.py").seen_report(model, ex, tok, 20)
    b = ex.collate(20)
    with torch.no_grad():
        _, top = exact_topk(model.interests(prepare_batch(b, model, tok, "cpu"))["z"].float(),
                            model.item_embeddings().float(), 10)
    hist = [set(h[m].tolist()) for h, m in zip(b["history"], b["history_mask"])]
    want = np.mean([len(set(t.tolist()) & h) / 10 for t, h in zip(top, hist)])
    assert report["top10_share_in_history"] == pytest.approx(want, abs=1e-6) and want > 0
    assert report["targets_in_history"] == pytest.approx(np.mean([t in h for t, h in zip(ex.targets, hist)]))
    kept, excl = report["history_kept"], report["history_excluded"]
    assert excl["HR@10"] >= kept["HR@10"] and excl["MRR"] > kept["MRR"]
