"""Schema validation, Parquet round trip, splits and example batching."""

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from karma.config import DataConfig
from karma.pipeline import split_data

from karma.data import (
    DataError,
    InteractionData,
    collate,
    generate,
    item_counts,
    leave_one_out,
    load_source,
    recent_targets,
    read_parquet,
    SyntheticConfig,
    time_split,
    validate,
    validate_events,
    validate_items,
    write_parquet,
)


def make_items() -> pd.DataFrame:
    # item ids differ from rows on purpose: rows are 0..4
    return pd.DataFrame({
        "item_id": [10, 20, 30, 40, 50],
        "title": ["Beaker 250 ml", "Nitrile gloves", "Solder wire", "Caliper", "PLA filament"],
        "category": ["glassware", "gloves", "soldering", "measuring", "filament"],
        "brand": ["Acu", "Bor", "", "Acu", "Zeni"],
        "text": ["", "powder-free", "lead-free", "", "1.75mm"],
    })


def make_events() -> pd.DataFrame:
    # deliberately unsorted; user 1: 10,20,30,40 / user 2: 50,10,30 / user 3: 20,40
    return pd.DataFrame({
        "user_id": [2, 1, 1, 3, 2, 1, 1, 2, 3],
        "item_id": [50, 30, 10, 20, 10, 40, 20, 30, 40],
        "ts": [5, 3, 1, 3, 6, 4, 2, 7, 9],
        "query": [None, None, None, None, None, "gloves", None, None, None],
        "shown": [None, None, None, None, None, [50, 20], None, None, None],
    })


@pytest.fixture
def data() -> InteractionData:
    return validate(InteractionData(items=make_items(), events=make_events(), name="tiny"))


def rows(examples) -> list:
    df = examples.to_frame()
    return [(int(u), [int(x) for x in h], int(t)) for u, h, t in zip(df.user_id, df.history, df.target)]


# ---------------------------------------------------------------- validation

def test_validate_sorts_and_normalises(data):
    ev = data.events
    assert ev.user_id.tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert ev.item_id.tolist() == [10, 20, 30, 40, 50, 10, 30, 20, 40]
    assert ev.ts.dtype == np.int64 and ev.user_id.dtype == np.int64
    assert ev["query"].tolist() == [None, None, None, "gloves", None, None, None, None, None]
    assert [s.tolist() for s in ev["shown"]][3] == [50, 20]
    assert [len(s) for s in ev["shown"]] == [0, 0, 0, 2, 0, 0, 0, 0, 0]  # null -> empty
    assert data.n_items == 5 and data.n_users == 3


def test_validate_sort_is_stable_on_ties():
    ev = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [30, 10, 20], "ts": [5, 5, 5]})
    out = validate_events(ev, make_items())
    assert out.item_id.tolist() == [30, 10, 20]


def test_integral_floats_and_numeric_strings_are_cast():
    items = make_items().assign(item_id=["10", "20", "30", "40", "50"])
    assert validate_items(items).item_id.dtype == np.int64
    ev = pd.DataFrame({"user_id": [1.0, 1.0], "item_id": [10.0, 20.0], "ts": [1.0, 2.0]})
    assert validate_events(ev, make_items()).item_id.tolist() == [10, 20]


def test_missing_columns_named_with_present_ones():
    present = r"present: \['item_id', 'title', 'category', 'text'\]"
    with pytest.raises(DataError, match=r"missing column\(s\) \['brand'\].*" + present):
        validate_items(make_items().drop(columns="brand"))
    with pytest.raises(DataError, match=r"events: missing column\(s\) \['ts'\]"):
        validate_events(make_events().drop(columns="ts"), make_items())


def test_uncastable_dtype():
    items = make_items().assign(item_id=["10", "x", "30", "40", "50"])
    with pytest.raises(DataError, match="'item_id'.*cannot be cast to int64"):
        validate_items(items)
    ev = make_events().assign(ts=[1.5] * 9)
    with pytest.raises(DataError, match="'ts'.*cannot be cast to int64"):
        validate_events(ev, make_items())


def test_nulls_reported_with_count_and_first_row():
    items = make_items()
    items.loc[[1, 3], "title"] = None
    with pytest.raises(DataError, match=r"'title' has 2 null value\(s\), first at row 1"):
        validate_items(items)
    items = make_items()
    items.loc[2, "brand"] = None
    with pytest.raises(DataError, match=r"'brand' has 1 null value\(s\), first at row 2; use ''"):
        validate_items(items)
    ev = make_events()
    ev.loc[4, "user_id"] = None
    with pytest.raises(DataError, match=r"'user_id' has 1 null value\(s\), first at row 4"):
        validate_events(ev, make_items())


def test_empty_title_rejected():
    items = make_items()
    items.loc[4, "title"] = "  "
    with pytest.raises(DataError, match=r"'title' has 1 empty value\(s\), first at row 4 \(item_id 50\)"):
        validate_items(items)


def test_duplicate_item_ids_listed():
    items = make_items().assign(item_id=[10, 20, 10, 40, 20])
    with pytest.raises(DataError, match=r"2 duplicate item_id\(s\) \(e.g. 10, 20\)"):
        validate_items(items)


def test_negative_ids():
    items = make_items().assign(item_id=[10, -20, 30, 40, 50])
    with pytest.raises(DataError, match=r"'item_id' has 1 negative value\(s\) \(e.g. -20\)"):
        validate_items(items)
    ev = make_events().assign(user_id=[2, 1, 1, -3, 2, 1, 1, 2, -3])
    with pytest.raises(DataError, match=r"'user_id' has 2 negative value\(s\) \(e.g. -3\)"):
        validate_events(ev, make_items())


def test_unknown_item_ids_in_events_and_shown():
    ev = make_events().assign(item_id=[50, 30, 10, 99, 10, 40, 20, 98, 99])
    with pytest.raises(DataError, match=r"3 event\(s\) reference item ids missing from items \(e.g. 99, 98\)"):
        validate_events(ev, make_items())
    ev = make_events()
    ev.at[0, "shown"] = [10, 77]
    with pytest.raises(DataError, match=r"'shown' references 1 unknown item id\(s\) \(e.g. 77\)"):
        validate_events(ev, make_items())


def test_bad_values_are_named_by_row():
    items = make_items().assign(item_id=["10", "20", "x", "40", "50"])
    with pytest.raises(DataError, match=r"'item_id' .*cannot be cast to int64 .*, first at row 2 \(value 'x'\)"):
        validate_items(items)
    ev = make_events().assign(ts=[1, 2, 3, 4.5, 5, 6, 7, 8, 9.5])
    with pytest.raises(DataError, match=r"'ts' .*cannot be cast to int64 .*, first at row 3 \(value 4.5\)"):
        validate_events(ev, make_items())
    ev = make_events().assign(user_id=[2, 1, 1, 3, 2, -1, 1, 2, 3])
    with pytest.raises(DataError, match=r"'user_id' has 1 negative value\(s\) \(e.g. -1\), first at row 5"):
        validate_events(ev, make_items())
    ev = make_events().assign(item_id=[50, 30, 10, 20, 10, 40, 20, 30, 41])
    with pytest.raises(DataError, match=r"1 event\(s\) reference item ids missing from items \(e.g. 41\), "
                                        r"first at row 8"):
        validate_events(ev, make_items())
    ev = make_events()
    ev.at[7, "shown"] = [10, 77]
    with pytest.raises(DataError, match=r"'shown' references 1 unknown item id\(s\) \(e.g. 77\), first at row 7"):
        validate_events(ev, make_items())
    ev.at[7, "shown"] = ["ten"]
    with pytest.raises(DataError, match=r"'shown' must hold lists of integer item ids"):
        validate_events(ev, make_items())


def test_query_and_shown_are_normalised_column_wise():
    ev = make_events().assign(query=[None, np.nan, 5, "a", None, "gloves", None, None, None],
                              shown=[None, np.nan, np.array([10, 20]), [30], [], [50, 20], None, (40,), None])
    out = validate_events(ev, make_items())  # sorted by (user, ts): rows 2,6,1,5 | 0,4,7 | 3,8 of the input
    order = [2, 6, 1, 5, 0, 4, 7, 3, 8]
    assert out["query"].tolist() == [[None, None, "5", "a", None, "gloves", None, None, None][i] for i in order]
    shown = [[], [], [10, 20], [30], [], [50, 20], [], [40], []]
    assert [s.tolist() for s in out["shown"]] == [shown[i] for i in order]
    assert all(s.dtype == np.int64 for s in out["shown"])


def test_users_with_empty_histories():
    ev = pd.concat([make_events(), pd.DataFrame({"user_id": [7, 8], "item_id": [10, 20], "ts": [1, 1]})])
    with pytest.raises(DataError, match=r"2 user\(s\) have empty histories.*user_id 7, 8.*at least 2 events"):
        validate_events(ev, make_items())


def test_image_vectors():
    items = make_items().assign(image=[[1.0, 2.0]] * 4 + [[1.0, 2.0, 3.0]])
    with pytest.raises(DataError, match=r"'image' has vectors of unequal length \(\[2, 3\]\).*row 4 has 3"):
        validate_items(items)
    ok = validate_items(make_items().assign(image=[np.arange(3.0)] * 5))
    assert ok["image"][1].dtype == np.float32 and ok["image"][1].tolist() == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------- Parquet

def test_parquet_round_trip(tmp_path, data):
    items = data.items.assign(image=[np.full(4, i, np.float32) for i in range(5)])
    users = pd.DataFrame({"user_id": [1, 2, 3], "age": [31, 45, 27]})
    src = InteractionData(items=items, events=data.events, users=users, name="tiny")
    write_parquet(src, tmp_path / "tiny")
    back = read_parquet(tmp_path / "tiny")
    assert back.name == "tiny"
    pd.testing.assert_frame_equal(back.items.drop(columns="image"), data.items)
    assert [v.tolist() for v in back.items["image"]] == [[float(i)] * 4 for i in range(5)]
    assert back.events[["user_id", "item_id", "ts"]].equals(data.events[["user_id", "item_id", "ts"]])
    assert back.events["query"].tolist() == data.events["query"].tolist()
    assert [s.tolist() for s in back.events["shown"]] == [s.tolist() for s in data.events["shown"]]
    assert back.users.age.tolist() == [31, 45, 27]
    schema = pq.read_schema(tmp_path / "tiny" / "events.parquet")
    assert schema.field("shown").type == pa.list_(pa.int64())
    assert pq.read_schema(tmp_path / "tiny" / "items.parquet").field("image").type == pa.list_(pa.float32())


def test_read_parquet_validates(tmp_path):
    bad = InteractionData(items=make_items(), events=make_events().assign(item_id=[50, 30, 10, 20, 10, 40, 20, 30, 66]))
    write_parquet(bad, tmp_path)
    with pytest.raises(DataError, match=r"events.parquet: 1 event\(s\) reference item ids missing.*66"):
        read_parquet(tmp_path)
    with pytest.raises(DataError, match=r"items.parquet: file not found"):
        read_parquet(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["items.parquet", "events.parquet", "users.parquet"])
@pytest.mark.parametrize("damage", ["not parquet", "truncated", "empty"])
def test_unreadable_parquet_file_is_a_data_error_naming_it(tmp_path, data, name, damage):
    write_parquet(InteractionData(data.items, data.events, pd.DataFrame({"user_id": [1, 2, 3]})), tmp_path)
    f = tmp_path / name
    whole = f.read_bytes()
    f.write_bytes({"not parquet": b"user_id,item_id,ts\n1,10,1\n", "truncated": whole[: len(whole) // 2],
                   "empty": b""}[damage])
    with pytest.raises(DataError) as err:
        read_parquet(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{f}: not a readable Parquet file (ArrowInvalid: ") and "write it again" in msg


def test_load_source_dispatch(tmp_path, data):
    valid = r"valid sources: \['synthetic', 'recbole', 'movielens', 'parquet'\]"
    with pytest.raises(DataError, match=r"unknown data source 'csv'; " + valid):
        load_source("csv", "x")
    with pytest.raises(DataError, match="needs a path"):
        load_source("parquet", None)
    with pytest.raises(DataError, match=r"unknown option\(s\) \['n_user'\]"):
        load_source("synthetic", None, n_user=5)
    with pytest.raises(DataError, match="bad option"):
        load_source("parquet", str(tmp_path), colour="red")
    write_parquet(data, tmp_path / "d")
    assert load_source("parquet", str(tmp_path / "d")).events.item_id.tolist() == data.events.item_id.tolist()
    syn = load_source("synthetic", "ignored", n_users=30, n_items=60, n_categories=4, n_brands=6)
    assert syn.n_users == 30 and syn.n_items == 60


# ---------------------------------------------------------------- splits

def test_leave_one_out_hand_computed(data):
    sp = leave_one_out(data)
    # rows: 10->0, 20->1, 30->2, 40->3, 50->4
    assert rows(sp.train) == [(1, [0], 1)]
    assert rows(sp.valid) == [(1, [0, 1], 2), (2, [4], 0)]
    assert rows(sp.test) == [(1, [0, 1, 2], 3), (2, [4, 0], 2), (3, [1], 3)]
    test = sp.test.to_frame()
    assert test["query"].tolist() == ["gloves", "", ""]
    assert [s.tolist() for s in test["shown"]] == [[4, 1], [], []]
    assert rows(leave_one_out(data, max_history=2).test)[0] == (1, [1, 2], 3)
    assert test.user_id.dtype == np.int64 and test.target.dtype == np.int64


def test_recent_targets_keeps_each_users_last_training_targets_with_full_histories():
    items = pd.DataFrame({"item_id": range(8), "title": [f"item {i}" for i in range(8)],
                          "category": "c", "brand": "b", "text": ""})
    # user 1: items 0..7 in order (train targets at positions 1..5), user 2: 3 events (no train target),
    # user 3: 4 events (one train target)
    events = pd.DataFrame({"user_id": [1] * 8 + [2] * 3 + [3] * 4,
                           "item_id": list(range(8)) + [5, 6, 7] + [7, 6, 5, 4],
                           "ts": list(range(8)) + [0, 1, 2] + [0, 1, 2, 3]})
    data = validate(InteractionData(items, events))
    full = leave_one_out(data, max_history=3)
    assert [t for u, _, t in rows(full.train) if u == 1] == [1, 2, 3, 4, 5]
    recent = recent_targets(full.train, 2)
    assert rows(recent) == [(1, [1, 2, 3], 4), (1, [2, 3, 4], 5), (3, [7], 6)]
    assert recent_targets(full.train, 0) is full.train
    assert len(recent_targets(full.train, 100)) == len(full.train)
    # through the config: only the training split shrinks
    cut = split_data(data, DataConfig(source="parquet", max_history=3, train_recent=2))
    assert rows(cut.train) == rows(recent)
    assert rows(cut.valid) == rows(full.valid) and rows(cut.test) == rows(full.test)


def test_time_split_hand_computed(data):
    sp = time_split(data, valid_start=4, test_start=7)
    assert rows(sp.train) == [(1, [0], 1), (1, [0, 1], 2)]
    assert rows(sp.valid) == [(1, [0, 1, 2], 3), (2, [4], 0)]
    assert rows(sp.test) == [(2, [4, 0], 2), (3, [1], 3)]
    with pytest.raises(DataError, match=r"valid_start \(8\) must be <= test_start \(7\)"):
        time_split(data, valid_start=8, test_start=7)


@pytest.mark.parametrize("valid_start, test_start, needle", [
    # targets' ts: 2 3 4 | 6 7 | 9 (each user's first event is no target)
    (7, 7, "the valid split is empty: no target has valid_start (7) <= ts < test_start (7)"),
    (2, 4, "the train split is empty: no target has ts < valid_start (2)"),
    (3, 10, "the test split is empty: no target has ts >= test_start (10)"),
])
def test_time_split_refuses_an_empty_split(data, valid_start, test_start, needle):
    # Training scores the validation split every epoch: an empty one would crash after epoch 1.
    with pytest.raises(DataError) as err:
        time_split(data, valid_start=valid_start, test_start=test_start)
    assert needle in str(err.value)
    assert "targets' ts run from 2 to 9. Set data.valid_start and data.test_start" in str(err.value)


def test_time_split_suggests_bounds_that_work():
    d = generate(SyntheticConfig(n_users=60, n_items=50, n_categories=3, n_brands=4, seed=1))
    late = int(d.events.ts.max()) + 1
    with pytest.raises(DataError) as err:
        time_split(d, late, late)
    v, t = (int(x) for x in re.search(r"e.g. data.valid_start=(\d+) data.test_start=(\d+)", str(err.value)).groups())
    sp = time_split(d, v, t)  # the suggestion gives every split targets
    assert min(len(sp.train), len(sp.valid), len(sp.test)) > 0


def test_leave_one_out_refuses_an_empty_split():
    items = make_items()
    two = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [10, 20, 30, 40], "ts": [1, 2, 1, 2]})
    with pytest.raises(DataError, match=r"the train split is empty: it needs users with at least 4 events and "
                                        r"the longest sequence has 2"):
        leave_one_out(validate(InteractionData(items, two)))


def test_time_split_has_no_leakage():
    d = generate(SyntheticConfig(n_users=200, n_items=120, n_categories=4, n_brands=8, seed=3))
    ts_all = np.sort(d.events.ts.to_numpy())
    vs, tst = int(ts_all[len(ts_all) // 2]), int(ts_all[3 * len(ts_all) // 4])
    sp = time_split(d, vs, tst, max_history=10_000)  # no truncation: len(history) = position
    seqs = {u: g for u, g in d.events.groupby("user_id")}
    row_of = pd.Index(d.items.item_id)
    for examples, lo, hi in ((sp.train, -np.inf, vs), (sp.valid, vs, tst), (sp.test, tst, np.inf)):
        assert len(examples) > 0
        part = examples.to_frame()
        for u, h, t in zip(part.user_id, part.history, part.target):
            g = seqs[u]
            t_ts = g.ts.iloc[len(h)]
            assert lo <= t_ts < hi  # the target lies in its split's time range
            assert row_of.get_indexer(g.item_id.iloc[: len(h)]).tolist() == h.tolist()
            assert (g.ts.iloc[: len(h)] < t_ts).all()  # history strictly earlier
            assert row_of.get_loc(g.item_id.iloc[len(h)]) == t
    n_targets = sum((g.ts.iloc[1:]).size for g in seqs.values())
    assert len(sp.train) + len(sp.valid) + len(sp.test) == n_targets  # nothing lost


# ---------------------------------------------------------------- examples

def test_compact_arrays_store_each_event_once(data):
    sp = leave_one_out(data)
    seqs = sp.test.sequences
    assert sp.train.sequences is seqs and sp.valid.sequences is seqs  # one copy for all splits
    assert seqs.offsets.dtype == np.int64 and seqs.offsets.tolist() == [0, 4, 7, 9]
    assert seqs.items.dtype == np.int32 and seqs.items.tolist() == [0, 1, 2, 3, 4, 0, 2, 1, 3]
    assert seqs.user_ids.tolist() == [1, 2, 3]
    assert seqs.query.to_pylist() == ["", "", "", "gloves", "", "", "", "", ""]
    assert seqs.shown_offsets.tolist() == [0, 0, 0, 0, 2, 2, 2, 2, 2, 2] and seqs.shown_items.tolist() == [4, 1]
    assert sp.test.seq.dtype == np.int32 and sp.test.pos.dtype == np.int32
    assert (sp.test.seq.tolist(), sp.test.pos.tolist()) == ([0, 1, 2], [3, 2, 1])
    assert sp.test.targets.tolist() == [3, 2, 3] and sp.test.user_ids.tolist() == [1, 2, 3]


def test_item_counts_counts_targets_only(data):
    sp = time_split(data, valid_start=4, test_start=7)
    # train targets: rows 1 and 2 once each; histories (row 0) are not counted
    assert item_counts(sp.train, 5).tolist() == [0, 1, 1, 0, 0]
    assert item_counts(sp.train, 5).dtype == np.int64
    with pytest.raises(DataError, match=r"target rows must lie in \[0, 2\)"):
        item_counts(sp.train, 2)


def check_batch(b):
    # max_history=3 keeps the three most recent items; L = longest kept history = 3
    assert b["history"].dtype == torch.long
    assert b["history"].tolist() == [[6, 7, 8], [0, 0, 5], [0, 0, 0]]
    assert b["history_mask"].tolist() == [[True, True, True], [False, False, True], [False, False, False]]
    assert b["target"].tolist() == [9, 6, 4] and b["target"].dtype == torch.long
    assert b["user_id"].tolist() == [100, 101, 102]
    assert b["query"] == ["drill bits", "", ""]
    assert b["shown"].tolist() == [[3, -1], [-1, -1], [1, 2]] and b["shown"].dtype == torch.long


def test_collate_list_of_dicts():
    rows_ = [
        {"user_id": 100, "history": [5, 6, 7, 8], "target": 9, "query": "drill bits", "shown": [3]},
        {"user_id": 101, "history": [5], "target": 6, "query": "", "shown": []},
        {"user_id": 102, "history": [], "target": 4, "query": None, "shown": [1, 2]},
    ]
    check_batch(collate(rows_, max_history=3))
    b = collate(rows_, max_history=2)
    assert b["history"].tolist() == [[7, 8], [0, 5], [0, 0]]
    assert b["history_mask"].tolist() == [[True, True], [False, True], [False, False]]
    b = collate(rows_[1:], max_history=3)  # L follows the batch's longest history
    assert b["history"].tolist() == [[5], [0]] and b["history_mask"].tolist() == [[True], [False]]


def test_collate_dict_of_numpy_columns():
    # the shape Ray Data's iter_batches(batch_format="numpy") yields for list columns
    obj = lambda *arrs: np.array([np.array(a, np.int32) for a in arrs] + [None], dtype=object)[:-1]
    batch = {
        "user_id": np.array([100, 101, 102]),
        "history": obj([1, 2, 6, 7, 8], [5], []),
        "target": np.array([9, 6, 4], np.int32),
        "query": np.array(["drill bits", "", ""], dtype=object),
        "shown": obj([3], [], [1, 2]),
    }
    check_batch(collate(batch, max_history=3))
    # no query/shown columns at all: empty queries and a single -1 column
    b = collate({k: batch[k] for k in ("user_id", "history", "target")}, max_history=3)
    assert b["query"] == ["", "", ""] and b["shown"].tolist() == [[-1], [-1], [-1]]


def test_compact_collate_cuts_windows_like_collate(data):
    test = leave_one_out(data).test
    b = test.collate(max_history=50)
    assert b["history"].tolist() == [[0, 1, 2], [0, 4, 0], [0, 0, 1]]
    assert b["history_mask"].sum(1).tolist() == [3, 2, 1]
    assert b["shown"].tolist() == [[4, 1], [-1, -1], [-1, -1]]
    assert b["query"] == ["gloves", "", ""] and b["target"].tolist() == [3, 2, 3]
    frame = test.to_frame()
    for cap in (1, 2, 50):
        want = collate({c: frame[c].tolist() for c in frame.columns}, max_history=cap)
        got = test.collate(max_history=cap)
        assert got["query"] == want.pop("query")
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor) and got[key].dtype == tensor.dtype, (cap, key)
