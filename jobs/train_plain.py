"""Train with the plain single-process loop (no Ray, no DeepSpeed) and print HR@10 before/after.

    python jobs/train_plain.py [--config configs/tiny.yaml] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (puts platform/ on the path)

from karma.config import ConfigError, load_config  # noqa: E402
from karma.train.plain import train_plain  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
    parser.add_argument("--out", help="write the result metrics as JSON here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    result = train_plain(cfg)
    summary = {"command": "python " + " ".join(sys.argv),
               **{k: result[k] for k in ("popularity", "before", "after", "best_epoch", "best", "test", "steps", "seconds")
                  if k in result}}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
