"""Train/valid/test splits of the event sequences into example frames.

Every example's history holds only events that come strictly before its target in
the user's (user_id, ts)-sorted sequence, so no split leaks its targets into the
inputs of an earlier one. The first event of a user is never a target (no history).
Every split must hold at least one example: an empty one is a DataError saying how to fix
it (training evaluates the validation split each epoch and the test split at the end).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

import numpy as np

from .examples import make_examples, sequence_positions
from .schema import DataError, InteractionData


@dataclass
class Split:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


def leave_one_out(data: InteractionData, max_history: int = 50) -> Split:
    """Per user: last event -> test, second-to-last -> valid, every earlier event at
    position >= 1 -> train (the standard protocol of SASRec/UniSRec/RecFormer)."""
    ev, pos, n = sequence_positions(data.events)
    split = Split(
        train=make_examples(data, ev, pos, pos <= n - 3, max_history),
        valid=make_examples(data, ev, pos, pos == n - 2, max_history),
        test=make_examples(data, ev, pos, pos == n - 1, max_history),
    )
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
    ev, pos, _ = sequence_positions(data.events)
    ts = ev["ts"].to_numpy()
    split = Split(
        train=make_examples(data, ev, pos, ts < valid_start, max_history),
        valid=make_examples(data, ev, pos, (ts >= valid_start) & (ts < test_start), max_history),
        test=make_examples(data, ev, pos, ts >= test_start, max_history),
    )
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


def _suggest_bounds(targets: np.ndarray) -> str:
    """", e.g. data.valid_start=V data.test_start=T": the targets' 80% and 90% points, when those
    give every split a target (ties in ts can make them coincide)."""
    v, t = (int(x) for x in np.quantile(targets, [0.8, 0.9], method="lower"))
    if (targets < v).any() and ((targets >= v) & (targets < t)).any() and (targets >= t).any():
        return f", e.g. data.valid_start={v} data.test_start={t} (the 80% and 90% points of the targets' ts)"
    return ""
