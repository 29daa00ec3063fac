"""The one training loop every path runs: the plain run, the Ray job's workers, Tune trials and
the throughput benchmark (through the same backends).

`Trainer` owns epochs, gradient accumulation, the per-epoch shuffle, progress, validation,
early stopping, the best epoch's weights, the finite-loss guard and the test protocol. A
backend owns the maths of applying a loss: `PlainBackend` (AdamW, clipping, warm-up + cosine)
in one process, `DeepSpeedBackend` around a ZeRO engine in a process group. Callers own their
I/O: the Ray worker checkpoints and reports between epochs, the plain entry writes a JSON.
Knows nothing of Ray."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from karma.config import Config, ConfigError, TrainConfig
from karma.data import Examples, epoch_order
from karma.evaluate import retrieval_report, semantic_analyses, target_ranks
from karma.optim import make_optimizer, make_scheduler
from karma.progress import Progress
from karma.batch import prepare_batch
from karma.step import Gather, NegativeSampler, local_gather
from karma.train import NonFiniteLoss
from karma.train.early_stop import StopRule

SELECT_METRIC = "NDCG@10"  # the validation metric early stopping and the best epoch follow


@dataclass
class TrainData:
    """What a run trains and measures on: the splits' examples (`karma.data.Examples`, memory-mapped
    in the Ray workers), the item table and the training interaction counts (negatives, long-tail
    breakdown). `valid` is the subset scored every epoch (`karma.data.validation_subset`)."""

    train: Examples
    valid: Examples
    test: Examples
    items: pd.DataFrame
    counts: np.ndarray


@dataclass
class LoopState:
    """Where a run stands; plain data, so it travels in a checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # optimizer steps taken inside the unfinished epoch
    best: float = -1.0  # best validation SELECT_METRIC so far
    best_epoch: int = 0
    best_metrics: dict | None = None
    stale: int = 0  # epochs since the early-stopping rule last saw a gain (karma.train.early_stop)
    curve: list = field(default_factory=list)  # validation SELECT_METRIC per epoch

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})  # older checkpoints lack newer keys


def steps_plan(train: TrainConfig, n_train: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): every epoch is cut into whole global batches of
    world x batch_size x grad_accum examples (the remainder waits for the next epoch's shuffle)."""
    per_epoch = n_train // (train.batch_size * world * train.grad_accum)
    if per_epoch < 1:
        raise ConfigError(
            f"train.batch_size={train.batch_size} x dist.num_workers={world} x train.grad_accum={train.grad_accum} "
            f"exceeds the {n_train} training examples; lower the batch size or the worker count")
    total = per_epoch * train.epochs
    return per_epoch, min(total, train.max_steps) if train.max_steps > 0 else total


def epoch_rows(history_lengths: np.ndarray, batch_size: int, world: int, rank: int, micro_batches: int,
               seed: int, epoch: int, bucket_batches: int = 0) -> np.ndarray:
    """This worker's example rows for one epoch, in training order: a fresh permutation for each
    (seed, epoch) (`karma.data.epoch_order`, optionally bucketed by history length), cut into
    global batches of world x batch_size rows of which each worker takes its own slice. The
    same after a restart, so a resumed epoch skips exactly the batches consumed before it."""
    order = epoch_order(history_lengths, world * batch_size, np.random.default_rng([seed, epoch]), bucket_batches)
    return order[: micro_batches * world * batch_size].reshape(micro_batches, world, batch_size)[:, rank].reshape(-1)


def epoch_batches(train: Examples, cfg: Config, rank: int, world: int, micro_batches: int, epoch: int,
                  done: int = 0, history_lengths: np.ndarray | None = None):
    """This worker's collated micro-batches of one epoch (`epoch_rows`), after the first `done`;
    each batch's history windows are cut as it is collated."""
    t = cfg.train
    lengths = train.history_lengths if history_lengths is None else history_lengths
    rows = epoch_rows(lengths, t.batch_size, world, rank, micro_batches, t.seed, epoch, t.bucket_batches)
    return train.take(rows[done * t.batch_size:]).batches(t.batch_size, cfg.data.max_history)


def trained_names(module: torch.nn.Module) -> set[str]:
    """The state-dict names training changes: the parameters. The persistent buffers (the frozen
    item text table, the items' token ids) are fixed when the model is built, so the best
    epoch's weights leave them out: at 100,000 items the text table alone is 154 MB that rank 0
    would copy and every checkpoint would write again."""
    return {name for name, _ in module.named_parameters(remove_duplicate=False)}


class PlainBackend:
    """One process, no DeepSpeed: AdamW over `optim.param_groups`, gradient clipping and the
    warm-up + cosine schedule, an optimizer step every grad_accum micro-batches."""

    rank, world = 0, 1
    gather: Gather = staticmethod(local_gather)

    def __init__(self, model: torch.nn.Module, train: TrainConfig, total_steps: int, device: torch.device,
                 precision: str = "fp32"):
        self.module, self.device, self.train_cfg = model.to(device), device, train
        self.bf16 = precision == "bf16"  # autocast: fp32 weights and optimizer, bf16 matmuls
        self.optimizer = make_optimizer(model, train, fused=(device.type == "cuda") or None)
        self.scheduler = make_scheduler(self.optimizer, train.warmup_steps, total_steps)
        self._params = [p for p in model.parameters() if p.requires_grad]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, loss: torch.Tensor, boundary: bool) -> None:
        (loss / self.train_cfg.grad_accum).backward()
        if boundary:
            torch.nn.utils.clip_grad_norm_(self._params, self.train_cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def weights(self) -> dict[str, torch.Tensor]:
        trained = trained_names(self.module)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items() if k in trained}

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor] | None) -> None:
        trained = trained_names(self.module)
        for name, tensor in self.module.state_dict().items():
            if name in trained:
                tensor.copy_(weights[name])


class DeepSpeedBackend:
    """A DeepSpeed engine (`engine.make_engine`) on one rank of a process group: the engine
    accumulates, clips, steps and schedules; weights are gathered to rank 0 and broadcast back."""

    def __init__(self, engine, rank: int = 0, world: int = 1):
        from karma.train.engine import gather_targets

        self.engine, self.rank, self.world = engine, rank, world
        self.module, self.device = engine.module, engine.device
        self.gather = gather_targets

    def autocast(self):
        return contextlib.nullcontext()  # the engine holds bf16 weights itself under dist.precision=bf16

    def train_step(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.backward(loss)
        self.engine.step()  # an optimizer step at the engine's own accumulation boundary

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The full weights on rank 0 (a CPU copy), None elsewhere; a collective under ZeRO-3."""
        from karma.train.engine import full_state_dict

        full = full_state_dict(self.engine)
        trained = trained_names(self.module)
        out = ({k: v.detach().to("cpu", copy=True).contiguous() for k, v in full.items() if k in trained}
               if self.rank == 0 else None)
        del full
        return out

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Rank 0's full state dict into every rank's module: rank 0 copies it in and broadcasts
        each tensor (under ZeRO-3 inside a gather, whose exit re-partitions rank 0's values)."""
        gathered = contextlib.nullcontext()
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0)
        with gathered:
            trained = trained_names(self.module)
            for name, tensor in self.module.state_dict().items():
                if name not in trained:
                    continue
                if self.rank == 0:
                    tensor.copy_(weights[name])
                if self.world > 1:
                    dist.broadcast(tensor, src=0)


def train_step(backend, batch: dict, loss_cfg, sampler: NegativeSampler | None,
               boundary: bool = True) -> tuple[torch.Tensor, dict]:
    """One micro-batch: the model's own loss (`model.loss`), then the backend's backward and, at
    an accumulation boundary, its optimizer step. Returns the loss and its detached parts."""
    with backend.autocast():
        loss, parts = backend.module.loss(batch, loss_cfg, sampler, gather=backend.gather)
    backend.train_step(loss, boundary)
    return loss, parts


def sampler_seed(seed: int, rank: int) -> int:
    """Each worker's negative-sampling stream: distinct per rank, the same for a given seed."""
    return seed * 1000 + rank


class FiniteGuard:
    """Notes the first optimizer step whose loss is NaN or inf without waiting for the device
    (a tensor kept where the loss is); `check` reads it, agreed across ranks, and raises."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, world: int, epoch: int) -> None:
        flag = self.first_bad.clone()
        if world > 1:  # every rank stops together: the earliest bad step of any rank
            flag = torch.where(flag < 0, torch.full_like(flag, 2**62), flag)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            flag = torch.where(flag == 2**62, torch.full_like(flag, -1), flag)
        bad = int(flag)
        if bad >= 0:
            raise NonFiniteLoss(
                f"the training loss is not finite (NaN or inf) at step {bad}, in epoch {epoch}: the run stops "
                "here and nothing from this epoch is saved, so the last checkpoint is intact. Lower train.lr, "
                "raise train.warmup_steps or lower train.grad_clip, and check the data for broken rows")


class Trainer:
    """The epoch loop over a backend. `epochs()` trains, validates and yields after every epoch
    (the caller checkpoints there; `done` says whether it was the last); `finish()` then puts
    the best epoch's weights back and runs the test protocol. Resumes from `state` (mid-epoch
    too: the epoch's order is a function of (seed, epoch)) and `best_weights`."""

    def __init__(self, backend, data: TrainData, tok, cfg: Config, log: Callable[[str], None] = print,
                 state: LoopState | None = None, best_weights: dict | None = None,
                 on_step: Callable[[LoopState, dict | None], None] | None = None):
        self.backend, self.data, self.tok, self.cfg, self.log = backend, data, tok, cfg, log
        self.state = state or LoopState()
        self.best_weights = best_weights  # rank 0's CPU copy of the best epoch's weights
        self.on_step = on_step  # after every optimizer step, with the progress line's numbers when logged
        world = backend.world
        self.steps_per_epoch, self.total_steps = steps_plan(cfg.train, len(data.train), world)
        self.sampler = NegativeSampler(data.counts, cfg.loss.n_negatives,
                                       seed=sampler_seed(cfg.train.seed, backend.rank), device=backend.device)
        self._history_lengths = data.train.history_lengths
        # CPU: reading a flag costs nothing, so check every step; elsewhere at progress lines
        # and epoch ends, where the step already waits for the device.
        self._check_every_step = backend.device.type == "cpu"
        self.progress = Progress(self.total_steps, cfg.train.log_every, log)
        t = cfg.train
        self.stop_rule = StopRule(t.early_stop_patience, t.early_stop_window, t.early_stop_min_epochs)

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps or self.stop_rule.should_stop(self.state.curve)

    def _train_epoch(self) -> None:
        s, t, b = self.state, self.cfg.train, self.backend
        guard = FiniteGuard(b.device)
        b.module.train()
        done = s.batch_in_epoch * t.grad_accum  # micro-batches consumed before a restart
        micro_batches = self.steps_per_epoch * t.grad_accum
        epoch = epoch_batches(self.data.train, self.cfg, b.rank, b.world, micro_batches, s.epoch, done,
                              self._history_lengths)
        for micro, raw in enumerate(epoch, start=done + 1):
            if s.step >= self.total_steps:
                break
            batch = prepare_batch(raw, b.module, self.tok, b.device)
            boundary = micro % t.grad_accum == 0
            loss, parts = train_step(b, batch, self.cfg.loss, self.sampler, boundary)
            guard.record(loss, s.step + 1)
            if not boundary:
                continue
            s.step += 1
            s.batch_in_epoch = micro // t.grad_accum
            stats = self.progress.update(s.step, parts, t.batch_size * t.grad_accum * b.world)
            if self._check_every_step or stats is not None:
                guard.check(b.world, s.epoch + 1)
            if self.on_step is not None:
                self.on_step(s, stats)
        guard.check(b.world, s.epoch + 1)

    def epochs(self) -> Iterator[dict]:
        """Train until the step budget or early stopping; after each epoch, its validation
        metrics (with epoch, step, train_seconds, eval_seconds)."""
        s = self.state
        start = time.time()
        while not self.done:
            epoch_start = time.time()
            self._train_epoch()
            train_seconds = time.time() - epoch_start
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            metrics = self.evaluate(self.data.valid)
            metrics.update(epoch=s.epoch, step=s.step, train_seconds=train_seconds,
                           eval_seconds=time.time() - epoch_start - train_seconds)
            seen = self.backend.module.seen_offset()
            if seen is not None:  # model.seen_offset: how far the history's items have moved
                metrics["seen_offset"] = seen
            s.curve.append(metrics[SELECT_METRIC])
            if metrics[SELECT_METRIC] > s.best:
                s.best, s.best_epoch, s.best_metrics = metrics[SELECT_METRIC], s.epoch, metrics
                self.best_weights = self.backend.weights()  # a collective under ZeRO-3
            s.stale = self.stop_rule.stale(s.curve)
            self.log(f"epoch {s.epoch}: valid HR@10={metrics['HR@10']:.4f} NDCG@10={metrics['NDCG@10']:.4f} "
                     f"({time.time() - start:.0f}s)")
            if self.done and s.step < self.total_steps:
                self.log(f"early stop after epoch {s.epoch}: {self.stop_rule.describe()} (best: epoch {s.best_epoch})")
            yield metrics

    def target_ranks(self, examples: Examples, served: bool = False) -> torch.Tensor:
        """Every example's full-corpus target rank (int64 [n]; [n, 2] with `served`, the second
        column without the example's history): each worker ranks its own share, batch by batch
        on its device (`evaluate.target_ranks`), and only the ranks are gathered.

        Shares are padded to equal length (repeating the first examples) so every worker runs
        the same forwards (ZeRO-3 needs that); the padding's ranks are dropped."""
        b = self.backend
        n = len(examples)
        per = -(-n // b.world)
        share = examples.take(np.arange(b.rank * per, b.rank * per + per) % max(n, 1))
        ranks = target_ranks(b.module, share, self.tok, self.cfg.data.max_history, b.device, served=served)
        if b.world > 1:
            ranks = ranks.to(b.device)  # NCCL gathers device tensors
            parts = [torch.empty_like(ranks) for _ in range(b.world)]
            dist.all_gather(parts, ranks)
            ranks = torch.cat(parts).cpu()
        return ranks[:n]

    def evaluate(self, examples: Examples) -> dict:
        """HR@K / NDCG@K and MRR over the full item pool (exact ranks) with their long-tail
        breakdown (`tail/...`), from the gathered target ranks: every rank computes the same
        metrics, so every rank decides alike."""
        return self.report(self.target_ranks(examples), examples)

    def report(self, ranks: torch.Tensor, examples: Examples) -> dict:
        """`evaluate`'s metrics of given target ranks of `examples`."""
        return retrieval_report(ranks, examples.targets, tuple(self.cfg.train.ks), self.data.counts)

    def finish(self) -> dict:
        """The test protocol, once training is over: the best epoch's weights back into the
        model, then the test split's metrics (`test`) and, for a language model with
        train.analysis_examples > 0, the semantic analyses of that many test examples
        (`analyses`) and a few decoded texts (`decoded`); `test_served` is the test split ranked
        without each user's history, as the Serve endpoint returns it. Every rank calls it (collectives)."""
        s, cfg = self.state, self.cfg
        if s.best_epoch and s.best_epoch != s.epoch:
            self.backend.load_weights(self.best_weights)
            self.log(f"best validation {SELECT_METRIC} at epoch {s.best_epoch}: its weights are tested and exported")
        # one forward for both: the protocol keeps history items in the ranking; the endpoint
        # drops them by default
        ranks = self.target_ranks(self.data.test, served=True)
        out = {"best_epoch": s.best_epoch, "best": s.best_metrics, "test": self.report(ranks[:, 0], self.data.test),
               "test_served": self.report(ranks[:, 1], self.data.test)}
        self.log(f"test (weights of epoch {s.best_epoch}): HR@10={out['test']['HR@10']:.4f} "
                 f"NDCG@10={out['test']['NDCG@10']:.4f} tail/HR@10={out['test']['tail/HR@10']:.4f}")
        self.log(f"test, history excluded as served: HR@10={out['test_served']['HR@10']:.4f} "
                 f"NDCG@10={out['test_served']['NDCG@10']:.4f}")
        if cfg.train.analysis_examples and cfg.model.arch == "sasrec":
            self.log("semantic analyses skipped: they read a language model's attention and decoding, SASRec has "
                     "neither")
        elif cfg.train.analysis_examples:
            n = min(cfg.train.analysis_examples, len(self.data.test))
            # every rank runs the same forwards (ZeRO-3 gathers parameters collectively)
            analyses, out["decoded"] = semantic_analyses(
                self.backend.module, self.data.test, self.data.items, self.tok, cfg.data.max_history,
                self.backend.device, n=n, decode_tokens=cfg.data.text_max_tokens)
            out["analyses"] = {**analyses, "n_examples": n}
            self.log(f"test analyses: sink_rate_first={analyses['sink_rate_first']:.3f} "
                     f"effective_rank={analyses['effective_rank']:.1f} token_f1={analyses['token_f1']:.3f}")
        return out
