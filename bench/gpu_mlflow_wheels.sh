#!/usr/bin/env bash
# Build the MLflow wheelhouse (.gpu-m) that bench/gpu_install.sh installs on an offline GPU host
# (Python 3.12, x86-64; the host already has numpy, pandas, pyarrow, requests, protobuf, pyyaml,
# click, jinja2 and the other packages torch and transformers bring). Besides MLflow's tracking
# client and sqlite store this carries `gguf`, which transformers needs to read the SmolLM2 GGUF.
# Usage, on a machine with a package index, from the project root:  bash bench/gpu_mlflow_wheels.sh [.gpu-m]
set -euo pipefail
dest=${1:-.gpu-m}
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
    mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1 mako cachetools databricks-sdk \
    fastapi starlette uvicorn gitpython gitdb smmap importlib-metadata opentelemetry-api opentelemetry-proto \
    opentelemetry-sdk opentelemetry-semantic-conventions python-dotenv sqlparse google-auth pyasn1 pyasn1-modules \
    cryptography cffi pycparser gguf==0.19.0
du -sh "$dest"
