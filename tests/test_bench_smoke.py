"""The training-throughput benchmark runs end to end on a microscopic shape (no timing claims)."""

import json
import os
from pathlib import Path

import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
MICRO = ["--backbone-shape", "custom", "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
         "--intermediate", "32", "--vocab", "64", "--batch", "4", "--history", "3", "--text-tokens", "4",
         "--items", "50", "--negatives", "8", "--embed-dim", "8", "--rec-soft-tokens", "2",
         "--steps", "2", "--warmup", "1", "--device", "cpu", "--strict"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/train_throughput.py")


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


def test_variants_overrides_goals_and_profile(bench, tmp_path):
    """Extra rows with their own project overrides, in one process and one process group;
    the resolved switches, the goals and a profile summary land in the JSON."""
    pytest.importorskip("deepspeed")
    res = bench.run([*MICRO, "--modes", "plain,deepspeed", "--set", "loss.lm_ce_chunk=3", "--profile-steps", "1",
                     "--variant", "zero3", "deepspeed", "dist.zero_stage=3", "dist.stage3_param_persistence_threshold=0",
                     "--variant", "plain_again", "plain", "--out", str(tmp_path / "v.json")])
    modes = res["modes"]
    assert list(modes) == ["plain", "deepspeed", "zero3", "plain_again"]
    for name, m in modes.items():
        assert "error" not in m, (name, m.get("error"))
        assert m["config"]["lm_ce_chunk"] == 3 and m["config"]["compiled"] == "none"
        assert m["host_syncs"] is None  # a CUDA-only census
        assert m["profile"]["steps"] == 1 and m["profile"]["top"]
    assert modes["zero3"]["kind"] == "deepspeed" and modes["zero3"]["config"]["zero_stage"] == 3
    assert modes["zero3"]["config"]["stage3_param_persistence_threshold"] == 0
    assert modes["zero3"]["loss_first"] == pytest.approx(modes["plain"]["loss_first"], rel=1e-4)
    assert res["ratios"]["zero3_over_deepspeed"] > 0
    goals = res["goals"]
    assert goals["zero3_over_zero2"]["value"] == pytest.approx(res["ratios"]["zero3_over_deepspeed"])
    assert goals["zero2_mfu"]["value"] is None  # no CPU peak
    with pytest.raises(SystemExit, match="unknown row kind"):
        bench.run([*MICRO, "--modes", "plain", "--variant", "x", "fsdp"])


def test_retrieval_bench_variants(tmp_path, monkeypatch):
    import runpy

    out = tmp_path / "r.json"
    monkeypatch.setattr("sys.argv", ["retrieval_eval.py", "--n-items", "3000", "--n-queries", "64", "--k", "20",
                                     "--batch", "32", "--device", "cpu", "--no-faiss", "--out", str(out),
                                     "--variant", "two_stage", "block=256", "chunk=1000",
                                     "--variant", "bf16", "dtype=bf16", "batch=64"])
    runpy.run_path(str(BENCH.parent / "retrieval_eval.py"), run_name="__main__")
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["exact_topk", "two_stage", "bf16"]
    assert res["two_stage"]["same_ids_as_first"] == 1.0 and res["two_stage"]["block"] == 256
    assert res["exact_topk"]["block"] == 0 and res["exact_topk"]["chunk_size"] == 65536  # CPU defaults
    assert res["bf16"]["dtype"] == "bfloat16" and all(r["qps"] > 0 for r in res.values())
