"""Train/valid/test splits of the event sequences into example frames.

Every example's history holds only events that come strictly before its target in
the user's (user_id, ts)-sorted sequence, so no split leaks its targets into the
inputs of an earlier one. The first event of a user is never a target (no history).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

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
    return Split(
        train=make_examples(data, ev, pos, pos <= n - 3, max_history),
        valid=make_examples(data, ev, pos, pos == n - 2, max_history),
        test=make_examples(data, ev, pos, pos == n - 1, max_history),
    )


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
    return Split(
        train=make_examples(data, ev, pos, ts < valid_start, max_history),
        valid=make_examples(data, ev, pos, (ts >= valid_start) & (ts < test_start), max_history),
        test=make_examples(data, ev, pos, ts >= test_start, max_history),
    )
