"""The SASRec baseline (model.arch=sasrec): shapes, causality and padding, its loss, the plain loop."""

import pytest
import torch

from conftest import tiny_cfg
from karma.data import collate
from karma.evaluate import retrieval_metrics, validation_subset
from karma.factory import build_model
from karma.sasrec import SASRec, sasrec_loss
from karma.batch import prepare_batch
from karma.train.plain import train_plain

SASREC = ("model.arch=sasrec", "model.sasrec_hidden=32", "model.sasrec_heads=2", "data.text_encoder=none")


def make_batch(model, tok, history=None, target=None, query=None):
    history = history or [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], []]
    target = target or [3, 5, 9, 12, 0][: len(history)]
    rows = {"user_id": list(range(len(history))), "history": history, "target": target,
            "query": query or [""] * len(history), "shown": [[]] * len(history)}
    return prepare_batch(collate(rows, 10), model, tok, "cpu")


@pytest.fixture
def sasrec(items, cache_dir):
    model, tok = build_model(tiny_cfg(cache_dir, *SASREC), items, log=None)
    return model, tok


def test_factory_dispatch_and_shapes(sasrec):
    model, tok = sasrec
    assert isinstance(model, SASRec) and model.n_items == 30 and model.max_len == 20
    model.eval()
    batch = make_batch(model, tok)
    out = model(batch)
    assert out["z"].shape == (5, 1, 32) and out["mix_logits"] is None
    assert int(out["n_tokens"]) == 10  # real history items only
    assert model.item_embeddings().shape == (30, 32)
    ids = torch.tensor([0, 29, 7])
    assert torch.equal(model.item_embeddings(ids), model.item_embeddings()[ids])
    assert torch.isfinite(out["z"]).all()  # the empty history too
    # scores: plain inner products with the same table
    assert torch.allclose(model.scores(batch), out["z"][:, 0] @ model.item_embeddings().T)
    # ID-only: search queries pass through the shared batch preparation and are ignored
    queried = make_batch(model, tok, query=["soldering iron", "", "", "", ""])
    assert torch.allclose(model(queried)["z"], out["z"])


def test_causal_and_padding_invariant(sasrec):
    model, tok = sasrec
    model.eval()
    with torch.no_grad():
        hist = [5, 6, 7, 8]
        full = model.encode(torch.tensor([hist]), torch.ones(1, 4, dtype=torch.bool))
        # causality: position i depends only on items <= i (later items cannot leak backwards)
        changed = model.encode(torch.tensor([[5, 6, 7, 11]]), torch.ones(1, 4, dtype=torch.bool))
        assert not torch.allclose(full[0, 3], changed[0, 3], atol=1e-5)
        # left padding (pad value irrelevant, including the real item row 0) changes nothing
        padded = torch.tensor([[0, 0, 0, *hist], [17, 3, 0, *hist]])
        mask = torch.tensor([[False] * 3 + [True] * 4] * 2)
        out = model.encode(padded, mask)
        assert torch.allclose(out[0, -1], full[0, -1], atol=1e-5)
        assert torch.allclose(out[1, -1], full[0, -1], atol=1e-5)
        # a batch mixing lengths gives each row what it gets alone (length grouping is exact)
        batch = make_batch(model, tok)
        z = model.interests(batch)["z"]
        z_small_groups = model.interests(batch, chunk=2)["z"]
        assert torch.allclose(z, z_small_groups, atol=1e-5)
        single = make_batch(model, tok, history=[[5, 6, 7, 8]], target=[9])
        assert torch.allclose(model.interests(single)["z"][0], z[2], atol=1e-5)
        # item row 0 is a real item: a history [0] differs from an empty one
        zero = model.interests(make_batch(model, tok, history=[[0], []], target=[1, 1]))["z"]
        assert not torch.allclose(zero[0], zero[1], atol=1e-4)


def test_one_step_lowers_the_loss(items, cache_dir):
    model, tok = build_model(tiny_cfg(cache_dir, *SASREC, "model.sasrec_dropout=0.0"), items, log=None)
    batch = make_batch(model, tok)
    loss, parts = sasrec_loss(model, batch)
    # softmax cross-entropy over ALL items with inner-product logits
    want = torch.nn.functional.cross_entropy(model.scores(batch), batch["target"])
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(float(loss))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, _ = sasrec_loss(model, batch)
    assert float(after) < float(loss)


@pytest.fixture
def one_thread():
    """A model this small trains several times faster on one thread than on a busy pair."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_plain_loop_sasrec_beats_popularity(cache_dir, one_thread):
    cfg = tiny_cfg(cache_dir, *SASREC, "model.sasrec_dropout=0.2", "train.epochs=4", "train.lr=5e-3",
                   "train.batch_size=64", "data.synthetic_users=400", "train.early_stop_patience=3")
    result = train_plain(cfg, log=lambda m: None)
    assert result["steps"] > 0 and 1 <= result["best_epoch"] <= len(result["epochs"])
    best, pop, before = result["best"]["HR@10"], result["popularity"]["HR@10"], result["before"]["HR@10"]
    assert best > before and best > 1.3 * pop, (before, pop, best)
    assert result["best"]["NDCG@10"] == max(e["NDCG@10"] for e in result["epochs"])
    assert result["test"]["n_queries"] == len(result["prepared"].split.test)
    # the returned model holds the best epoch's weights, not the last epoch's
    valid = validation_subset(result["prepared"].split.valid, cfg.train.eval_max_users)
    again = retrieval_metrics(result["model"], valid, result["tokenizer"], cfg.data.max_history, "cpu", cfg.train.ks)
    assert again["NDCG@10"] == pytest.approx(result["best"]["NDCG@10"], abs=1e-6)
    assert 0 < result["test"]["HR@10"] <= 1
