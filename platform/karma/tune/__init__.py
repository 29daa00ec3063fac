"""Ray Tune sweeps over the training job: search spaces as data, one trial = one full training
run through `run_training`, MLflow parent/child runs, champion promotion, ablation reports.

    space.py   the space file: parsing, checks against the config, trials it expands to, sampling
    run.py     run_sweep: trials, the manifest, summaries, the best trial and the champion
    report.py  the ablation report: per-arm tables and plot of a finished sweep

Layout of a sweep named NAME under `dist.storage_path` (ROOT):

    ROOT/tune/NAME/            Tune's experiment (resumable with Tuner.restore)
    ROOT/tune/NAME/karma_sweep.json   the space, the resolved config and the parent run id
    ROOT/NAME-<trial_id>/      each trial's data and final checkpoint (run_training's run_root)
    ROOT/ray/NAME-<trial_id>/  each trial's Ray Train run (resumes by name)

Trial names carry no timestamps: a resumed sweep finds each unfinished trial's Train
checkpoints and MLflow run again by name. Trial configs are sampled with the sweep config's
`train.seed`, so the same space, config and seed draw the same trials.
"""

from .report import (REPORT_METRICS, TEST_PREFIX, SweepReport, arm_label, arms_table, markdown_table, report_split,
                     report_sweep)
from .run import (MANIFEST, TRIAL_DRIVER_MEMORY, SweepResult, TrialSummary, concurrency, experiment_path, pick_best,
                  read_manifest, run_sweep, run_trial, summarize, trial_run_name)
from .space import (ARM, DISTRIBUTIONS, KNOWN_METRICS, RESERVED_PARAMS, SCHEDULER_KEYS, SPACE_KEYS, Space, SpaceError,
                    ZeroOrLogUniform, check_metric, check_space, expected_trials, load_space, param_space, parse_seeds,
                    parse_space, search_algorithm, sweep_config, trial_values)

__all__ = [
    "ARM", "DISTRIBUTIONS", "KNOWN_METRICS", "RESERVED_PARAMS", "SCHEDULER_KEYS", "SPACE_KEYS", "Space", "SpaceError",
    "ZeroOrLogUniform", "check_metric", "check_space", "expected_trials", "load_space", "param_space", "parse_seeds",
    "parse_space", "search_algorithm", "sweep_config", "trial_values",
    "MANIFEST", "TRIAL_DRIVER_MEMORY", "SweepResult", "TrialSummary", "concurrency", "experiment_path", "pick_best",
    "read_manifest", "run_sweep", "run_trial", "summarize", "trial_run_name",
    "REPORT_METRICS", "TEST_PREFIX", "SweepReport", "arm_label", "arms_table", "markdown_table", "report_split",
    "report_sweep",
]
