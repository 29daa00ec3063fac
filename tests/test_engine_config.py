"""DeepSpeed and compile switches: per-device defaults, the engine config they produce, clear
errors, and an in-process engine that trains, checkpoints and reloads with the prompt buffers."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from karma.config import ConfigError, load_config
from karma.train.engine import deepspeed_config, resolve_dist


def test_per_device_defaults():
    cpu = resolve_dist(load_config(None, ["dist.zero_stage=3"]).dist)
    assert (cpu.compile, cpu.overlap_comm, cpu.stage3_param_persistence_threshold) == ("none", False, 100_000)
    gpu2 = resolve_dist(load_config(None, ["dist.use_gpu=true"]).dist)
    assert (gpu2.compile, gpu2.overlap_comm) == ("decoder", True)
    gpu3 = resolve_dist(load_config(None, ["dist.use_gpu=true", "dist.zero_stage=3"]).dist)
    assert (gpu3.compile, gpu3.stage3_param_persistence_threshold) == ("none", 10_000_000)
    assert gpu3.stage3_prefetch_bucket_size == 50_000_000 and gpu3.stage3_max_live_parameters == 10**9
    dc = resolve_dist(load_config(None, ["dist.use_gpu=true", "dist.zero_stage=3", "dist.deepcompile=true"]).dist)
    assert dc.compile == "model"
    # an explicit value always wins over the device default
    mine = resolve_dist(load_config(None, ["dist.use_gpu=true", "dist.compile=layers", "dist.overlap_comm=false"]).dist)
    assert (mine.compile, mine.overlap_comm) == ("layers", False)


def test_engine_config_carries_the_switches():
    over = ["dist.reduce_bucket_size=1000", "dist.allgather_bucket_size=2000", "dist.contiguous_gradients=false"]
    z2 = deepspeed_config(load_config(None, over), world_size=2)["zero_optimization"]
    assert z2 == {"stage": 2, "contiguous_gradients": False, "overlap_comm": False, "reduce_bucket_size": 1000,
                  "allgather_bucket_size": 2000}
    z3 = deepspeed_config(load_config(None, over + [
        "dist.zero_stage=3", "dist.use_gpu=true", "dist.stage3_param_persistence_threshold=7",
        "dist.stage3_prefetch_bucket_size=8", "dist.stage3_max_live_parameters=9",
        "dist.stage3_memory_efficient_linear=false"]), world_size=2)["zero_optimization"]
    assert "allgather_bucket_size" not in z3
    assert (z3["stage3_param_persistence_threshold"], z3["stage3_prefetch_bucket_size"],
            z3["stage3_max_live_parameters"], z3["memory_efficient_linear"], z3["overlap_comm"]) == (7, 8, 9, False, True)
    z0 = deepspeed_config(load_config(None, ["dist.zero_stage=0"]), 1)
    assert z0["zero_optimization"] == {"stage": 0, "contiguous_gradients": True} and "compile" not in z0
    dc = deepspeed_config(load_config(None, ["dist.deepcompile=true"]), 1)
    assert dc["compile"] == {"deepcompile": True}


@pytest.mark.parametrize("overrides, needle", [
    (["dist.reduce_bucket_size=0"], "dist.reduce_bucket_size: must be > 0"),
    (["dist.allgather_bucket_size=-5"], "dist.allgather_bucket_size: must be > 0"),
    (["dist.reduce_bucket_size=5e8"], "dist.reduce_bucket_size: expected an integer"),
    (["dist.stage3_param_persistence_threshold=-1"], "dist.stage3_param_persistence_threshold: must be >= 0"),
    (["dist.compile=fast"], "dist.compile: 'fast' is not allowed"),
    (["dist.overlap_comm=sometimes"], "dist.overlap_comm"),
    (["dist.deepcompile=true", "dist.compile=decoder"], "dist.deepcompile: needs the whole model compiled"),
    (["dist.deepcompile=true", "dist.zero_stage=0"], "dist.deepcompile: works with ZeRO stages 1-3"),
    (["loss.lm_ce_chunk=-1"], "loss.lm_ce_chunk: must be >= 0"),
])
def test_bad_switches_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize("stage, negatives", [(2, "sampled"), (3, "all")])
def test_engine_step_checkpoint_and_reload(items, cache_dir, tmp_path, stage, negatives):
    """Weights and DeepSpeed checkpoints keep their keys (prompt ids are not persistent
    buffers); a reloaded engine gives the same loss; the sampler state round-trips. The full
    softmax runs under ZeRO-3, where the item table's weights are partitioned; the backbone and
    the parts KARMA adds keep their own learning rates under DeepSpeed's optimizer wrapper."""
    pytest.importorskip("deepspeed")
    from karma.data import collate
    from karma.factory import build_model
    from karma.batch import prepare_batch
    from karma.step import NegativeSampler, karma_losses
    from karma.train.engine import gather_targets, make_engine, single_process_group

    cfg = tiny_cfg(cache_dir, f"dist.zero_stage={stage}", "dist.precision=fp32", "train.batch_size=4",
                   f"loss.negatives={negatives}", "train.new_lr_scale=10",
                   "model.text_channel=true")  # its pointer's parameters partition and restore too
    rows = {"user_id": [0, 1, 2, 3], "history": [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]],
            "target": [3, 5, 9, 12], "query": [""] * 4, "shown": [[]] * 4}

    def build():
        torch.manual_seed(0)
        model, tok = build_model(cfg, items, log=None)
        engine, _, _ = make_engine(model, cfg, 1, 10)
        return engine, prepare_batch(collate(rows, 10), engine.module, tok, engine.device)

    linear = torch.nn.functional.linear
    with single_process_group("cpu"):
        engine, batch = build()
        assert not any("prompt_ids" in k for k in engine.module.state_dict())
        lrs = sorted({g["lr"] for g in engine.optimizer.param_groups})
        assert len(lrs) == 2 and lrs[1] == pytest.approx(10 * lrs[0])
        sampler = NegativeSampler(np.ones(30), 8, seed=0, device=engine.device)
        loss, _ = karma_losses(engine.module, batch, cfg.loss, sampler, gather=gather_targets)
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(str(tmp_path), tag="t")
        state = sampler.state_dict()
        with torch.no_grad():
            after = karma_losses(engine.module, batch, cfg.loss, sampler, gather=gather_targets)[0]

        fresh, batch2 = build()
        fresh.load_checkpoint(str(tmp_path), tag="t")
        sampler2 = NegativeSampler(np.ones(30), 8, seed=5, device=fresh.device)
        sampler2.load_state_dict(state)
        with torch.no_grad():
            again = karma_losses(fresh.module, batch2, cfg.loss, sampler2, gather=gather_targets)[0]
        torch.testing.assert_close(again, after)
        for e in (engine, fresh):
            if hasattr(e, "destroy"):
                e.destroy()
    assert not torch.distributed.is_initialized()
    # ZeRO-3 patches F.linear process-wide: later bf16 work here would not match a fresh process
    assert torch.nn.functional.linear is linear


def test_dist_defaults_unchanged_for_existing_configs():
    """The shipped configs keep loading and default everything new to "auto"/None."""
    d = load_config(None).dist
    assert d.compile == "auto" and d.overlap_comm is None and d.stage3_param_persistence_threshold is None
    fields = {f.name for f in dataclasses.fields(d)}
    assert {"reduce_bucket_size", "allgather_bucket_size", "contiguous_gradients", "deepcompile"} <= fields


def test_ce_chunk_default_per_device():
    from karma.step import ce_chunk

    loss = load_config(None).loss
    assert loss.lm_ce_chunk is None
    assert ce_chunk(loss, torch.device("cpu")) == 0 and ce_chunk(loss, torch.device("cuda")) == 1024
    assert ce_chunk(load_config(None, ["loss.lm_ce_chunk=64"]).loss, torch.device("cpu")) == 64
