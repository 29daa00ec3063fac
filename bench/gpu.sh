#!/usr/bin/env bash
# One batch of GPU measurements on an offline GPU host prepared as ../shared/gpu/README.md says
# (Ray/DeepSpeed wheelhouse in .gpu). Results go to $OUT (default bench/results).
#   bash bench/gpu.sh
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
bash .gpu/bin/install.sh .gpu > "$out/gpu_install.log" 2>&1 || { tail -20 "$out/gpu_install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/platform TORCH_CUDA_ARCH_LIST=9.0 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
shape=(--backbone-shape qwen0.5b --batch 128 --history 50 --text-tokens 32 --steps 10 --warmup 3)
run() { local name=$1; shift; echo "== $name"; timeout 240 python bench/train_throughput.py "${shape[@]}" "$@" \
        --out "$out/train_throughput_cuda_$name.json" > "$out/$name.log" 2>&1; echo "exit $?"; tail -12 "$out/$name.log"; }
run zero2 --modes plain,deepspeed,ray --zero 2
run zero3 --modes deepspeed --zero 3
run compiled --modes plain,deepspeed --zero 2 --compile
echo "== retrieval"
timeout 100 python bench/retrieval_eval.py --n-items 1000000 --no-faiss --out "$out/retrieval_cuda_1m_b256.json" 2>&1 | tail -4
# bigger query batches and one chunk over all items: fewer, larger matmuls and top-k passes
timeout 100 python bench/retrieval_eval.py --n-items 1000000 --no-faiss --batch 4096 --chunk-size 1000000 \
    --out "$out/retrieval_cuda_1m_b4096.json" 2>&1 | tail -4
