"""The plain run: the one training loop (`karma.train.loop`) in this process with the plain
backend (no Ray, no DeepSpeed). The quickest way to try a config on one machine, measured by
the same protocol as the Ray job."""

from __future__ import annotations

import time

import torch

from karma.config import Config
from karma.data import validation_subset
from karma.evaluate import popularity_metrics
from karma.factory import build_model
from karma.pipeline import prepare
from karma.train.loop import PlainBackend, TrainData, Trainer, steps_plan


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_plain(cfg: Config, log=print) -> dict:
    """Train on cfg's data; returns the popularity baseline and the untrained model's validation
    metrics (`popularity`, `before`), every epoch's (`epochs`, the last as `after`), and the
    test protocol's results (`Trainer.finish`: best_epoch, best, test, test_served, analyses, decoded).
    Every metric set carries its long-tail breakdown (`tail/...`). The trained model (best
    epoch's weights), its tokenizer and the prepared data come back too."""
    device = pick_device(cfg.train.device)
    prep = prepare(cfg.data, log)
    data = TrainData(train=prep.split.train, valid=validation_subset(prep.split.valid, cfg.train.eval_max_users),
                     test=prep.split.test, items=prep.data.items, counts=prep.counts)
    model, tok = build_model(cfg, prep.data.items, log=log, counts=prep.counts)
    _, total = steps_plan(cfg.train, len(data.train))
    trainer = Trainer(PlainBackend(model, cfg.train, total, device), data, tok, cfg, log)
    result = {"popularity": popularity_metrics(prep.counts, data.valid, cfg.train.ks),
              "before": trainer.evaluate(data.valid)}
    log(f"popularity baseline HR@10={result['popularity']['HR@10']:.4f}; "
        f"untrained HR@10={result['before']['HR@10']:.4f}")
    start = time.time()
    result["epochs"] = list(trainer.epochs())
    result.update(after=result["epochs"][-1], steps=trainer.state.step, seconds=time.time() - start)
    result.update(trainer.finish())
    result["model"], result["tokenizer"], result["prepared"] = model, tok, prep
    return result
