"""Report a finished sweep (tables and a plot, logged to MLflow); installed as `karma-report`.

    python jobs/report.py --sweep ablation [--config PATH] [section.key=value ...]

Options: `--help` (karma.cli.REPORT_HELP).
"""

import sys

import _bootstrap  # noqa: F401  (a source checkout: puts platform/ on the path if karma is not installed)

from karma.cli import report as main  # noqa: E402  (also installed as `karma-report`)

if __name__ == "__main__":
    sys.exit(main())
