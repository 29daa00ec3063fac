"""From a DataConfig to compact examples: load, validate, split, count popularity; and the
prepared folder the Ray workers memory-map (docs/DATA_FORMAT.md, "The prepared folder")."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from karma.config import DataConfig
from karma.data import (InteractionData, Split, item_counts, leave_one_out, load_source, recent_targets,
                        time_split, validation_subset, write_examples)


@dataclass
class Prepared:
    data: InteractionData
    split: Split
    counts: np.ndarray  # training-target frequency per item row (popularity sampling, baseline)
    seconds: dict = field(default_factory=dict)  # per step: load (read or generate, validate), split


def load_data(cfg: DataConfig) -> InteractionData:
    if cfg.source == "synthetic":
        return load_source("synthetic", None, n_users=cfg.synthetic_users, n_items=cfg.synthetic_items,
                           query_prob=cfg.synthetic_query_prob, seed=cfg.synthetic_seed)
    return load_source(cfg.source, cfg.path, **({"name": cfg.name} if cfg.source == "recbole" else {}))


def split_data(data: InteractionData, cfg: DataConfig) -> Split:
    if cfg.split == "loo":
        split = leave_one_out(data, max_history=cfg.max_history)
    else:
        split = time_split(data, cfg.valid_start, cfg.test_start, max_history=cfg.max_history)
    return Split(recent_targets(split.train, cfg.train_recent), split.valid, split.test)


def prepare(cfg: DataConfig, log=print) -> Prepared:
    start = time.time()
    data = load_data(cfg)
    loaded = time.time()
    split = split_data(data, cfg)
    counts = item_counts(split.train, data.n_items)
    seconds = {"load": round(loaded - start, 2), "split": round(time.time() - loaded, 2)}
    log(f"data {cfg.source}: {data.n_users} users, {data.n_items} items, {len(data.events)} events; "
        f"examples train {len(split.train)} / valid {len(split.valid)} / test {len(split.test)} "
        f"(load {seconds['load']:.1f}s, split {seconds['split']:.1f}s)")
    return Prepared(data, split, counts, seconds)


def write_prepared(prep: Prepared, out: Path, eval_max_users: int) -> dict:
    """The folder a training job's workers read (`karma.train.worker`): the compact examples
    with the validation subset (`karma.data.validation_subset`) as `valid`, items.parquet and
    counts.npy. Returns the summary the driver plans with (n_train, n_valid, n_items)."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    valid = validation_subset(prep.split.valid, eval_max_users)
    write_examples(out, {"train": prep.split.train, "valid": valid, "test": prep.split.test})
    prep.data.items.to_parquet(out / "items.parquet")
    np.save(out / "counts.npy", prep.counts)
    return {"n_train": len(prep.split.train), "n_valid": len(valid), "n_test": len(prep.split.test),
            "n_items": prep.data.n_items, "n_users": prep.data.n_users, "n_events": len(prep.data.events),
            "stages": {**prep.seconds, "write": round(time.time() - start, 2)}}
