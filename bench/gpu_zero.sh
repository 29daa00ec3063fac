#!/usr/bin/env bash
# ZeRO-stage comparison on one GPU (same shape as bench/gpu.sh): ZeRO-3 and ZeRO-0, compiled.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
bash .gpu/bin/install.sh .gpu > "$out/gpu_install.log" 2>&1 || { tail -20 "$out/gpu_install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/platform TORCH_CUDA_ARCH_LIST=9.0 RAY_AUTH_MODE=disabled
shape=(--backbone-shape qwen0.5b --batch 128 --history 50 --text-tokens 32 --steps 10 --warmup 3)
run() { local name=$1; shift; echo "== $name"; timeout 150 python bench/train_throughput.py "${shape[@]}" "$@" \
        --out "$out/train_throughput_cuda_$name.json" > "$out/$name.log" 2>&1; echo "exit $?"; tail -6 "$out/$name.log"; }
run zero3 --modes deepspeed --zero 3 --compile
run zero0_compiled --modes deepspeed --zero 0 --compile
