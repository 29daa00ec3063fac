#!/usr/bin/env bash
# Every measurement the GPU-throughput goals need, in one call on an offline GPU host prepared as
# ../shared/gpu/README.md says (Ray/DeepSpeed wheelhouse in .gpu). JSON and logs go to $OUT
# (default bench/results). About 7 minutes on an H100/H200; each step has its own timeout, and
# the training benchmark rewrites its JSON after every row, so a cut-short run keeps its rows.
#   bash bench/gpu.sh                 # both parts
#   bash bench/gpu.sh retrieval       # one part: train | retrieval
# Rows (the project's training path with its per-device defaults; see bench/NOTES.md):
#   plain      plain PyTorch loop, compiled decoder          -> baseline of "ZeRO-2 >= 1.0x plain"
#   deepspeed  DeepSpeed ZeRO-2, compiled decoder            -> MFU goal (45%), ratio to plain
#   zero3      DeepSpeed ZeRO-3, ZeRO-3 defaults             -> "ZeRO-3 >= 0.8x ZeRO-2"
#   ray        ZeRO-2 inside Ray Train, one GPU worker       -> "Ray >= 0.97x in-process"
# Each row also records its host syncs (torch.cuda sync debug mode) and a 2-step profile.
set -uo pipefail
out=${OUT:-bench/results}
source bench/gpu_install.sh
parts=${*:-train retrieval}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
shape=(--backbone-shape qwen0.5b --batch 128 --history 50 --text-tokens 32 --steps 10 --warmup 3)

if [[ " $parts " == *" train "* ]]; then
echo "== training: plain, deepspeed (ZeRO-2), zero3, ray"
timeout ${TRAIN_TIMEOUT:-420} python bench/train_throughput.py "${shape[@]}" --modes plain,deepspeed --zero 2 --profile-steps 2 \
    --variant zero3 deepspeed dist.zero_stage=3 --variant ray ray \
    --out "$out/train_throughput_cuda_goals.json" > "$out/goals.log" 2>&1
echo "exit $?"; tail -14 "$out/goals.log"
fi

if [[ " $parts " == *" retrieval "* ]]; then
echo "== retrieval: exact top-200 over 1M x 128 fp16 items, 8,192 queries"
timeout 120 python bench/retrieval_eval.py --n-items 1000000 --no-faiss \
    --variant b4096 batch=4096 \
    --variant b4096_block2048 batch=4096 block=2048 \
    --variant b4096_block8192 batch=4096 block=8192 \
    --variant b4096_one_stage_1m batch=4096 block=0 chunk=1000000 \
    --variant b4096_bf16 batch=4096 dtype=bf16 \
    --out "$out/retrieval_cuda_1m_variants.json" 2>&1 | grep "queries/s"
echo "exit ${PIPESTATUS[0]}"
fi
