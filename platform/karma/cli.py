"""The command-line jobs: `karma-train` (the Ray job), `karma-train-plain` (the plain run),
`karma-tune` (a Ray Tune sweep), `karma-report` (a sweep's report) and `karma-recall` (offline
batch recall), installed as console scripts by pyproject.toml. `jobs/*.py` run the same functions
from a source checkout (e.g. under `ray job submit --working-dir .`, where the package may not be
installed on the nodes).
Exit codes: 0 done, 2 a config or data error named with its fix, 3 the training loss became
NaN or inf, 130 an interrupted sweep or batch recall."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from karma.config import Config, ConfigError, load_config
from karma.data import DataError
from karma.provenance import provenance, with_provenance
from karma.train import NonFiniteLoss

# what the plain run's JSON keeps of its result
SUMMARY_KEYS = ("popularity", "before", "epochs", "after", "best_epoch", "best", "test", "test_served", "analyses", "steps",
                "seconds")

TRAIN_HELP = """The KARMA training job: Ray Train + DeepSpeed ZeRO + MLflow (each worker reads its slice of a fresh per-epoch shuffle).

    python jobs/train.py [--config PATH] [section.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/qwen0.5b-gpu.yaml

With no arguments: local Ray, CPU workers, the synthetic data set, MLflow in a sqlite file
under runs/. Honours RAY_ADDRESS and MLFLOW_TRACKING_URI. Rerunning with the same
tracking.run_name resumes that run (only train.epochs / train.max_steps may grow).
Exit code 2: a config or data error, named with its fix. Exit code 3: the training loss became
NaN or inf (the run stops at that step; its last good checkpoint stays).
"""


def train(argv: list[str] | None = None) -> int:
    """`karma-train`: see TRAIN_HELP."""
    parser = argparse.ArgumentParser(description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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


TRAIN_PLAIN_HELP = """Train with the plain single-process loop (no Ray, no DeepSpeed) and print HR@10 before/after.

    python jobs/train_plain.py [--config configs/tiny.yaml] [--out result.json] [--heatmap attn.png]
                               [section.key=value ...]

The JSON holds validation and test metrics (with their long-tail breakdown, `tail/...`), the test
split ranked without each user's history as the Serve endpoint returns it (`test_served`) and,
when train.analysis_examples > 0, the semantic analyses of the test split (`analyses`).
Exit code 2: a config or data error, named with its fix; 3: the training loss became NaN or inf.
"""


def write_heatmap(result: dict, cfg: Config, path: str) -> dict:
    """The interest token's attention for the test user with the longest history, as a PNG."""
    from karma.evaluate import interest_attention, longest_history
    from karma.plots import attention_heatmap

    test = result["prepared"].split.test
    row = longest_history(test)
    attn, rows, keys = interest_attention(result["model"], test.take([row]), result["tokenizer"],
                                          cfg.data.max_history, next(result["model"].parameters()).device)
    user = int(test.user_ids[row])
    title = (f"INT_1 attention, test user {user} (w_gen={cfg.loss.w_gen:g}, w_rec={cfg.loss.w_rec:g}, "
             f"seed {cfg.train.seed})")
    attention_heatmap(attn, rows, keys, title, path=path, row_title="layer, head")
    return {"path": path, "user_id": user, "positions": len(keys)}


def train_plain(argv: list[str] | None = None) -> int:
    """`karma-train-plain`: see TRAIN_PLAIN_HELP."""
    parser = argparse.ArgumentParser(description=TRAIN_PLAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
    parser.add_argument("--out", help="write the result metrics as JSON here")
    parser.add_argument("--heatmap", help="write the interest token's attention map of one fixed test user "
                                          "(the longest history) as PNG here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    for path in filter(None, (args.out, args.heatmap)):  # before training: a long run must not end unwritable
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        from karma.train.plain import train_plain as run_plain

        cfg = load_config(args.config, args.overrides)
        command = "python " + " ".join(sys.argv)
        prov = provenance(cfg, command)  # before training: the commit and data that this run read
        result = run_plain(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"training diverged: {err}", file=sys.stderr)
        return 3
    summary = {"command": command, **{k: result[k] for k in SUMMARY_KEYS if k in result}}
    if args.heatmap:
        summary["heatmap"] = write_heatmap(result, cfg, args.heatmap)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(with_provenance(summary, prov), indent=2))
    return 0


TUNE_HELP = """A Ray Tune sweep over the training job: each trial is a full training run.

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


def tune(argv: list[str] | None = None) -> int:
    """`karma-tune`: see TUNE_HELP."""
    parser = argparse.ArgumentParser(description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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


REPORT_HELP = """Report a finished sweep: per arm, mean ± std over seeds of HR@K, NDCG@K, sink rate and
semantic fidelity, as a Markdown table and a PNG, both logged on the sweep's MLflow run.

    python jobs/report.py --sweep ablation [--config PATH] [section.key=value ...]
    python jobs/report.py --sweep runs/tune/ablation

A name is looked up under <dist.storage_path>/tune/ (give the same --config and storage
override as the sweep); a folder is used as is. Arms are the space's `arms`, or else each
distinct setting of the swept params (seeds pooled).
"""


def report(argv: list[str] | None = None) -> int:
    """`karma-report`: see REPORT_HELP."""
    parser = argparse.ArgumentParser(description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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


RECALL_HELP = """Offline batch recall: the top-K items of every user in a Parquet of histories, scored by a
registered model on a Ray Data actor pool, as Serve's /v1/recall answers them.

    karma-recall --input users/ --output recall/ --model karma --alias champion --k 100
    python jobs/recall.py --input users.parquet --output recall/ --model karma --version 3
    ray job submit --working-dir . -- python jobs/recall.py --input /data/users --output /data/recall ...

Input: a Parquet file or a folder of them with user_id (int64), history (list<int64> of item ids,
oldest first) and optionally query (string). Output: one file per input file, of the same name,
with user_id, item_ids (list<int64>, best first) and scores (list<float32>); the history's items
are left out unless --include-history. Rows that cannot be scored (null user_id or history,
empty history, unknown item ids, a user_id on several rows) stop the job before anything is
scored, naming the file, the count and examples; --skip-invalid scores the other rows and writes
those to OUTPUT/rejected/ with their reason. A rerun skips inputs whose output is complete.
Honours RAY_ADDRESS and MLFLOW_TRACKING_URI.
Exit codes: 0 done, 2 a data or settings error named with its fix, 130 interrupted (complete
output files are kept: rerun the same command to finish).
"""


def recall(argv: list[str] | None = None) -> int:
    """`karma-recall`: see RECALL_HELP."""
    parser = argparse.ArgumentParser(description=RECALL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a Parquet file of user histories, or a folder of them")
    parser.add_argument("--output", required=True, help="folder for the results (one file per input file)")
    parser.add_argument("--model", required=True, help="registered model name")
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--alias", help="registry alias (default: champion)")
    ref.add_argument("--version", help="registry version number")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    parser.add_argument("--k", type=int, default=100, help="items per user (default 100)")
    parser.add_argument("--include-history", action="store_true", help="do not leave the history's items out")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="score the valid rows and write the others to OUTPUT/rejected/ with their reason")
    parser.add_argument("--batch-size", type=int, default=256, help="users per model call (default 256)")
    parser.add_argument("--actors", type=int, help="actor pool size (default: one per GPU, else one per CPU slot "
                                                   "left after one for the readers)")
    parser.add_argument("--cpus-per-actor", type=float, help="default: --torch-threads (1 with GPUs)")
    parser.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch and faiss threads per actor (default 1)")
    parser.add_argument("--index", choices=("flat", "ivf"), default="flat", help="faiss index kind (default flat)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default: the export's)")
    args = parser.parse_args(argv)
    try:
        from karma.recall import RecallSettings, run_recall
        from karma.serving import ModelNotFoundError, ModelSpec

        try:
            spec = ModelSpec(registered_name=args.model, alias=args.alias, version=args.version,
                             tracking_uri=args.tracking_uri, dtype=args.dtype, index=args.index)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        settings = RecallSettings(args.input, args.output, spec, k=args.k, exclude_history=not args.include_history,
                                  skip_invalid=args.skip_invalid, batch_size=args.batch_size, actors=args.actors,
                                  cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                                  torch_threads=args.torch_threads)
        result = run_recall(settings)
    except (ConfigError, ModelNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recall interrupted: complete output files are kept; rerun the same command to finish", file=sys.stderr)
        return 130
    print(json.dumps(result.summary(), indent=2))
    return 0
