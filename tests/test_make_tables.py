"""bench/make_tables.py renders BENCHMARKS.md from the committed JSON: every file gets a row."""

import json

from conftest import ROOT, load_script


def _module():
    return load_script("bench/make_tables.py")


def test_every_committed_result_has_a_row(tmp_path):
    mt = _module()
    out = tmp_path / "BENCHMARKS.md"
    assert mt.main(["--out", str(out)]) == 0
    text = out.read_text()
    files = sorted((ROOT / "bench" / "results").rglob("*.json"))
    assert files
    for path in files:
        rel = str(path.relative_to(ROOT))
        rows = [line for line in text.splitlines() if line.startswith(f"| `{rel}` |")]
        assert rows, f"no row for {rel}"
        assert all(line.split(" | ")[1].strip() for line in rows)  # a device cell, never empty
    assert mt.main(["--out", str(out), "--check"]) == 0  # deterministic: a second render is identical


def test_kinds_and_rows_of_new_format_files(tmp_path):
    """A result written by today's benchmarks (variants, config records, errors) renders too."""
    mt = _module()
    res = tmp_path / "results"
    res.mkdir()
    row = {"kind": "deepspeed", "config": {"zero_stage": 3, "compiled": "none"}, "step_s_median": 0.5,
           "tokens_per_s": 1000.0, "mfu": 0.1, "peak_memory_gib": 2.0, "host_syncs": {"count": 4, "where": []}}
    (res / "train_throughput_cuda_x.json").write_text(json.dumps({
        "device": "cuda", "device_name": "NVIDIA H100", "settings": {"backbone_shape": "qwen0.5b", "batch": 128},
        "modes": {"zero3": row, "broken": {"kind": "deepspeed", "error": "RuntimeError: boom\nmore"}},
        "ratios": {"zero3_over_deepspeed": 0.9}}))
    (res / "retrieval_cuda_v.json").write_text(json.dumps({
        "device": "cuda", "device_name": "NVIDIA H100", "n_items": 10, "dim": 4, "k": 2, "batch": 8,
        "results": {"b4096": {"dtype": "float16", "batch": 4096, "chunk_size": 262144, "block": 4096, "qps": 1e5}}}))
    (res / "mystery.json").write_text(json.dumps({"a": 1}))
    text = mt.render(res)
    assert "| zero3 | 3 | none | 500.0 | 1,000 | 10.0% | 2.00 | 4 |" in text
    assert "error: RuntimeError: boom" in text
    assert "| b4096 | float16 | 4,096 | 262,144 | 4,096 | 100,000 |" in text
    assert "mystery.json" in text and "| not recorded |" in text


def test_ablation_sweep_rows_average_completed_seeds_of_the_test_split(tmp_path):
    mt = _module()
    res = tmp_path / "results"
    res.mkdir()

    def trial(arm, seed, hr, complete=True):
        metrics = {"HR@10": 0.9, "test/HR@10": hr, "test/NDCG@10": hr / 2} if complete else {}
        return {"arm": arm, "seed": seed, "complete": complete, "metrics": metrics}

    (res / "ablation_x.json").write_text(json.dumps({
        "device": "NVIDIA H100", "config": {"train": {"epochs": 1}},
        "space": {"arms": {"action-only": {}, "KARMA": {}}, "seeds": [0, 1, 2]},
        "trials": [trial("action-only", 0, 0.1), trial("action-only", 1, 0.3), trial("KARMA", 0, 0.2),
                   trial("KARMA", 1, 0.0, complete=False)]}))
    text = mt.render(res)
    # valid HR@10 (0.9) is never shown; the pending trial is not averaged in
    assert "| 1 | action-only | 2 of 3 | 0.2000 ± 0.1414 | 0.1000 ± 0.0707 | - | - |" in text
    assert "| 1 | KARMA | 1 of 3 | 0.2000 ± 0.0000 | 0.1000 ± 0.0000 | - | - |" in text


def test_eval_memory_rows_name_the_code_and_the_skipped_sizes(tmp_path):
    mt = _module()
    res = tmp_path / "results"
    res.mkdir()
    run = {"users": 2500, "seconds": 1.5, "users_per_s": 1666.7, "peak_rss_mib": 300.0, "inputs_rss_mib": 250.0,
           "peak_over_inputs_mib": 50.0, "user_chunk": 1024, "load_avg_1m_before": 2.0}
    (res / "eval_memory_cpu.json").write_text(json.dumps({
        "settings": {"items": 65536, "dim": 64, "chunk_size": 65536}, "runs": [run], "host": {"cpus": 2},
        "skipped": [{"users": 1000000, "why": "too slow"}], "provenance": {"git_commit": "abcdef123", "git_dirty": False}}))
    (res / "eval_memory_cpu_before.json").write_text(json.dumps({
        "settings": {"items": 65536, "dim": 64, "chunk_size": 65536}, "runs": [{**run, "user_chunk": "all"}],
        "host": {"cpus": 2}, "code": {"path": "/x/karma", "git_commit": "0123456789", "git_dirty": True},
        "provenance": {"git_commit": "abcdef123", "git_dirty": False}}))
    text = mt.render(res)
    assert ("| `" + str(res / "eval_memory_cpu.json") + "` | cpu (2 cores) | abcdef1 | 65,536 x 64 | 1,024 | 65,536 | "
            "2,500 | 1.5 | 1,667 | 300 | 250 | 50 | 2.0 |") in text
    assert "| 0123456 (dirty) | 65,536 x 64 | all |" in text  # the other copy's commit, not the writer's
    assert "1,000,000 users skipped: too slow" in text
