"""Report a finished sweep: per arm, mean ± std over seeds of HR@K, NDCG@K, sink rate and
semantic fidelity, as a Markdown table and a PNG, both logged on the sweep's MLflow run.

    python jobs/report.py --sweep ablation [--config PATH] [section.key=value ...]
    python jobs/report.py --sweep runs/tune/ablation

A name is looked up under <dist.storage_path>/tune/ (give the same --config and storage
override as the sweep); a folder is used as is. Arms are the space's `arms`, or else each
distinct setting of the swept params (seeds pooled).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (puts platform/ on the path)

from karma.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep name (under <storage>/tune/) or its folder")
    parser.add_argument("--config", help="the config the sweep ran with (for dist.storage_path)")
    parser.add_argument("--out", help="folder for the .md and .png (default: <sweep folder>/report)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. dist.storage_path=/data/runs")
    args = parser.parse_args(argv)
    try:
        from karma.tune import MANIFEST, experiment_path, report_sweep

        path = Path(args.sweep)
        if not (path / MANIFEST).is_file() and "/" not in args.sweep:
            path = experiment_path(load_config(args.config, args.overrides), args.sweep)
        report = report_sweep(path, args.out)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"plot: {report.png}  (logged on MLflow run {report.parent_run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
