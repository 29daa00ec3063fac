"""Train with the plain single-process loop (no Ray, no DeepSpeed) and print HR@10 before/after.

    python jobs/train_plain.py [--config configs/tiny.yaml] [--out result.json] [--heatmap attn.png]
                               [section.key=value ...]

The JSON holds validation and test metrics (with their long-tail breakdown, `tail/...`) and,
when train.analysis_examples > 0, the semantic analyses of the test split (`analyses`).
Exit code 2: a config or data error, named with its fix; 3: the training loss became NaN or inf.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (puts platform/ on the path)

from karma.config import Config, ConfigError, load_config  # noqa: E402
from karma.data import DataError  # noqa: E402
from karma.train.loop import NonFiniteLoss  # noqa: E402
from karma.train.plain import train_plain  # noqa: E402

SUMMARY_KEYS = ("popularity", "before", "epochs", "after", "best_epoch", "best", "test", "analyses", "steps", "seconds")


def write_heatmap(result: dict, cfg: Config, path: str) -> dict:
    """The interest token's attention for the test user with the longest history, as a PNG."""
    from karma.evaluate import interest_attention, longest_history
    from karma.plots import attention_heatmap

    test = result["prepared"].split.test
    row = longest_history(test)
    attn, rows, keys = interest_attention(result["model"], test.iloc[[row]], result["tokenizer"],
                                          cfg.data.max_history, next(result["model"].parameters()).device)
    user = int(test["user_id"].iloc[row])
    title = (f"INT_1 attention, test user {user} (w_gen={cfg.loss.w_gen:g}, w_rec={cfg.loss.w_rec:g}, "
             f"seed {cfg.train.seed})")
    attention_heatmap(attn, rows, keys, title, path=path, row_title="layer, head")
    return {"path": path, "user_id": user, "positions": len(keys)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
    parser.add_argument("--out", help="write the result metrics as JSON here")
    parser.add_argument("--heatmap", help="write the interest token's attention map of one fixed test user "
                                          "(the longest history) as PNG here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train_plain(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"training diverged: {err}", file=sys.stderr)
        return 3
    summary = {"command": "python " + " ".join(sys.argv), **{k: result[k] for k in SUMMARY_KEYS if k in result}}
    if args.heatmap:
        summary["heatmap"] = write_heatmap(result, cfg, args.heatmap)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
