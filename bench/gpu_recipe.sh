#!/usr/bin/env bash
# The recipe with SmolLM2-135M on one H100/H200 (tune_spaces/recipe.yaml: action-only, KARMA,
# text KARMA), one trial on the whole GPU at a time, each trained to convergence (early stopping on
# validation NDCG@10 over all validation users, test metrics of the best epoch). Sized for one GPU
# slot: one seed of the three arms in about 12 minutes (configs/smollm2.yaml caps the epochs);
# run the other seeds as their own parts (SEEDS=1, SEEDS=2) and merge them with
# bench/ablation_smollm2.py table --json A --json B. Same stash and outputs as bench/gpu_ablation.sh.
#   STASH=~/stash SEEDS=0 bash bench/gpu_recipe.sh [section.key=value ...]
set -uo pipefail
export SEEDS=${SEEDS:-0}
export SPACE=tune_spaces/recipe.yaml NAME=${NAME:-recipe-s${SEEDS//,/}} ABLATION_TIMEOUT=${ABLATION_TIMEOUT:-690}
exec bash bench/gpu_ablation.sh dist.gpus_per_worker=1 "$@"
