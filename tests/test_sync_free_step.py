"""The training step without host syncs: chunked vocabulary cross-entropy, static decoding
slices, prompt buffers, and negatives drawn where the model lives (CPU stream unchanged)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from karma.data import collate
from karma.factory import build_model
from karma.losses import chunked_ce_sum, inverse_cdf_sample, popularity_log_prob, token_ce
from karma.batch import prepare_batch
from karma.step import NegativeSampler, karma_losses


@pytest.fixture(scope="module")
def built(items, cache_dir):
    model, tok = build_model(tiny_cfg(cache_dir, "model.n_interest=2"), items, log=None)
    return model, tok


def make_batch(model, tok):
    rows = {"user_id": [0, 1, 2, 3, 4], "history": [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [10, 11]],
            "target": [3, 5, 9, 12, 29], "query": [""] * 5, "shown": [[]] * 5}
    return prepare_batch(collate(rows, 10), model, tok, "cpu")


# ---- chunked cross-entropy -----------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_ce_matches_cross_entropy_value_and_grad(chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 11, generator=g) * 3).requires_grad_(True)
    labels = torch.tensor([0, 10, -100, 3, 3, -100, 5])
    ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.7, logits)
    got = chunked_ce_sum(logits, labels, chunk)
    (grad,) = torch.autograd.grad(got * 0.7, logits)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_chunked_ce_bf16_logits_upcasts_and_returns_bf16_grad():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g).bfloat16().requires_grad_(True)
    labels = torch.tensor([1, 2, 3, -100, 49, 0])
    ref = F.cross_entropy(logits.float(), labels, reduction="sum")  # the unchunked path: one fp32 pass
    got = chunked_ce_sum(logits, labels, 4)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    got.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_token_ce_chunked_equals_unchunked_and_all_ignored_keeps_graph():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 0, -100]])
    assert token_ce(logits, labels, chunk=2).item() == pytest.approx(0.4904146, abs=1e-6)
    x = torch.randn(2, 3, 4, requires_grad=True)
    loss = token_ce(x, torch.full((2, 3), -100), chunk=2)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)
    with pytest.raises(ValueError, match="chunk"):
        token_ce(x, torch.zeros(2, 3, dtype=torch.long), chunk=-1)


# ---- the model's decoding branches ----------------------------------------------------------------

def old_branch_loss(model, hidden_of, target, prompt_ids, prefix_len) -> torch.Tensor:
    """The earlier formulation: labels aligned to the whole text part, then boolean indexing
    of the labelled positions (`hidden[labels != -100]`) before the LM head."""
    tokens = model.item_tokens[target]
    b, t = tokens.shape
    real = torch.arange(t) < model.item_token_len[target].unsqueeze(1)
    ignore = torch.full((b, len(prompt_ids) - 1), -100, dtype=torch.long)
    labels = torch.cat([ignore, tokens.masked_fill(~real, -100)], dim=1)
    hidden = hidden_of[:, prefix_len:]
    keep = labels != -100
    logits = model.backbone.get_output_embeddings()(hidden[keep]).float()
    return F.cross_entropy(logits, labels[keep])


def test_static_branches_equal_the_boolean_indexing_path(built):
    model, tok = built
    model.eval()
    batch = make_batch(model, tok)
    target = batch["target"]
    # reference hidden states of the generation forward, through the same backbone call
    embeds, mask, _ = model._prefix(batch)
    t_emb, t_mask, _ = model._text_part(target)
    hidden = model._run(torch.cat([embeds, t_emb], 1), torch.cat([mask, t_mask], 1)).last_hidden_state
    gen_ref = old_branch_loss(model, hidden, target, model.prompts.gen, embeds.shape[1])

    out = model(batch, gen_rows=5, rec_rows=5)
    for chunk in (0, 4, 1024):
        got = token_ce(out["gen_logits"].unsqueeze(0), out["gen_labels"].unsqueeze(0), chunk=chunk)
        torch.testing.assert_close(got, gen_ref, rtol=1e-5, atol=1e-6)

    r_emb, r_mask = model._rec_prefix(out["z"])
    r_hidden = model._run(torch.cat([r_emb, t_emb], 1), torch.cat([r_mask, t_mask], 1)).last_hidden_state
    rec_ref = old_branch_loss(model, r_hidden, target, model.prompts.gen, r_emb.shape[1])
    got = token_ce(out["rec_logits"].unsqueeze(0), out["rec_labels"].unsqueeze(0), chunk=4)
    torch.testing.assert_close(got, rec_ref, rtol=1e-5, atol=1e-6)


def test_prefix_rows_equal_a_row_mask(built):
    model, tok = built
    model.eval()
    batch = make_batch(model, tok)
    by_int = model(batch, gen_rows=3)
    by_mask = model(batch, gen_rows=torch.tensor([True, True, True, False, False]))
    assert by_int["gen_logits"].shape[0] == 3 * model.item_tokens.shape[1]
    a = token_ce(by_int["gen_logits"].unsqueeze(0), by_int["gen_labels"].unsqueeze(0))
    b = token_ce(by_mask["gen_logits"].unsqueeze(0), by_mask["gen_labels"].unsqueeze(0))
    torch.testing.assert_close(a, b)


def test_karma_losses_chunk_switch_same_loss_and_grads(built, cache_dir):
    model, tok = built
    model.train()
    batch = make_batch(model, tok)
    results = []
    for chunk in (0, 3):
        cfg = tiny_cfg(cache_dir, f"loss.lm_ce_chunk={chunk}", "loss.decode_fraction=0.6")
        sampler = NegativeSampler(np.arange(30) + 1, 8, seed=3)
        model.zero_grad()
        loss, parts = karma_losses(model, batch, cfg.loss, sampler)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()


def test_training_forward_traces_as_one_graph(built):
    """fullgraph=True fails on any graph break: boolean-mask indexing, .item(), a shape read
    from data. The whole training forward (both branches, item tower) has none."""
    model, tok = built
    model.eval()
    batch = make_batch(model, tok)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(batch, gen_rows=3, rec_rows=3, cand_ids=torch.arange(12))
        want = model(batch, gen_rows=3, rec_rows=3, cand_ids=torch.arange(12))
    for key in ("z", "gen_logits", "rec_logits", "cand", "tau"):
        torch.testing.assert_close(got[key], want[key])


@pytest.mark.parametrize("how", ["decoder", "layers", "model"])
def test_compile_parts_keep_the_loss(items, cache_dir, how):
    cfg = tiny_cfg(cache_dir)
    model, tok = build_model(cfg, items, log=None)
    model.eval()
    batch = make_batch(model, tok)

    def loss():
        with torch.no_grad():
            return karma_losses(model, batch, cfg.loss, NegativeSampler(np.ones(30), 8, seed=0))[0]

    before = loss()
    model.compile_parts(how, dynamic=False, backend="eager")  # tracing only: fast on CPU
    torch.testing.assert_close(loss(), before)
    with pytest.raises(ValueError, match="compile"):
        model.compile_parts("everything")


def test_prompt_buffers_are_not_weights(built):
    model, _ = built
    keys = model.state_dict().keys()
    assert "gen_prompt_ids" not in keys and "rec_prompt_ids" not in keys
    assert model.gen_prompt_ids.tolist() == model.prompts.gen
    assert model.rec_prompt_ids.tolist() == model.prompts.rec


# ---- negatives --------------------------------------------------------------------------------------

def test_cpu_sampler_stream_is_the_historic_one():
    """Resume-exactness depends on it: the same ids as torch.multinomial over exp(log_p) with a
    CPU generator, call after call, and a saved state replays the same continuation."""
    counts = np.array([5, 0, 3, 100, 7, 7, 1])
    sampler = NegativeSampler(counts, 9, seed=11)
    gen = torch.Generator().manual_seed(11)
    w = popularity_log_prob(torch.as_tensor(counts, dtype=torch.float64)).float().exp()
    for _ in range(3):
        assert torch.equal(sampler.sample(), torch.multinomial(w, 9, replacement=True, generator=gen))
    state = sampler.state_dict()
    assert state["device"] == "cpu"
    nxt = sampler.sample()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample(), nxt)
    sampler.load_state_dict({"gen": state["gen"]})  # a state saved before the device field existed
    assert torch.equal(sampler.sample(), nxt)
    assert sampler.log_p.device.type == "cpu" and NegativeSampler(counts, 0).sample().numel() == 0


def test_inverse_cdf_sampling_distribution_and_determinism():
    counts = torch.tensor([0, 1, 15])
    cdf = torch.cumsum(popularity_log_prob(counts).double().exp(), 0)
    ids = inverse_cdf_sample(cdf, 100_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).double() / 100_000
    assert freq.tolist() == pytest.approx([0.0936172, 0.1574448, 0.7489379], abs=0.006)
    again = inverse_cdf_sample(cdf, 100_000, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again) and ids.dtype == torch.int64


def test_foreign_generator_state_reseeds_deterministically():
    """A state from another device kind cannot be set; both resumes continue identically."""
    foreign = {"gen": torch.arange(16, dtype=torch.uint8), "device": "cuda"}
    a, b = NegativeSampler(np.ones(50), 20, seed=0), NegativeSampler(np.ones(50), 20, seed=1)
    with pytest.warns(UserWarning, match="derived"):
        a.load_state_dict(foreign)
    with pytest.warns(UserWarning, match="derived"):
        b.load_state_dict(foreign)
    assert torch.equal(a.sample(), b.sample())
