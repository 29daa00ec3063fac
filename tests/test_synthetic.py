"""The synthetic default data set: determinism, validity, long tail, cold items and
learnable structure."""

import time

import numpy as np
import pandas as pd
import pytest

from karma.data import DataError, SyntheticConfig, generate, item_counts, leave_one_out, synthetic, validate


@pytest.fixture(scope="module")
def default():
    t = time.perf_counter()
    d = generate()
    return d, time.perf_counter() - t


def test_default_size_and_speed(default):
    d, seconds = default
    assert seconds < 5.0
    assert d.n_items == 800 and d.n_users == 2000
    lens = d.events.groupby("user_id").size()
    assert lens.min() >= 6 and lens.max() <= 30
    assert d.items.category.nunique() == 12 and d.items.brand.nunique() <= 40


def test_deterministic_given_seed():
    cfg = SyntheticConfig(n_users=150, n_items=100, n_categories=5, n_brands=10, query_prob=0.5, seed=7)
    a, b = generate(cfg), generate(cfg)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.events.drop(columns="shown"), b.events.drop(columns="shown"))
    assert [s.tolist() for s in a.events.shown] == [s.tolist() for s in b.events.shown]
    c = generate(SyntheticConfig(n_users=150, n_items=100, n_categories=5, n_brands=10, query_prob=0.5, seed=8))
    assert c.events.item_id.tolist() != a.events.item_id.tolist()


def test_schema_valid_and_text_carries_category_and_brand(default):
    d, _ = default
    again = validate(d)  # already normalised: validating again changes nothing
    pd.testing.assert_frame_equal(again.events, d.events)
    assert d.items.item_id.is_unique and (d.items.title.str.len() > 0).all()
    assert d.events.item_id.isin(d.items.item_id).all()
    assert all(t.startswith(b + " ") for t, b in zip(d.items.title, d.items.brand))
    # brands sell in 1-3 categories
    per_brand = d.items.groupby("brand").category.nunique()
    assert per_brand.min() >= 1 and per_brand.max() <= 3
    assert (d.events.groupby("user_id").ts.diff().dropna() > 0).all()  # strictly increasing times


def test_long_tail(default):
    d, _ = default
    counts = np.sort(d.events.item_id.value_counts().reindex(d.items.item_id, fill_value=0).to_numpy())[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.5  # the top 10% of items hold the majority of interactions
    assert counts[len(counts) // 2:].sum() / counts.sum() < 0.15  # and the bottom half little


def test_cold_items_only_as_last_event(default):
    d, _ = default
    cold_ids = set(d.items.item_id[d.items.cold])
    assert len(cold_ids) == 40  # 5% of 800
    ev = d.events
    last = ev.groupby("user_id").cumcount(ascending=False) == 0
    assert not ev.item_id[~last].isin(cold_ids).any()
    assert ev.item_id[last].isin(cold_ids).sum() >= 40  # and they do occur as test targets


def test_category_heuristic_beats_popularity(default):
    d, _ = default
    sp = leave_one_out(d)
    counts = item_counts(sp.train, d.n_items)
    by_pop = np.argsort(-counts, kind="stable")
    cat = pd.factorize(d.items.category)[0]
    hits_pop = hits_cat = 0
    test = sp.test.to_frame()
    for h, t in zip(test.history, test.target):
        hits_pop += t in by_pop[:10]
        same = cat[by_pop] == cat[h[-1]]  # same category as the last item, then popularity
        hits_cat += t in np.concatenate([by_pop[same], by_pop[~same]])[:10]
    hr_pop, hr_cat = hits_pop / len(test), hits_cat / len(test)
    assert hr_cat > 1.5 * hr_pop and hr_cat - hr_pop > 0.1


def test_brand_taste_is_predictive(default):
    # within the last item's category, tilting popularity toward the brands the user
    # bought in that category beats plain popularity: brand words in titles carry signal
    d, _ = default
    sp = leave_one_out(d)
    counts = item_counts(sp.train, d.n_items) + 0.1
    cat = pd.factorize(d.items.category)[0]
    brand = pd.factorize(d.items.brand)[0]
    hits = np.zeros(2)
    test = sp.test.to_frame()
    for h, t in zip(test.history, test.target):
        c = cat[h[-1]]
        same = h[cat[h] == c]
        share = np.bincount(brand[same], minlength=brand.max() + 1)[brand] / len(same)
        for i, score in enumerate((counts, counts * (1 + 5 * share))):
            s = np.where(cat == c, score, 0.0)
            s[h] = -1.0  # nobody buys the same item twice here
            hits[i] += t in np.argsort(-s, kind="stable")[:10]
    hr_cat, hr_brand = hits / len(sp.test)
    assert hr_brand > hr_cat + 0.03


def test_queries_and_impressions():
    d = generate(SyntheticConfig(n_users=300, n_items=200, n_categories=6, n_brands=12, query_prob=0.4, seed=1))
    ev, items = d.events, d.items.set_index("item_id")
    has_q = ev["query"].notna().to_numpy()
    assert 0.3 < has_q.mean() < 0.5
    for item, q, shown in zip(ev.item_id[has_q], ev["query"][has_q], ev.shown[has_q]):
        row = items.loc[item]
        words = set((row.title + " " + row.category).lower().split())
        assert set(q.split()) <= words  # the query comes from the clicked item's words
        assert 2 <= len(shown) <= 4 and item not in shown.tolist()
        assert (items.loc[shown, "category"] == row.category).all()
        assert not items.loc[shown, "cold"].any()
    assert all(len(s) == 0 for s in ev.shown[~has_q])
    assert "query" not in generate(SyntheticConfig(n_users=20, n_items=40, n_categories=4, n_brands=6)).events


def test_config_errors():
    with pytest.raises(DataError, match=r"n_categories must be in \[1, 16\]"):
        generate(SyntheticConfig(n_categories=17))
    with pytest.raises(DataError, match="need 2 <= min_len <= max_len"):
        generate(SyntheticConfig(min_len=5, max_len=4))


def test_no_item_repeats_within_a_user(default):
    d, _ = default
    assert not d.events.duplicated(["user_id", "item_id"]).any()
    # users mostly stay within their 1-3 interests (others only once an interest runs out)
    spans = d.events.merge(d.items[["item_id", "category"]]).groupby("user_id").category.nunique()
    assert (spans <= 3).mean() > 0.98


def test_an_exhausted_interest_is_used_up_before_others():
    # one interest per user and ~10 items per category: long sequences run out of their category,
    # and only then (with every warm item of it bought) move to other categories
    cfg = SyntheticConfig(n_users=300, n_items=40, n_categories=4, n_brands=6, interests_per_user=(1, 1),
                          min_len=8, max_len=20, seed=5)
    d = generate(cfg)
    items = d.items.set_index("item_id")
    warm_of = {c: set(g.index[~g.cold]) for c, g in items.groupby("category")}
    left = 0
    for _, seq in d.events.groupby("user_id").item_id:
        seq = seq.tolist()
        home = items.category[seq[0]]
        for t, item in enumerate(seq):
            if items.category[item] != home:
                assert warm_of[home] <= set(seq[:t])
                left += 1
    assert left > 50  # the case happens often enough to be tested
    assert not d.events.duplicated(["user_id", "item_id"]).any()


def test_more_events_than_warm_items_repeat_only_then():
    d = generate(SyntheticConfig(n_users=50, n_items=24, n_categories=12, n_brands=12, min_len=20, max_len=30, seed=2))
    warm = set(d.items.item_id[~d.items.cold])
    for _, seq in d.events.groupby("user_id").item_id:
        seq = seq.tolist()
        warm_events = len(seq) - (seq[-1] not in warm)  # a last event may be the cold item
        assert len(set(seq) & warm) == min(warm_events, len(warm))
        first_repeat = next((t for t in range(len(seq)) if seq[t] in seq[:t]), None)
        if first_repeat is not None:
            assert warm <= set(seq[:first_repeat])


def test_blocks_of_users_join_seamlessly(monkeypatch):
    monkeypatch.setattr(synthetic, "_BLOCK_USERS", 64)  # 300 users in 5 blocks
    cfg = SyntheticConfig(n_users=300, n_items=120, seed=4)
    a, b = generate(cfg), generate(cfg)
    pd.testing.assert_frame_equal(a.events, b.events)
    assert a.events.user_id.unique().tolist() == list(range(1, 301))
    lens = a.events.groupby("user_id").size()
    assert lens.min() >= 6 and lens.max() <= 30
    assert not a.events.duplicated(["user_id", "item_id"]).any()
    block = (a.events.user_id - 1) // 64  # every block draws its own users: sequences differ between blocks
    assert a.events.groupby(block).item_id.apply(tuple).nunique() == 5
