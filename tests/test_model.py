"""The KARMA model and its step: shapes, invariances, losses that learn, branches that skip."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from karma.data import collate
from karma.export import export_model, load_export
from karma.factory import build_model
from karma.batch import prepare_batch
from karma.step import NegativeSampler, karma_losses


def make_batch(model, tok, queries=None):
    rows = {"user_id": [0, 1, 2, 3], "history": [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]],
            "target": [3, 5, 9, 12], "query": queries or [""] * 4, "shown": [[]] * 4}
    return prepare_batch(collate(rows, 10), model, tok, "cpu")


@pytest.fixture(scope="module")
def built(items, cache_dir):
    return {h: build_model(tiny_cfg(cache_dir, f"model.n_interest={h}"), items, log=None) for h in (1, 4)}


@pytest.mark.parametrize("heads", [1, 4])
def test_shapes(built, heads):
    model, tok = built[heads]
    batch = make_batch(model, tok)
    out = model(batch, gen_rows=torch.ones(4, dtype=torch.bool))
    d = model.cfg.embed_dim
    assert out["z"].shape == (4, heads, d)
    assert torch.allclose(out["z"].norm(dim=-1), torch.ones(4, heads), atol=1e-5)
    # a static shape: every text position of every row, padding labelled -100
    assert out["gen_logits"].shape == (4 * model.item_tokens.shape[1], tok.vocab_size)
    assert out["gen_labels"].shape == (4 * model.item_tokens.shape[1],)
    # every target token and its EOS is a label: lengths of the 4 targets' texts
    assert int((out["gen_labels"] != -100).sum()) == int(model.item_token_len[batch["target"]].sum())
    rec = model.reconstruct(out["z"], batch["target"])
    assert torch.equal(rec["rec_labels"], out["gen_labels"])
    assert model.item_embeddings().shape == (30, d)
    maps = model.attention_maps(batch)
    assert len(maps["attentions"]) == model.cfg.tiny_layers
    assert maps["query_positions"].shape == (4, heads)


def test_interest_path_ignores_generation_suffix_and_padding(built):
    model, tok = built[4]
    model.eval()
    batch = make_batch(model, tok)
    z_inf = model.interests(batch)["z"]
    z_train = model(batch, gen_rows=torch.ones(4, dtype=torch.bool))["z"]
    assert torch.allclose(z_inf, z_train, atol=1e-5)  # causal: the appended text never reaches INT
    single = prepare_batch(collate({"user_id": [3], "history": [[9]], "target": [12], "query": [""],
                                    "shown": [[]]}, 10), model, tok, "cpu")
    assert torch.allclose(model.interests(single)["z"][0], z_inf[3], atol=1e-5)  # left padding is inert


def test_query_changes_interests(built):
    model, tok = built[1]
    model.eval()
    plain = model.interests(make_batch(model, tok))["z"]
    queried = model.interests(make_batch(model, tok, ["hakko soldering", "", "", ""]))["z"]
    assert not torch.allclose(plain[0], queried[0], atol=1e-4)
    assert torch.allclose(plain[1:], queried[1:], atol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_one_step_lowers_each_loss(items, cache_dir, heads):
    model, tok = build_model(tiny_cfg(cache_dir, f"model.n_interest={heads}", "model.dropout=0.0"), items, log=None)
    cfg = tiny_cfg(cache_dir, "loss.w_gen=1.0", "loss.w_rec=1.0", "loss.n_negatives=8")
    batch = make_batch(model, tok)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sampler = NegativeSampler(np.ones(30), 8, seed=0)

    def losses():
        sampler.load_state_dict(frozen)  # the same negatives before and after the step
        return karma_losses(model, batch, cfg.loss, sampler)

    frozen = sampler.state_dict()
    loss, before = losses()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        _, after = losses()
    for part in ("loss_action", "loss_gen", "loss_rec"):
        assert float(after[part]) < float(before[part]), part


def test_zero_weight_skips_branch(built, cache_dir, monkeypatch):
    model, tok = built[1]
    cfg = tiny_cfg(cache_dir, "loss.w_gen=0", "loss.w_rec=0")
    calls = []
    monkeypatch.setattr(model, "reconstruct", lambda *a, **k: calls.append("rec"))
    _, parts = karma_losses(model, make_batch(model, tok), cfg.loss, None)
    assert "loss_gen" not in parts and "loss_rec" not in parts and calls == []
    assert float(parts["loss"]) == pytest.approx(float(parts["loss_action"]))


@pytest.mark.parametrize("heads", [1, 4])
def test_full_softmax_is_cross_entropy_over_every_item(built, cache_dir, heads):
    model, tok = built[heads]
    model.eval()
    assert model.cfg.head_reduce == "max"  # the reduction the reference below uses
    batch = make_batch(model, tok)
    cfg = tiny_cfg(cache_dir, "loss.negatives=all", "loss.w_gen=0", "loss.w_rec=0")
    sampler = NegativeSampler(np.ones(30), 8, seed=0)
    state = sampler.state_dict()
    with torch.no_grad():
        _, parts = karma_losses(model, batch, cfg.loss, sampler)
        z = model.interests(batch)["z"]  # [B,H,d]
        scores = torch.einsum("bhd,nd->bhn", z, model.item_embeddings()).max(dim=1).values  # [B, 30]
        want = torch.nn.functional.cross_entropy(scores / model.tau, batch["target"])
    assert float(parts["loss_action"]) == pytest.approx(float(want), rel=1e-5)
    assert torch.equal(sampler.state_dict()["gen"], state["gen"])  # nothing sampled
    # sampled candidates see a subset of the items: a different (smaller) loss on the same batch
    _, sampled = karma_losses(model, batch, tiny_cfg(cache_dir, "loss.n_negatives=4").loss,
                              NegativeSampler(np.ones(30), 4, seed=0))
    assert float(sampled["loss_action"]) != pytest.approx(float(want), rel=1e-3)


@pytest.mark.parametrize("heads", [1, 4])
def test_history_negatives_add_each_rows_own_items(built, cache_dir, heads):
    """loss.history_negatives: the action loss is the sampled one with each row's history items
    appended to that row's logits (log q of a sure candidate: -log n without in-batch logQ)."""
    model, tok = built[heads]
    model.eval()
    batch = make_batch(model, tok)
    plain_cfg = tiny_cfg(cache_dir, "loss.n_negatives=4", "loss.w_gen=0", "loss.w_rec=0")
    hist_cfg = tiny_cfg(cache_dir, "loss.n_negatives=4", "loss.w_gen=0", "loss.w_rec=0", "loss.history_negatives=true")
    with torch.no_grad():
        sampler = NegativeSampler(np.ones(30), 4, seed=0)
        negs = sampler.sample()
        sampler = NegativeSampler(np.ones(30), 4, seed=0)
        _, parts = karma_losses(model, batch, hist_cfg.loss, sampler)
        z = model.interests(batch)["z"]
        cand_ids = torch.cat([batch["target"], negs])
        shared = torch.einsum("bhd,cd->bhc", z, model.item_embeddings(cand_ids)).amax(1) / model.tau
        shared = shared - sampler.log_p[cand_ids]
        dup = cand_ids.unsqueeze(0) == batch["target"].unsqueeze(1)
        dup[torch.arange(len(dup)), torch.arange(len(dup))] = False
        shared = shared.masked_fill(dup, float("-inf"))
        own = torch.einsum("bhd,bld->bhl", z, model.item_embeddings(batch["history"])).amax(1) / model.tau
        drop = ~batch["history_mask"] | (batch["history"] == batch["target"].unsqueeze(1))
        own = (own + math.log(4)).masked_fill(drop, float("-inf"))
        want = torch.nn.functional.cross_entropy(torch.cat([shared, own], 1), torch.arange(len(dup)))
        _, plain = karma_losses(model, batch, plain_cfg.loss, NegativeSampler(np.ones(30), 4, seed=0))
    assert float(parts["loss_action"]) == pytest.approx(float(want), rel=1e-5)
    assert float(parts["loss_action"]) > float(plain["loss_action"])


def test_decode_fraction_limits_decoding_rows(built, cache_dir):
    model, tok = built[1]
    batch = make_batch(model, tok)
    full = karma_losses(model, batch, tiny_cfg(cache_dir).loss, None)[1]["n_tokens"]
    half = karma_losses(model, batch, tiny_cfg(cache_dir, "loss.decode_fraction=0.5").loss, None)[1]["n_tokens"]
    assert int(half) < int(full)


def assert_export_matches(model, tok, cfg, items, folder, hist=([0, 1, 2], [5, 6, 7, 8])):
    """Exports `model` (in eval mode), reloads the export, and checks that the reload computes
    the same interests for `hist` and the same item table; returns the reload."""
    export_model(model, tok, cfg, items, folder)
    loaded = load_export(folder)
    n = len(hist)
    batch = prepare_batch(collate({"user_id": list(range(n)), "history": list(hist), "target": [0] * n,
                                   "query": [""] * n, "shown": [[]] * n}, 10), model, tok, "cpu")
    np.testing.assert_allclose(loaded.interests(list(hist)), model.interests(batch)["z"].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.item_emb, model.item_embeddings().detach().numpy(), atol=1e-6)
    return loaded


def test_export_roundtrip(built, items, cache_dir, tmp_path):
    model, tok = built[4]
    model.eval()
    loaded = assert_export_matches(model, tok, tiny_cfg(cache_dir, "model.n_interest=4"), items, tmp_path / "export")
    assert loaded.rows_of([100, 129, 5]).tolist() == [0, 29, -1]
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "export").rglob("*"))


def test_missing_export_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a KARMA export"):
        load_export(tmp_path)


def test_lora_trains_adapters_only_and_exports(items, cache_dir, tmp_path):
    cfg = tiny_cfg(cache_dir, "model.lora=true", "model.lora_r=4")
    model, tok = build_model(cfg, items, log=None)
    backbone_trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert backbone_trainable and all("lora_" in n for n in backbone_trainable)
    model.eval()
    assert_export_matches(model, tok, cfg, items, tmp_path / "lora", hist=([0, 1, 2], [5, 6]))


@pytest.fixture(scope="module")
def text_channel(items, cache_dir):
    cfg = tiny_cfg(cache_dir, "model.text_channel=true", "model.n_interest=2")
    return build_model(cfg, items, log=None) + (cfg,)


def test_text_channel_widens_unit_embeddings(text_channel):
    model, tok, _ = text_channel
    model.eval()
    width = model.cfg.embed_dim + model.items.text_emb.shape[1]
    out = model(make_batch(model, tok), gen_rows=torch.ones(4, dtype=torch.bool), rec_rows=4,
                cand_ids=torch.arange(30))
    assert model.retrieval_dim == width and out["z"].shape == (4, 2, width)
    assert torch.allclose(out["z"].norm(dim=-1), torch.ones(4, 2), atol=1e-5)
    assert torch.allclose(out["cand"].norm(dim=-1), torch.ones(30), atol=1e-5)
    assert out["rec_logits"].shape[0] == out["gen_logits"].shape[0]  # reconstruction reads the wide z
    # the item's text half is its frozen text embedding itself, untouched by any layer
    assert torch.allclose(out["cand"][:, model.cfg.embed_dim:] * 2 ** 0.5, model.items.text_emb, atol=1e-6)


def test_whole_item_table_is_encoded_in_chunks_alike(text_channel, monkeypatch):
    """Without a graph the whole table is encoded chunk by chunk (bounded temporaries at any
    catalogue size): the same rows as encoding every id at once, and the graph path is unchunked."""
    import karma.model

    model, _, _ = text_channel
    model.eval()
    with torch.no_grad():
        whole = model.item_embeddings(torch.arange(model.n_items))
        monkeypatch.setattr(karma.model, "ITEM_CHUNK", 7)  # the fixture's catalogue in several chunks
        chunked = model.item_embeddings()
    assert model.n_items > 14 and chunked.shape == whole.shape == (model.n_items, model.retrieval_dim)
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert model.item_embeddings().requires_grad  # training keeps the one-pass, differentiable path


def test_text_channel_starts_as_the_last_items_text_neighbour(text_channel):
    """With the text half weighted up and a steep recency decay, a query is the newest history
    item's text: that item (the nearest text there is to itself) ranks first, and older
    history items or left padding do not move it."""
    model, tok, _ = text_channel
    model.eval()
    with torch.no_grad():
        model.pointer.log_weight.fill_(6.0)
        model.pointer.log_decay.fill_(4.0)
        batch = make_batch(model, tok)
        scores = torch.einsum("bhd,nd->bhn", model.interests(batch)["z"], model.item_embeddings()).max(1).values
        newest = batch["history"][:, -1]
        assert torch.equal(scores.argmax(1), newest)
        model.pointer.log_weight.zero_()
        model.pointer.log_decay.fill_(math.log(0.5))


def test_text_channel_exports_and_serves_the_same(text_channel, items, tmp_path):
    model, tok, cfg = text_channel
    model.eval()
    assert_export_matches(model, tok, cfg, items, tmp_path / "export")


def test_id_shrinkage_leans_rare_items_on_their_text(items, cache_dir, tmp_path):
    """model.id_shrinkage=k, when retrieving: an item's learned half is weighed by n / (n + k). An
    item never seen in training is its text alone; a frequent one is near [e ; t] / sqrt 2; every
    row stays unit length; the weights travel with the export; the counts are required; and
    training still sees the plain channel."""
    cfg = tiny_cfg(cache_dir, "model.text_channel=true", "model.id_shrinkage=2")
    counts = np.zeros(len(items), np.int64)
    counts[1], counts[2] = 2, 10_000
    model, tok = build_model(cfg, items, log=None, counts=counts)
    model.eval()
    d = model.cfg.embed_dim
    with torch.no_grad():
        table = model.item_embeddings()
    assert torch.allclose(table.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
    text = model.items.text_emb
    assert torch.allclose(table[0], torch.cat([torch.zeros(d), text[0]]), atol=1e-6)  # unseen: text alone
    c = 2 / (2 + 2)  # n = k: the learned half at half weight
    assert torch.allclose(table[1, d:], text[1] / math.sqrt(c * c + 1), atol=1e-6)
    assert torch.allclose(table[2, d:] * 2 ** 0.5, text[2], atol=1e-3)  # frequent: the plain channel
    assert_export_matches(model, tok, cfg, items, tmp_path / "export")
    model.train()
    with torch.no_grad():
        assert torch.allclose(model.item_embeddings()[0, d:] * 2 ** 0.5, text[0], atol=1e-6)
    with pytest.raises(ValueError, match="need the training count of every item"):
        build_model(cfg, items, log=None)


def test_train_id_shrinkage_acts_in_training_only(items, cache_dir, tmp_path):
    """model.train_id_shrinkage=k: training weighs the learned half by n / (n + k), so an item
    never seen in training is its text alone there and its learned half gets no gradient; retrieval
    is the plain channel (model.id_shrinkage=0), and the export, which has no counts, serves it."""
    cfg = tiny_cfg(cache_dir, "model.text_channel=true", "model.train_id_shrinkage=2")
    counts = np.zeros(len(items), np.int64)
    counts[2] = 10_000
    model, tok = build_model(cfg, items, log=None, counts=counts)
    d = model.cfg.embed_dim
    text = model.items.text_emb
    model.train()
    table = model.item_embeddings()
    assert torch.allclose(table[0], torch.cat([torch.zeros(d), text[0]]), atol=1e-6)
    model.zero_grad()
    table[0, :d].sum().backward(retain_graph=True)
    assert model.items.id_emb.weight.grad is None or not model.items.id_emb.weight.grad[0].any()
    table[2, :d].sum().backward()
    assert model.items.id_emb.weight.grad[2].any()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.item_embeddings()[0, d:] * 2 ** 0.5, text[0], atol=1e-6)  # retrieval: plain
    assert "train_trust" not in model.state_dict()
    assert_export_matches(model, tok, cfg, items, tmp_path / "export")


def test_reconstruction_can_read_the_learned_half_alone(items, cache_dir):
    """model.rec_input=learned: reconstruction decodes from the learned half of z, so the text
    channel's half (the pointer) gets no gradient from it, while the learned half does."""
    cfg = tiny_cfg(cache_dir, "model.text_channel=true", "model.rec_input=learned")
    model, tok = build_model(cfg, items, log=None)
    assert model.rec_proj.in_features == model.cfg.embed_dim
    batch = make_batch(model, tok)
    out = model(batch, rec_rows=4)
    z = out["z"]
    z.retain_grad()
    torch.nn.functional.cross_entropy(out["rec_logits"], out["rec_labels"], ignore_index=-100).backward()
    assert z.grad[..., : model.cfg.embed_dim].abs().sum() > 0
    assert z.grad[..., model.cfg.embed_dim:].abs().sum() == 0


def test_query_text_scale_weighs_the_text_half_when_retrieving(items, cache_dir):
    """model.query_text_scale: the query's text half is scaled before the final normalisation,
    when retrieving only; the learned half keeps its direction."""
    base = tiny_cfg(cache_dir, "model.text_channel=true")
    model, tok = build_model(base, items, log=None)
    batch = make_batch(model, tok)
    d = model.cfg.embed_dim
    model.eval()
    with torch.no_grad():
        z1 = model.interests(batch)["z"]
        model.cfg.query_text_scale = 3.0
        z3 = model.interests(batch)["z"]
        model.train()
        z_train = model.interests(batch)["z"]
    ratio = lambda z: z[..., d:].norm(dim=-1) / z[..., :d].norm(dim=-1)
    assert torch.allclose(ratio(z3), 3 * ratio(z1), rtol=1e-4)
    assert torch.allclose(torch.nn.functional.normalize(z3[..., :d], dim=-1),
                          torch.nn.functional.normalize(z1[..., :d], dim=-1), atol=1e-5)
    assert torch.allclose(z_train, z1, atol=1e-5)  # dropout is 0 here: train mode is the plain query


def test_seen_offset_learns_from_the_history_negatives(items, cache_dir):
    """model.seen_offset: at 0 the loss is history negatives' own; its gradient says whether the
    history's items should rise or fall (here the targets are never in the history: fall)."""
    cfg = tiny_cfg(cache_dir, "loss.n_negatives=4", "loss.w_gen=0", "loss.w_rec=0", "loss.history_negatives=true")
    seen_cfg = tiny_cfg(cache_dir, "loss.n_negatives=4", "loss.w_gen=0", "loss.w_rec=0",
                        "loss.history_negatives=true", "model.seen_offset=true")
    plain, tok = build_model(cfg, items, log=None)
    model, _ = build_model(seen_cfg, items, log=None)
    model.load_state_dict(plain.state_dict(), strict=False)
    plain.eval(), model.eval()
    batch = make_batch(model, tok)
    _, want = karma_losses(plain, batch, cfg.loss, NegativeSampler(np.ones(30), 4, seed=0))
    total, got = karma_losses(model, batch, seen_cfg.loss, NegativeSampler(np.ones(30), 4, seed=0))
    assert float(got["loss_action"]) == pytest.approx(float(want["loss_action"]), rel=1e-6)
    total.backward()
    assert model.seen.value.grad.item() > 0  # gradient descent lowers the offset
    with pytest.raises(ValueError, match="model.seen_offset"):
        tiny_cfg(cache_dir, "model.seen_offset=true")
