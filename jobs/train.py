"""The KARMA training job (Ray Train + DeepSpeed ZeRO + MLflow); installed as `karma-train`.

    python jobs/train.py [--config PATH] [section.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/qwen0.5b-gpu.yaml

Options, defaults and exit codes: `--help` (karma.cli.TRAIN_HELP).
"""

import sys

import _bootstrap  # noqa: F401  (a source checkout: puts platform/ on the path if karma is not installed)

from karma.cli import train as main  # noqa: E402  (also installed as `karma-train`)

if __name__ == "__main__":
    sys.exit(main())
