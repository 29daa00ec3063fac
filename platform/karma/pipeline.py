"""From a DataConfig to example frames: load, validate, split, count popularity."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from karma.config import DataConfig
from karma.data import InteractionData, Split, item_counts, leave_one_out, load_source, time_split


@dataclass
class Prepared:
    data: InteractionData
    split: Split
    counts: np.ndarray  # training-target frequency per item row (popularity sampling, baseline)


def load_data(cfg: DataConfig) -> InteractionData:
    if cfg.source == "synthetic":
        return load_source("synthetic", None, n_users=cfg.synthetic_users, n_items=cfg.synthetic_items,
                           query_prob=cfg.synthetic_query_prob, seed=cfg.synthetic_seed)
    return load_source(cfg.source, cfg.path, **({"name": cfg.name} if cfg.source == "recbole" else {}))


def prepare(cfg: DataConfig, log=print) -> Prepared:
    start = time.time()
    data = load_data(cfg)
    if cfg.split == "loo":
        split = leave_one_out(data, max_history=cfg.max_history)
    else:
        split = time_split(data, cfg.valid_start, cfg.test_start, max_history=cfg.max_history)
    counts = item_counts(split.train, data.n_items)
    log(f"data {cfg.source}: {data.n_users} users, {data.n_items} items, {len(data.events)} events; "
        f"examples train {len(split.train)} / valid {len(split.valid)} / test {len(split.test)} "
        f"({time.time() - start:.1f}s)")
    return Prepared(data, split, counts)
