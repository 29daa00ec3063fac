"""A Ray Tune sweep over the training job; installed as `karma-tune`.

    python jobs/tune.py --space tune_spaces/loss_weights.yaml [--config PATH] [--resume] [section.key=value ...]

Options, resume and seeding: `--help` (karma.cli.TUNE_HELP).
"""

import sys

import _bootstrap  # noqa: F401  (a source checkout: puts platform/ on the path if karma is not installed)

from karma.cli import tune as main  # noqa: E402  (also installed as `karma-tune`)

if __name__ == "__main__":
    sys.exit(main())
