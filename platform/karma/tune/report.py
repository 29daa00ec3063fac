"""The ablation report of a finished sweep: per-arm tables of retrieval, long-tail and semantic
metrics (mean ± sample std over seeds), as markdown and a plot, logged on the sweep's parent run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from karma.config import ConfigError, from_dict

from .run import TrialSummary, read_manifest, summarize
from .space import ARM, Space

# Besides HR@K / NDCG@K: MRR, the long-tail breakdown (targets with few training interactions),
# sink rate, read-out collapse, embedding health and fidelity. A metric no trial reported is left out.
TEST_PREFIX = "test/"  # the worker's metrics of the test split, after the last epoch
REPORT_METRICS = ("MRR", "tail/HR@10", "tail/NDCG@10", "tail/MRR", "sink_rate_first", "sink_rate_item", "barcode",
                  "effective_rank", "token_f1", "category_match")


def arm_label(trial: TrialSummary, space: Space) -> str:
    if ARM in trial.params:
        return str(trial.params[ARM])
    parts = []
    for key in space.params:
        v = trial.params.get(key)
        parts.append(f"{key.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{key.split('.')[-1]}={v}")
    return ", ".join(parts) or "all"


def report_split(trials: list[TrialSummary]) -> str:
    """"test" when every completed trial reported the held-out test split (`test/...`, written
    after the last epoch), else "valid" (the last epoch's validation metrics)."""
    done = [t for t in trials if t.complete]
    return "test" if done and all(TEST_PREFIX + "HR@10" in t.metrics for t in done) else "valid"


def arms_table(trials: list[TrialSummary], space: Space, ks: list[int]) -> pd.DataFrame:
    """Long table [arm, metric, mean, std, n] over the completed trials (seeds pooled), of the
    test split where every trial has it (see `report_split`)."""
    metrics = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + list(REPORT_METRICS)
    prefix = TEST_PREFIX if report_split(trials) == "test" else ""
    rows = []
    for t in trials:
        if not t.complete:
            continue
        for m in metrics:
            v = t.metrics.get(prefix + m)
            if isinstance(v, (int, float)) and math.isfinite(v):
                rows.append({"arm": arm_label(t, space), "metric": m, "value": float(v)})
    if not rows:
        raise ConfigError(f"sweep {space.name!r} has no completed trials to report")
    df = pd.DataFrame(rows)
    order = list(space.arms) if space.arms else list(dict.fromkeys(df["arm"]))
    g = df.groupby(["arm", "metric"], sort=False)["value"]
    table = g.agg(mean="mean", n="count").reset_index()
    table["std"] = g.std(ddof=1).fillna(0.0).to_numpy()  # sample std over seeds; one seed: 0
    table["arm"] = pd.Categorical(table["arm"], [a for a in order if a in set(table["arm"])], ordered=True)
    table["metric"] = pd.Categorical(table["metric"], [m for m in metrics if m in set(table["metric"])],
                                     ordered=True)
    table = table.sort_values(["arm", "metric"]).reset_index(drop=True)
    table["arm"] = table["arm"].astype(str)
    table["metric"] = table["metric"].astype(str)
    return table[["arm", "metric", "mean", "std", "n"]]


def markdown_table(table: pd.DataFrame) -> str:
    metrics = list(dict.fromkeys(table["metric"]))
    lines = ["| arm | seeds | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for arm, sub in table.groupby("arm", sort=False):
        sub = sub.set_index("metric")
        cells = [f"{sub.loc[m, 'mean']:.4f} ± {sub.loc[m, 'std']:.4f}" if m in sub.index else "–" for m in metrics]
        lines.append(f"| {arm} | {int(sub['n'].max())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class SweepReport:
    markdown: str
    table: pd.DataFrame
    png: Path
    parent_run_id: str


def report_sweep(path: str | Path, out_dir: str | Path | None = None) -> SweepReport:
    """Markdown table and arms plot of a finished sweep; both logged on its MLflow parent run."""
    from mlflow import MlflowClient

    from karma.plots import arms_plot

    path = Path(path)
    manifest = read_manifest(path)
    space = Space(**manifest["space"])
    cfg = from_dict(manifest["config"])
    if not manifest.get("finished"):
        raise ConfigError(f"sweep {space.name!r} at {path} is not finished; resume it with jobs/tune.py "
                          "--resume (same arguments) first")
    trials = summarize(path)
    table = arms_table(trials, space, cfg.train.ks)
    failed = [t for t in trials if t.status == "ERROR"]
    split = "test split" if report_split(trials) == "test" else "validation split (no trial reported test/...)"
    md = f"## Sweep {space.name}: mean ± std over seeds, {split}\n\n{markdown_table(table)}\n"
    if failed:
        md += "\nFailed trials: " + "; ".join(f"{t.trial_id} ({t.error})" for t in failed) + "\n"
    stopped = [t.trial_id for t in trials if t.status == "TERMINATED" and not t.complete]
    if stopped:
        md += "\nStopped early by the scheduler (not in the table): " + ", ".join(stopped) + "\n"
    out = Path(out_dir) if out_dir else path / "report"
    png = out / f"{space.name}_arms.png"
    arms_plot(table, path=png)
    (out / f"{space.name}_arms.md").write_text(md)
    client = MlflowClient(manifest["tracking_uri"])
    run_id = manifest["parent_run_id"]
    client.log_text(run_id, md, "report/arms.md")
    client.log_artifact(run_id, str(png), "report")
    client.log_dict(run_id, {"rows": table.to_dict(orient="records")}, "report/arms.json")
    return SweepReport(md, table, png, run_id)
