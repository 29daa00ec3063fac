#!/usr/bin/env bash
# Sourced by the bench/gpu*.sh scripts on an offline GPU host prepared as ../shared/gpu/README.md
# says: installs the Ray/DeepSpeed wheelhouse (.gpu) into /tmp/site once per host, plus the MLflow
# wheelhouse (.gpu-m from bench/gpu_mlflow_wheels.sh, what jobs/tune.py and jobs/report.py need)
# when it is there, and sets the environment every run there needs. Logs to $out/gpu_install.log.
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD/platform TORCH_CUDA_ARCH_LIST=9.0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
if ! python3 -c "import ray, deepspeed" 2>/dev/null; then
  bash .gpu/bin/install.sh .gpu > "$out/gpu_install.log" 2>&1 || { tail -20 "$out/gpu_install.log"; exit 1; }
fi
if [ -d .gpu-m ] && ! python3 -c "import mlflow" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu-m/*.whl \
    >> "$out/gpu_install.log" 2>&1 || { tail -20 "$out/gpu_install.log"; exit 1; }
  # MLflow's sqlite store end to end: what every sweep and training job does first
  python3 - <<'PY' || exit 1
import tempfile, mlflow
from mlflow import MlflowClient
c = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
run = c.create_run(c.create_experiment("smoke"))
c.log_metric(run.info.run_id, "x", 1.0)
print("mlflow", mlflow.__version__, "sqlite store ok")
PY
fi
