"""The KARMA training job: Ray Train + DeepSpeed ZeRO + MLflow (each worker reads its slice of a fresh per-epoch shuffle).

    python jobs/train.py [--config PATH] [section.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/qwen0.5b-gpu.yaml

With no arguments: local Ray, CPU workers, the synthetic data set, MLflow in a sqlite file
under runs/. Honours RAY_ADDRESS and MLFLOW_TRACKING_URI. Rerunning with the same
tracking.run_name resumes that run (only train.epochs / train.max_steps may grow).
Exit code 2: a config or data error, named with its fix. Exit code 3: the training loss became
NaN or inf (the run stops at that step; its last good checkpoint stays).
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401  (puts platform/ on the path)

from karma.config import ConfigError, load_config
from karma.data import DataError
from karma.train.loop import NonFiniteLoss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the built-in embedded default)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4 dist.zero_stage=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from karma.train.ray_job import run_training

        result = run_training(cfg)
    except ConfigError as err:  # also a rerun under a used tracking.run_name with a changed config
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # raised in the Ray data task; the message names the file and the fix
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"training diverged: {err}", file=sys.stderr)
        return 3
    summary = {"metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
               "mlflow_run_id": result.run_id, "model_version": result.model_version,
               "export_dir": str(result.export_dir) if result.export_dir else None, "steps": result.steps}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
