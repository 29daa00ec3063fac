"""The compact examples (karma.data.compact): each sequence stored once, each split an index, the
history windows cut at collation. They must give exactly the batches the example frames gave
(a copy of that frame-building code is the reference here), survive a memory-mapped round trip,
and the evaluation from gathered target ranks must report what evaluate_retrieval reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from conftest import tiny_cfg
from karma.data import (Examples, InteractionData, SyntheticConfig, collate, generate, item_rows, leave_one_out,
                        read_examples, sequence_positions, time_split, validation_subset, write_examples)
from karma.evaluate import retrieval_report

MAX_HISTORY = 4  # shorter than most synthetic sequences (6 to 30 events)


def reference_frame(data: InteractionData, select, max_history: int) -> pd.DataFrame:
    """The example frame as it was built before the compact format: per selected event with an
    earlier event, that user's previous events (the last max_history), its query and shown list."""
    ev = data.events.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    g = ev.groupby("user_id", sort=False)
    pos, n = g.cumcount().to_numpy(np.int64), g["user_id"].transform("size").to_numpy(np.int64)
    rows = item_rows(data.items, ev["item_id"].to_numpy())
    idx = np.flatnonzero(select(ev, pos, n) & (pos >= 1))
    starts = idx - np.minimum(pos[idx], max_history)
    query = ["" if q is None or pd.isna(q) else str(q) for q in ev["query"].to_numpy()[idx]]
    shown = [item_rows(data.items, np.zeros(0, np.int64) if v is None else np.asarray(v, np.int64), "shown")
             for v in ev["shown"].to_numpy()[idx]]
    return pd.DataFrame({"user_id": ev["user_id"].to_numpy(np.int64)[idx],
                         "history": pd.Series([rows[s:e] for s, e in zip(starts, idx)], dtype=object),
                         "target": rows[idx], "query": pd.Series(query, dtype=object),
                         "shown": pd.Series(shown, dtype=object)})


@pytest.fixture(scope="module")
def data() -> InteractionData:
    """Synthetic events with queries and shown lists, shuffled and with ties in ts (coarse
    timestamps), so the sort and its stability are exercised: not validated, which would sort."""
    d = generate(SyntheticConfig(n_users=120, n_items=90, n_categories=4, n_brands=6, query_prob=0.4, seed=5))
    ev = d.events.sample(frac=1.0, random_state=1).reset_index(drop=True)
    ev["ts"] = ev["ts"] // 400_000  # about a third of a user's consecutive events share a ts
    return InteractionData(items=d.items, events=ev, name="shuffled")


def time_bounds(data: InteractionData) -> tuple[int, int]:
    ts = np.sort(data.events["ts"].to_numpy())
    return int(ts[len(ts) // 2]), int(ts[3 * len(ts) // 4])


def splits(data: InteractionData):
    """(name, compact split, reference selection per part) for both split rules."""
    vs, te = time_bounds(data)
    yield "loo", leave_one_out(data, MAX_HISTORY), {
        "train": lambda ev, pos, n: pos <= n - 3, "valid": lambda ev, pos, n: pos == n - 2,
        "test": lambda ev, pos, n: pos == n - 1}
    yield "time", time_split(data, vs, te, MAX_HISTORY), {
        "train": lambda ev, pos, n: ev["ts"].to_numpy() < vs,
        "valid": lambda ev, pos, n: (ev["ts"].to_numpy() >= vs) & (ev["ts"].to_numpy() < te),
        "test": lambda ev, pos, n: ev["ts"].to_numpy() >= te}


def assert_same_batch(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if key == "query":
            assert got[key] == value
        else:
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def frame_batches(frame: pd.DataFrame, batch_size: int, max_history: int):
    for start in range(0, len(frame), batch_size):
        rows = frame.iloc[start:start + batch_size]
        yield collate({c: rows[c].tolist() for c in rows.columns}, max_history)


def test_sequence_positions_match_a_stable_sort(data):
    order, pos, n = sequence_positions(data.events)
    ev = data.events.sort_values(["user_id", "ts"], kind="stable")
    np.testing.assert_array_equal(order, ev.index.to_numpy())
    g = ev.groupby("user_id", sort=False)
    np.testing.assert_array_equal(pos, g.cumcount().to_numpy())
    np.testing.assert_array_equal(n, g["user_id"].transform("size").to_numpy())
    sorted_order, _, _ = sequence_positions(ev.reset_index(drop=True))  # already sorted: the identity
    np.testing.assert_array_equal(sorted_order, np.arange(len(ev)))


@pytest.mark.parametrize("rule", ["loo", "time"])
def test_windows_cut_at_collation_equal_the_example_frames(data, rule):
    name, split, select = next(s for s in splits(data) if s[0] == rule)
    assert split.train.sequences.n_events == len(data.events)  # every event stored once
    assert (split.train.history_lengths < MAX_HISTORY).any()  # and some histories are shorter
    for part in ("train", "valid", "test"):
        examples = getattr(split, part)
        want = reference_frame(data, select[part], MAX_HISTORY)
        assert len(examples) == len(want) > 0
        assert (examples.pos > MAX_HISTORY).any()  # some windows are cut
        assert any(q for q in want["query"]) and any(len(s) for s in want["shown"])
        for cap in (2, MAX_HISTORY, 50):  # collate's own cap, below and above the split's
            for got, ref in zip(examples.batches(16, cap), frame_batches(want, 16, cap), strict=True):
                assert_same_batch(got, ref)
        frame = examples.to_frame()
        assert frame["user_id"].tolist() == want["user_id"].tolist()
        assert frame["target"].tolist() == want["target"].tolist() == examples.targets.tolist()
        assert [h.tolist() for h in frame["history"]] == [h.tolist() for h in want["history"]]
        assert [s.tolist() for s in frame["shown"]] == [s.tolist() for s in want["shown"]]
        assert frame["query"].tolist() == want["query"].tolist()


def test_a_shuffled_subset_collates_its_own_rows(data):
    train = leave_one_out(data, MAX_HISTORY).train
    want = train.to_frame()
    rows = np.random.default_rng(0).permutation(len(train))[:40]
    assert_same_batch(train.take(rows).collate(), next(frame_batches(want.iloc[rows], 40, MAX_HISTORY)))


def test_no_query_or_shown_columns(data):
    bare = InteractionData(items=data.items, events=data.events[["user_id", "item_id", "ts"]])
    test = leave_one_out(bare, MAX_HISTORY).test
    assert test.sequences.query is None and test.sequences.shown_offsets is None
    b = test.head(3).collate()
    assert b["query"] == ["", "", ""] and b["shown"].tolist() == [[-1], [-1], [-1]]


def test_write_and_read_back_memory_mapped(data, tmp_path):
    split = leave_one_out(data, MAX_HISTORY)
    valid = validation_subset(split.valid, 50)
    write_examples(tmp_path, {"train": split.train, "valid": valid, "test": split.test})
    back = read_examples(tmp_path)
    assert list(back) == ["train", "valid", "test"]
    seqs = back["train"].sequences
    assert back["valid"].sequences is seqs and back["test"].sequences is seqs  # read once, shared
    for name in ("offsets", "items", "user_ids", "shown_offsets", "shown_items"):
        assert isinstance(getattr(seqs, name), np.memmap), name  # not copied into memory
        np.testing.assert_array_equal(getattr(seqs, name), getattr(split.train.sequences, name))
    assert isinstance(back["train"].seq, np.memmap) and back["train"].max_history == MAX_HISTORY
    assert seqs.query.equals(split.train.sequences.query)
    assert sorted(p.name for p in (tmp_path / "sequences").iterdir()) == [
        "items.npy", "offsets.npy", "query.arrow", "shown_items.npy", "shown_offsets.npy", "user_ids.npy"]
    for name, examples in (("train", split.train), ("valid", valid), ("test", split.test)):
        assert len(back[name]) == len(examples)
        for got, want in zip(back[name].batches(64), examples.batches(64), strict=True):
            assert_same_batch(got, want)
    # prepared again into the same folder, from data without queries or shown lists
    bare = leave_one_out(InteractionData(data.items, data.events[["user_id", "item_id", "ts"]]), MAX_HISTORY)
    write_examples(tmp_path, {"train": bare.train, "valid": bare.valid, "test": bare.test})
    again = read_examples(tmp_path)["test"]
    assert again.sequences.query is None and again.sequences.shown_offsets is None
    assert_same_batch(again.collate(), bare.test.collate())
    assert back["test"].collate()["query"] == split.test.collate()["query"]  # the first reader's files live on


def test_validation_subset_is_the_frames_sample(data):
    valid = leave_one_out(data, MAX_HISTORY).valid
    frame = valid.to_frame()
    want = frame.sample(n=30, random_state=0).sort_index()  # the rule as written for frames
    got = validation_subset(valid, 30)
    assert got.user_ids.tolist() == want["user_id"].tolist() and got.targets.tolist() == want["target"].tolist()
    assert validation_subset(valid, 0) is valid and validation_subset(valid, len(valid)) is valid


def test_from_frame_keeps_each_row_and_collates_like_collate():
    frame = pd.DataFrame({
        "user_id": [100, 101, 102, 100],
        "history": [[5, 6, 7, 8], [5], [], np.array([3, 3], np.int32)],
        "target": [9, 6, 4, 1],
        "query": pd.Series(["drill bits", "", None, "x"], dtype=object),  # None, not pandas' NaN
        "shown": [[3], [], [1, 2], None],
    })
    ex = Examples.from_frame(frame)
    assert len(ex) == 4 and ex.max_history == 4 and ex.history_lengths.tolist() == [4, 1, 0, 2]
    for cap in (1, 3, 10):
        assert_same_batch(ex.collate(cap), collate({c: frame[c].tolist() for c in frame.columns}, cap))
    back = ex.to_frame()
    assert [h.tolist() for h in back["history"]] == [[5, 6, 7, 8], [5], [], [3, 3]]
    assert back["query"].tolist() == ["drill bits", "", "", "x"] and back["target"].tolist() == [9, 6, 4, 1]
    assert [s.tolist() for s in back["shown"]] == [[3], [], [1, 2], []]
    only = Examples.from_frame(frame[["user_id", "history", "target"]])
    assert only.sequences.query is None and only.collate()["shown"].tolist() == [[-1]] * 4


def test_evaluation_from_gathered_ranks_equals_evaluate_retrieval(items, cache_dir):
    """Trainer.evaluate ranks each batch against the item table as it goes and reports from the
    ranks alone; on the same z that is evaluate_retrieval's report, tail breakdown included."""
    from karma.batch import prepare_batch
    from karma.factory import build_model
    from karma.retrieval import evaluate_retrieval
    from karma.train.loop import PlainBackend, TrainData, Trainer

    cfg = tiny_cfg(cache_dir, "model.dropout=0.0", "model.n_interest=2", "train.analysis_examples=0")
    model, tok = build_model(cfg, items, log=None)
    rng = np.random.default_rng(0)
    n = 600  # more than two evaluation batches of 256
    frame = pd.DataFrame({"user_id": np.arange(n), "target": rng.integers(0, 30, n),
                          "history": [rng.integers(0, 30, rng.integers(1, 25)) for _ in range(n)]})
    examples = Examples.from_frame(frame, max_history=cfg.data.max_history)
    counts = rng.integers(0, 9, 30)
    data = TrainData(train=examples, valid=examples, test=examples, items=items, counts=counts)
    trainer = Trainer(PlainBackend(model, cfg.train, 1, torch.device("cpu")), data, tok, cfg, log=lambda m: None)
    got = trainer.evaluate(examples)

    model.eval()
    with torch.no_grad():  # every z at once, in batches of another size
        z = torch.cat([model.interests(prepare_batch(b, model, tok, "cpu"))["z"]
                       for b in examples.batches(100, cfg.data.max_history)])
        item_emb = model.item_embeddings().float()
    want = evaluate_retrieval(z, item_emb, examples.targets, ks=tuple(cfg.train.ks), target_counts=counts)
    assert list(got) == list(want) and got["n_queries"] == n and 0 < got["tail/n_queries"] < n
    assert got == pytest.approx(want, abs=1e-12, nan_ok=True)
    assert retrieval_report(trainer.target_ranks(examples), examples.targets, cfg.train.ks, counts) == got


def test_query_strings_are_memory_mapped_arrow(data, tmp_path):
    split = leave_one_out(data, MAX_HISTORY)
    write_examples(tmp_path, {"train": split.train, "valid": split.valid, "test": split.test})
    before = pa.total_allocated_bytes()
    query = read_examples(tmp_path)["test"].sequences.query
    assert query.type == pa.large_string() and len(query) == len(data.events)
    assert pa.total_allocated_bytes() - before < query.nbytes / 10  # the strings stay in the mapped file
