#!/usr/bin/env bash
# Second call, after bench/gpu.sh: which DeepSpeed and compile switches move ZeRO-2 and ZeRO-3
# on one GPU (same shape as gpu.sh; one process, one JSON under $OUT, default bench/results).
# Rows in order of interest; a row that fails (DeepCompile builds a native op) is recorded with
# its error and the rest still run. About 8 minutes; the JSON is rewritten after every row.
#   bash bench/gpu_zero.sh
set -uo pipefail
out=${OUT:-bench/results}
source bench/gpu_install.sh
shape=(--backbone-shape qwen0.5b --batch 128 --history 50 --text-tokens 32 --steps 10 --warmup 3)
echo "== ZeRO and compile switches"
timeout 540 python bench/train_throughput.py "${shape[@]}" --modes deepspeed --zero 2 \
    --variant z3_deepcompile deepspeed dist.zero_stage=3 dist.deepcompile=true \
    --variant z3_layers deepspeed dist.zero_stage=3 dist.compile=layers \
    --variant z3_plain_linear deepspeed dist.zero_stage=3 dist.stage3_memory_efficient_linear=false \
    --variant z3_persist_1e5 deepspeed dist.zero_stage=3 dist.stage3_param_persistence_threshold=100000 \
    --variant z2_model deepspeed dist.compile=model \
    --variant z2_layers deepspeed dist.compile=layers \
    --variant z2_no_overlap deepspeed dist.overlap_comm=false \
    --variant z2_deepcompile deepspeed dist.deepcompile=true \
    --variant z2_ce_unchunked deepspeed loss.lm_ce_chunk=0 \
    --out "$out/train_throughput_cuda_zero_sweep.json" > "$out/zero_sweep.log" 2>&1
echo "exit $?"; tail -16 "$out/zero_sweep.log"
