"""The training-throughput benchmark runs end to end on a microscopic shape (no timing claims)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
MICRO = ["--backbone-shape", "custom", "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
         "--intermediate", "32", "--vocab", "64", "--batch", "4", "--history", "3", "--text-tokens", "4",
         "--items", "50", "--negatives", "8", "--embed-dim", "8", "--rec-soft-tokens", "2",
         "--steps", "2", "--warmup", "1", "--device", "cpu", "--strict"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_and_deepspeed_report_positive_numbers(bench, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "tt.json"
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    res = bench.run([*MICRO, "--modes", "plain,deepspeed", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for key in ("command", "device", "device_name", "versions", "settings", "flops", "ratios", "modes"):
        assert key in res
    assert res["device"] == "cpu" and res["peak_flops"] is None
    for v in ("torch", "deepspeed", "transformers"):
        assert res["versions"][v]
    main, rec = bench.seq_lengths(res["settings"])
    assert res["flops"]["tokens_per_step"] == 4 * main + 4 * rec
    for mode in ("plain", "deepspeed"):
        m = res["modes"][mode]
        assert "error" not in m, m.get("error")
        for key in ("step_s_median", "tokens_per_s", "examples_per_s", "peak_memory_gib", "achieved_tflops",
                    "tokens_per_step"):
            assert m[key] > 0, (mode, key)
        assert m["mfu"] is None  # no CPU peak
        assert len(m["step_times_s"]) == 2
        # parts["n_tokens"] (what the step reports) agrees with the analytic count behind MFU
        assert m["tokens_per_step"] == res["flops"]["tokens_per_step"]
    assert res["same_tokens_every_mode"]
    # the same model, batches and negatives: both loops start from the same loss
    assert res["modes"]["plain"]["loss_first"] == pytest.approx(res["modes"]["deepspeed"]["loss_first"], rel=1e-4)
    assert res["ratios"]["deepspeed_over_plain"] > 0 and res["ratios"]["ray_over_deepspeed"] is None
    # the single-process group is gone and the environment is as it was
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_flop_count_formula(bench):
    """6 * block params * tokens + 6 * V * d * labelled tokens + 12 * layers * d * sum(seq^2)."""
    args = bench.parse_args([*MICRO, "--modes", "plain"])
    spec = bench.make_spec(args, "cpu")
    model = bench.build_model(spec, bench.karma_config(spec))
    f = bench.flop_count(spec, model)
    main, rec = bench.seq_lengths(spec)
    assert (main, rec) == (3 + 1 + 3 + 4 - 1, 4 + 2 + 3 + 4 - 1)
    tokens, labelled = 4 * main + 4 * rec, 2 * 4 * 4
    blocks = sum(p.numel() for p in model.backbone.model.layers.parameters()) + 16  # + final norm
    assert f["params_blocks"] == blocks
    attention = 12 * 1 * 16 * (4 * main**2 + 4 * rec**2)
    assert f["flops_per_step"] == 6 * blocks * tokens + 6 * 64 * 16 * labelled + attention
