"""The recipe's model pieces: an item tower that starts spread out, dropout where the config says,
text KARMA (history titles in the prompt), and length-bucketed epochs."""

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from karma.config import ConfigError
from karma.data import collate, epoch_order
from karma.factory import build_model
from karma.metrics import mean_pairwise_cosine
from karma.model import KarmaModel, Prompts
from karma.batch import prepare_batch
from karma.text import tokenize_items


def batch_of(model, tok, histories, targets=None):
    n = len(histories)
    rows = {"user_id": list(range(n)), "history": histories, "target": targets or [0] * n,
            "query": [""] * n, "shown": [[]] * n}
    return prepare_batch(collate(rows, 20), model, tok, "cpu")


# hidden, heads: the tiny test width and SmolLM2-135M's width (576, 9 heads); unit-norm or small IDs
@pytest.mark.parametrize("hidden,heads,id_std", [(32, 2, "null"), (576, 9, "null")])
def test_item_tower_starts_spread_out(items, cache_dir, hidden, heads, id_std):
    cfg = tiny_cfg(cache_dir, f"model.tiny_hidden={hidden}", f"model.tiny_heads={heads}", "model.embed_dim=64",
                   f"model.id_init_std={id_std}")
    model, _ = build_model(cfg, items, log=None)
    want = cfg.model.id_dim ** -0.5 if id_std == "null" else id_std
    assert float(model.items.id_emb.weight.detach().std()) == pytest.approx(want, rel=0.1)
    with torch.no_grad():
        emb = model.item_embeddings()
    assert float(mean_pairwise_cosine(emb)) < 0.3
    # and the biases that collapsed it are zero
    assert float(model.item_head.bias.detach().abs().max()) == 0.0
    assert float(model.items.mlp_id[0].bias.detach().abs().max()) == 0.0


def test_dropout_acts_in_training_only(items, cache_dir):
    model, tok = build_model(tiny_cfg(cache_dir, "model.dropout=0.3"), items, log=None)
    attn = [m for m in model.backbone.modules() if hasattr(m, "attention_dropout")]
    assert attn and all(m.attention_dropout == 0.3 for m in attn)
    batch = batch_of(model, tok, [[0, 1, 2], [3, 4]])
    model.train()
    torch.manual_seed(0)
    a = model.interests(batch)["z"]
    b = model.interests(batch)["z"]
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model.interests(batch)["z"], model.interests(batch)["z"])


def test_residual_and_id_dropout_act_in_training_only(items, cache_dir):
    for knob in ("model.resid_dropout=0.3", "model.id_dropout=0.5"):
        model, tok = build_model(tiny_cfg(cache_dir, knob), items, log=None)
        batch = batch_of(model, tok, [[0, 1, 2], [3, 4]])
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model.interests(batch)["z"], model.interests(batch)["z"]), knob
        model.eval()
        assert torch.equal(model.interests(batch)["z"], model.interests(batch)["z"]), knob


def test_text_center_removes_the_shared_text_direction(items, cache_dir):
    raw, _ = build_model(tiny_cfg(cache_dir), items, log=None)
    centered, _ = build_model(tiny_cfg(cache_dir, "model.text_center=true"), items, log=None)
    assert float(raw.items.text_emb.mean(0).norm()) > 0.3  # sentence embeddings share a direction
    # mean ~0 up to the re-normalisation; every row unit length
    assert float(centered.items.text_emb.mean(0).norm()) < 0.5 * float(raw.items.text_emb.mean(0).norm())
    assert torch.allclose(centered.items.text_emb.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
    assert float(mean_pairwise_cosine(centered.items.text_emb)) < float(mean_pairwise_cosine(raw.items.text_emb))


def test_no_dropout_by_default(items, cache_dir):
    model, tok = build_model(tiny_cfg(cache_dir), items, log=None)
    model.train()
    batch = batch_of(model, tok, [[0, 1, 2], [3, 4]])
    assert torch.equal(model.interests(batch)["z"], model.interests(batch)["z"])


def test_text_karma_reads_the_last_titles(items, cache_dir):
    """Text alone: z depends on the titles of the last N history items and on nothing older."""
    cfg = tiny_cfg(cache_dir, "model.history_text_items=2", "model.history_item_tokens=false")
    model, tok = build_model(cfg, items, log=None)
    model.eval()
    z = lambda hist: model.interests(batch_of(model, tok, hist))["z"]  # noqa: E731
    base = z([[1, 2, 3], [4]])
    assert torch.allclose(base, z([[7, 2, 3], [4]]), atol=1e-6)  # older than the last 2: unseen
    assert not torch.allclose(base[0], z([[1, 2, 8], [4]])[0], atol=1e-4)  # a shown title: seen
    # padding is inert: a row alone equals the same row in a padded batch
    assert torch.allclose(z([[4]])[0], base[1], atol=1e-5)
    # the attention analyses mark the title tokens as the history's positions
    maps = model.attention_maps(batch_of(model, tok, [[1, 2, 3]]))
    n_title = int(model.item_token_len[[2, 3]].sum()) - 2  # two titles without their EOS
    assert int(maps["item_mask"].sum()) == min(n_title, 2 * cfg.model.history_text_tokens)


def test_text_beside_item_tokens(items, cache_dir):
    cfg = tiny_cfg(cache_dir, "model.history_text_items=1")
    model, tok = build_model(cfg, items, log=None)
    model.eval()
    batch = batch_of(model, tok, [[1, 2, 3]], targets=[4])
    out = model(batch, gen_rows=torch.ones(1, dtype=torch.bool))
    assert torch.allclose(out["z"], model.interests(batch)["z"], atol=1e-5)
    maps = model.attention_maps(batch)
    assert int(maps["item_mask"].sum()) == 3  # the item tokens are the history's positions
    # the title tokens are in the sequence: 1 query-free prefix = title + 3 items + INT
    assert maps["attention_mask"].shape[1] == cfg.model.history_text_tokens + 3 + cfg.model.n_interest


def test_text_karma_with_a_bpe_tokenizer(items, cache_dir):
    """SmolLM2's tokenizer (from its GGUF) through the same prompt path, on a tiny random Llama of
    its vocabulary: titles are BPE pieces, padding by length (its pad id may be EOS itself)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from karma.backbone import smollm2_tokenizer
    from karma.text import item_texts

    tok = smollm2_tokenizer()
    cfg = tiny_cfg(cache_dir, "model.history_text_items=2", "model.history_item_tokens=false").model
    backbone = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    ids, lengths = tokenize_items(item_texts(items), tok, 16)
    model = KarmaModel(cfg, backbone, len(items), torch.from_numpy(ids), torch.from_numpy(lengths), tok.pad_id,
                       Prompts.from_tokenizer(tok)).eval()
    z = lambda hist: model.interests(batch_of(model, tok, hist))["z"]  # noqa: E731
    base = z([[1, 2, 3], [4]])
    assert torch.allclose(base, z([[9, 2, 3], [4]]), atol=1e-6)
    assert not torch.allclose(base[0], z([[1, 2, 8], [4]])[0], atol=1e-4)
    assert torch.allclose(z([[4]])[0], base[1], atol=1e-5)


def test_text_karma_config_errors(cache_dir):
    with pytest.raises(ConfigError, match="model.history_text_items"):
        tiny_cfg(cache_dir, "model.history_item_tokens=false")
    with pytest.raises(ConfigError, match="model.history_text_tokens"):  # tiny.yaml's text: 16 tokens with EOS
        tiny_cfg(cache_dir, "model.history_text_items=2", "model.history_text_tokens=16")
    tiny_cfg(cache_dir, "data.text_max_tokens=4")  # titles off: their token budget is not checked
    with pytest.raises(ConfigError, match="model.text_channel: needs item text"):
        tiny_cfg(cache_dir, "model.text_channel=true", "data.text_encoder=none")
    with pytest.raises(ConfigError, match="model.text_channel: points at the history"):
        tiny_cfg(cache_dir, "model.text_channel=true", "model.history_item_tokens=false", "model.history_text_items=2")
    for knob in ("model.resid_dropout", "model.id_dropout"):
        with pytest.raises(ConfigError, match=knob):
            tiny_cfg(cache_dir, f"{knob}=1.0")
    with pytest.raises(ConfigError, match="model.dropout"):
        tiny_cfg(cache_dir, "model.dropout=1.0")
    with pytest.raises(ConfigError, match="train.bucket_batches"):
        tiny_cfg(cache_dir, "train.bucket_batches=-1")


def test_epoch_order_visits_every_row_once_and_buckets_cut_padding():
    rng_lengths = np.random.default_rng(0)
    lengths = rng_lengths.integers(1, 50, size=1000)
    plain = epoch_order(lengths, 32, np.random.default_rng(1))
    bucketed = epoch_order(lengths, 32, np.random.default_rng(1), bucket_batches=8)
    assert len(plain) == len(bucketed) == 992  # whole batches only
    assert len(set(bucketed.tolist())) == 992
    assert set(plain.tolist()) == set(bucketed.tolist())  # the same rows, cut differently

    def padded_slots(order):
        return sum(32 * lengths[b].max() for b in order.reshape(-1, 32))

    assert padded_slots(bucketed) < 0.75 * padded_slots(plain)
    # batch order stays random: not sorted by length across the epoch
    first = [lengths[b].max() for b in bucketed.reshape(-1, 32)]
    assert first != sorted(first)
    # deterministic for a seed
    assert np.array_equal(bucketed, epoch_order(lengths, 32, np.random.default_rng(1), bucket_batches=8))


def test_text_karma_export_serves_the_same_interests(items, cache_dir, tmp_path):
    from karma.export import export_model, load_export

    cfg = tiny_cfg(cache_dir, "model.history_text_items=3", "model.dropout=0.2")
    model, tok = build_model(cfg, items, log=None)
    model.eval()
    export_model(model, tok, cfg, items, tmp_path / "export")
    hist = [[0, 1, 2, 3, 4], [5]]
    want = model.interests(batch_of(model, tok, hist))["z"].detach().numpy()
    np.testing.assert_allclose(load_export(tmp_path / "export").interests(hist), want, atol=1e-6)
