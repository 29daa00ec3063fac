"""A Ray Tune sweep over the training job: each trial is a full training run.

    python jobs/tune.py --space tune_spaces/loss_weights.yaml [--config PATH] [section.key=value ...]
    python jobs/tune.py --space tune_spaces/ablation.yaml --config configs/tiny.yaml --resume
    ray job submit --working-dir . -- python jobs/tune.py --space tune_spaces/loss_weights.yaml ...

Overrides apply to every trial, after the space's own `overrides`. One MLflow parent run per
sweep, a child run per trial; at the end the best trial's model version takes the space's
champion alias (default "champion") only if it beats the current holder. An interrupted sweep
(Ctrl+C, a lost driver) continues with --resume and the same arguments; finished trials are
not run again. Trial values are sampled with the config's train.seed: the same space, config and
seed draw the same trials (set train.seed to draw others). See tune_spaces/README.md for the
space format.
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401  (puts platform/ on the path)

from karma.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/loss_weights.yaml")
    parser.add_argument("--config", help="base training config (default: the built-in embedded default)")
    parser.add_argument("--name", help="sweep name (default: the space's name); names folders and runs")
    parser.add_argument("--seeds", help="comma-separated seeds replacing the space's, e.g. 1,2: part of a grid "
                        "as its own sweep (give it its own --name)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this name")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every trial, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    try:
        from karma.tune import load_space, parse_seeds, run_sweep, sweep_config

        space = load_space(args.space, args.name, parse_seeds(args.seeds) if args.seeds else None)
        cfg = sweep_config(args.config, args.overrides, space)
        result = run_sweep(space, cfg, resume=args.resume)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    summary = {
        "sweep": result.name, "path": str(result.path), "mlflow_parent_run_id": result.parent_run_id,
        "interrupted": result.interrupted,
        "trials": [{"trial_id": t.trial_id, "status": t.status, "params": t.params,
                    space.metric: t.metrics.get(space.metric), "model_version": t.model_version,
                    "error": t.error} for t in result.trials],
        "best_trial": result.best.trial_id if result.best else None,
        "champion": result.promotion,
    }
    print(json.dumps(summary, indent=2, default=str))
    if result.interrupted:
        print("sweep interrupted: rerun with the same arguments and --resume", file=sys.stderr)
        return 130
    return 1 if result.trials and len(result.errored) == len(result.trials) else 0


if __name__ == "__main__":
    sys.exit(main())
