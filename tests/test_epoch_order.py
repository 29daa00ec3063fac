"""The Ray job's training order: every epoch a fresh permutation of all examples, fixed by
(train.seed, epoch), split across workers without overlap; a batch holds no more rows of one
user than chance would put there (the examples are stored in user order); a resumed epoch
skips exactly the batches it had consumed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from karma.pipeline import prepare
from karma.train.loop import epoch_batches, epoch_rows

B, WORLD = 32, 2


@pytest.fixture(scope="module")
def train(cache_dir):
    cfg = tiny_cfg(cache_dir, f"train.batch_size={B}")
    return cfg, prepare(cfg.data, log=lambda m: None).split.train


def test_each_epoch_is_a_fresh_permutation_split_across_workers(train):
    _, examples = train
    n = len(examples)
    lengths = examples.history_lengths
    micro = n // (B * WORLD)
    ranks = [epoch_rows(lengths, B, WORLD, r, micro, seed=0, epoch=3) for r in range(WORLD)]
    assert all(len(r) == micro * B for r in ranks)
    assert len(np.unique(np.concatenate(ranks))) == WORLD * micro * B  # no row twice in an epoch
    np.testing.assert_array_equal(ranks[0], epoch_rows(lengths, B, WORLD, 0, micro, seed=0, epoch=3))
    assert not np.array_equal(ranks[0], epoch_rows(lengths, B, WORLD, 0, micro, seed=0, epoch=4))
    assert not np.array_equal(ranks[0], epoch_rows(lengths, B, WORLD, 0, micro, seed=1, epoch=3))


def test_a_batch_holds_same_user_rows_only_by_chance(train):
    cfg, examples = train
    users = examples.user_ids
    n = len(examples)
    micro = n // (B * WORLD)

    def shared(batch_users: np.ndarray) -> float:  # share of rows whose user has another row in the batch
        _, counts = np.unique(batch_users, return_counts=True)
        return counts[counts > 1].sum() / len(batch_users)

    got = np.mean([shared(b["user_id"].numpy()) for e in range(3) for r in range(WORLD)
                   for b in epoch_batches(examples, cfg, r, WORLD, micro, e)])
    # chance: a row of a user with k rows shares its batch with none of the other k - 1 rows
    counts = np.unique(users, return_counts=True)[1]
    k = np.repeat(counts, counts)  # per row: its user's number of rows
    alone = np.prod([(n - k - j) / (n - 1 - j) for j in range(B - 1)], axis=0)
    assert got == pytest.approx(1 - alone.mean(), abs=0.03)
    assert shared(users[:B]) > 0.9  # stored order: a batch would be a handful of users


def test_a_resumed_epoch_skips_exactly_the_consumed_batches(train):
    cfg, examples = train
    micro = len(examples) // (B * WORLD)
    full = list(epoch_batches(examples, cfg, 1, WORLD, micro, epoch=2))
    resumed = list(epoch_batches(examples, cfg, 1, WORLD, micro, epoch=2, done=5))
    assert len(full) == micro and len(resumed) == micro - 5
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["user_id"], b["user_id"]) and torch.equal(a["history"], b["history"])


def test_ray_workers_bucket_by_length_like_the_plain_loop():
    """train.bucket_batches applies in the Ray path too: each global batch holds similar lengths,
    every row of the epoch's whole batches once across the workers."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=640)
    micro = 640 // (WORLD * B)
    ranks = [epoch_rows(lengths, B, WORLD, r, micro, seed=0, epoch=1, bucket_batches=4) for r in range(WORLD)]
    assert sorted(np.concatenate(ranks).tolist()) == list(range(micro * WORLD * B))

    def padded(rows_by_rank):
        return sum(max(lengths[r[i * B:(i + 1) * B]].max() for r in rows_by_rank) for i in range(micro))

    plain = [epoch_rows(lengths, B, WORLD, r, micro, seed=0, epoch=1) for r in range(WORLD)]
    assert padded(ranks) < 0.8 * padded(plain)
