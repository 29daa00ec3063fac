"""Offline batch recall of every user in a Parquet of histories (Ray Data); installed as `karma-recall`.

    python jobs/recall.py --input users/ --output recall/ --model karma --alias champion
    ray job submit --working-dir . -- python jobs/recall.py --input /data/users --output /data/recall ...

Options, defaults and exit codes: `--help` (karma.cli.RECALL_HELP).
"""

import sys

import _bootstrap  # noqa: F401  (a source checkout: puts platform/ on the path if karma is not installed)

from karma.cli import recall as main  # noqa: E402  (also installed as `karma-recall`)

if __name__ == "__main__":
    sys.exit(main())
