"""A plain single-process training loop (no Ray, no DeepSpeed): the reference the distributed
job is measured against, and the quickest way to try a config on one machine."""

from __future__ import annotations

import time

import numpy as np
import torch

from karma.config import Config
from karma.data import epoch_order
from karma.evaluate import batches, popularity_metrics, retrieval_metrics, semantic_analyses, validation_subset
from karma.factory import build_model
from karma.optim import make_optimizer, make_scheduler
from karma.pipeline import prepare
from karma.progress import Progress
from karma.step import NegativeSampler, prepare_batch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def total_steps(cfg: Config, n_train: int, world: int = 1) -> int:
    per_epoch = n_train // (cfg.train.batch_size * world) // cfg.train.grad_accum
    steps = per_epoch * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps


def train_plain(cfg: Config, log=print) -> dict:
    """Train on cfg's data; returns validation metrics before/after and the popularity baseline,
    and test metrics of the weights with the best validation NDCG@10 (restored into the model).
    Every metric set carries its long-tail breakdown (`tail/...`); with train.analysis_examples
    > 0, `analyses` holds the semantic analyses of that many test examples (sinks, read-out
    collapse, effective rank, decoded-text fidelity) and `decoded` a few (decoded, reference) pairs."""
    device = pick_device(cfg.train.device)
    prep = prepare(cfg.data, log)
    valid = validation_subset(prep.split.valid, cfg.train.eval_max_users)
    model, tok = build_model(cfg, prep.data.items, log=log)
    model.to(device)
    ks = cfg.train.ks
    evaluate = lambda: retrieval_metrics(model, valid, tok, cfg.data.max_history, device, ks,  # noqa: E731
                                         counts=prep.counts)

    result = {"popularity": popularity_metrics(prep.counts, valid, ks), "before": evaluate(), "epochs": []}
    log(f"popularity baseline HR@10={result['popularity']['HR@10']:.4f}; "
        f"untrained HR@10={result['before']['HR@10']:.4f}")

    opt = make_optimizer(model, cfg.train)
    steps = total_steps(cfg, len(prep.split.train))
    sched = make_scheduler(opt, cfg.train.warmup_steps, steps)
    sampler = NegativeSampler(prep.counts, cfg.loss.n_negatives, seed=cfg.train.seed, device=device)
    progress = Progress(steps, cfg.train.log_every, log)
    rng = np.random.default_rng(cfg.train.seed)
    hist_len = prep.split.train["history"].map(len).to_numpy()
    step, epoch, best, stale, start = 0, 0, -1.0, 0, time.time()
    best_state, best_epoch = None, 0
    while step < steps:
        epoch += 1
        model.train()
        epoch_start = time.time()
        order = epoch_order(hist_len, cfg.train.batch_size, rng, cfg.train.bucket_batches)
        train = prep.split.train.iloc[order]
        for i, raw in enumerate(batches(train, cfg.train.batch_size, cfg.data.max_history)):
            batch = prepare_batch(raw, model, tok, device)
            loss, parts = model.loss(batch, cfg.loss, sampler)
            (loss / cfg.train.grad_accum).backward()
            if (i + 1) % cfg.train.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            progress.update(step, parts, cfg.train.batch_size * cfg.train.grad_accum)
            if step >= steps:
                break
        train_seconds = time.time() - epoch_start
        metrics = evaluate()
        metrics.update(epoch=epoch, step=step, train_seconds=train_seconds,
                       eval_seconds=time.time() - epoch_start - train_seconds)
        result["epochs"].append(metrics)
        log(f"epoch {epoch}: valid HR@10={metrics['HR@10']:.4f} NDCG@10={metrics['NDCG@10']:.4f} "
            f"({time.time() - start:.0f}s)")
        if metrics["NDCG@10"] > best:
            best, stale, best_epoch = metrics["NDCG@10"], 0, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            stale += 1
            if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
                log(f"early stop: no NDCG@10 gain for {stale} epochs")
                break
    result.update(after=result["epochs"][-1], steps=step, seconds=time.time() - start)
    if best_state is not None:
        model.load_state_dict(best_state)
    result.update(best_epoch=best_epoch, best=result["epochs"][best_epoch - 1] if best_epoch else None,
                  test=retrieval_metrics(model, prep.split.test, tok, cfg.data.max_history, device, ks,
                                         counts=prep.counts))
    log(f"test (weights of epoch {best_epoch}): HR@10={result['test']['HR@10']:.4f} "
        f"NDCG@10={result['test']['NDCG@10']:.4f} tail/HR@10={result['test']['tail/HR@10']:.4f}")
    if cfg.train.analysis_examples and cfg.model.arch == "sasrec":
        log("semantic analyses skipped: they read a language model's attention and decoding, SASRec has neither")
    elif cfg.train.analysis_examples:
        result["analyses"], result["decoded"] = semantic_analyses(
            model, prep.split.test, prep.data.items, tok, cfg.data.max_history, device,
            n=cfg.train.analysis_examples, decode_tokens=cfg.data.text_max_tokens)
        result["analyses"]["n_examples"] = min(cfg.train.analysis_examples, len(prep.split.test))
        log(f"test analyses: sink_rate_first={result['analyses']['sink_rate_first']:.3f} "
            f"effective_rank={result['analyses']['effective_rank']:.1f} token_f1={result['analyses']['token_f1']:.3f}")
    result["model"], result["tokenizer"], result["prepared"] = model, tok, prep
    return result
