"""The plain run (one process, no Ray or DeepSpeed); installed as `karma-train-plain`.

    python jobs/train_plain.py [--config configs/tiny.yaml] [--out result.json] [--heatmap attn.png]
                               [section.key=value ...]

Options and what the JSON holds: `--help` (karma.cli.TRAIN_PLAIN_HELP).
"""

import sys

import _bootstrap  # noqa: F401  (a source checkout: puts platform/ on the path if karma is not installed)

from karma.cli import train_plain as main  # noqa: E402  (also installed as `karma-train-plain`)

if __name__ == "__main__":
    sys.exit(main())
