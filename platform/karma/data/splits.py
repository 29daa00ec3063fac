"""Train/valid/test splits of the event sequences: each split an index of target events into
the sequences stored once (`karma.data.compact`).

Every example's history holds only events that come strictly before its target in
the user's (user_id, ts)-sorted sequence, so no split leaks its targets into the
inputs of an earlier one. The first event of a user is never a target (no history).
Every split must hold at least one example: an empty one is a DataError saying how to fix
it (training evaluates the validation split each epoch and the test split at the end).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .compact import Examples, Sequences
from .examples import sequence_positions
from .schema import DataError, InteractionData


@dataclass
class Split:
    train: Examples
    valid: Examples
    test: Examples


def _splitter(data: InteractionData, max_history: int):
    """(pick, order, pos, n): `pick(select)` makes the examples of the sorted events where
    `select` holds and that have an earlier event of their user."""
    order, pos, n = sequence_positions(data.events)
    seqs = Sequences.from_events(data, order, pos)

    def pick(select: np.ndarray) -> Examples:
        return Examples.at(seqs, np.flatnonzero(select & (pos >= 1)), max_history)

    return pick, order, pos, n


def leave_one_out(data: InteractionData, max_history: int = 50) -> Split:
    """Per user: last event -> test, second-to-last -> valid, every earlier event at
    position >= 1 -> train (the standard protocol of SASRec/UniSRec/RecFormer)."""
    pick, _, pos, n = _splitter(data, max_history)
    split = Split(train=pick(pos <= n - 3), valid=pick(pos == n - 2), test=pick(pos == n - 1))
    longest = int(n.max()) if len(n) else 0
    for part, need in (("train", 4), ("valid", 3), ("test", 2)):
        if not len(getattr(split, part)):
            raise DataError(
                f"leave_one_out: the {part} split is empty: it needs users with at least {need} events "
                f"and the longest sequence has {longest}; use a data set with longer sequences, or "
                "data.split=time with data.valid_start / data.test_start"
            )
    return split


def time_split(data: InteractionData, valid_start: int, test_start: int, max_history: int = 50) -> Split:
    """Global temporal split: targets with ts < valid_start -> train, [valid_start,
    test_start) -> valid, >= test_start -> test. Histories may reach back across the
    boundaries (earlier events are legitimately known), never forward."""
    if valid_start > test_start:
        raise DataError(
            f"time_split: valid_start ({valid_start}) must be <= test_start ({test_start}); "
            "swap them or pick boundaries in time order"
        )
    pick, order, pos, _ = _splitter(data, max_history)
    ts = data.events["ts"].to_numpy(np.int64)[order]
    split = Split(train=pick(ts < valid_start), valid=pick((ts >= valid_start) & (ts < test_start)),
                  test=pick(ts >= test_start))
    window = {"train": f"ts < valid_start ({valid_start})",
              "valid": f"valid_start ({valid_start}) <= ts < test_start ({test_start})",
              "test": f"ts >= test_start ({test_start})"}
    for part in ("train", "valid", "test"):
        if not len(getattr(split, part)):
            targets = ts[pos >= 1]  # a user's first event is never a target
            if not len(targets):
                raise DataError("time_split: no user has 2 events, so there is no target to split")
            raise DataError(
                f"time_split: the {part} split is empty: no target has {window[part]}; targets' ts run "
                f"from {int(targets.min())} to {int(targets.max())}. Set data.valid_start and data.test_start "
                f"inside that range so that each split gets targets{_suggest_bounds(targets)}"
            )
    return split


def recent_targets(train: Examples, n: int) -> Examples:
    """Only each user's last `n` training targets (0 = all), in their order. Heavy users would
    otherwise supply most of an epoch (on MovieLens latest-small 10% of the users hold half the
    events) while every user counts once in validation and test; the original SASRec trains on
    each user's most recent items alone, for the same reason."""
    if n <= 0 or not len(train):
        return train
    last = np.zeros(train.sequences.n_users, np.int64)
    np.maximum.at(last, train.seq, train.pos)
    return train.take(np.flatnonzero(train.pos > last[train.seq] - n))


def validation_subset(valid: Examples, max_users: int) -> Examples:
    """The validation examples scored each epoch, by one rule for every training path: a fixed
    random sample of `max_users` (seed 0, independent of the training seed; 0 = all), kept in
    their original order. The first N would favour whichever users the reader lists first.
    (The sample pandas' `DataFrame.sample(n=max_users, random_state=0)` draws.)"""
    if not max_users or max_users >= len(valid):
        return valid
    return valid.take(np.sort(np.random.RandomState(0).choice(len(valid), size=max_users, replace=False)))


def _suggest_bounds(targets: np.ndarray) -> str:
    """", e.g. data.valid_start=V data.test_start=T": the targets' 80% and 90% points, when those
    give every split a target (ties in ts can make them coincide)."""
    v, t = (int(x) for x in np.quantile(targets, [0.8, 0.9], method="lower"))
    if (targets < v).any() and ((targets >= v) & (targets < t)).any() and (targets >= t).any():
        return f", e.g. data.valid_start={v} data.test_start={t} (the 80% and 90% points of the targets' ts)"
    return ""
