"""The plain loop learns: on the synthetic set the tiny KARMA model beats the popularity baseline;
its results carry the long-tail breakdown and the test split's semantic analyses, and the job
writes them as JSON next to an attention heat-map."""

import json
import subprocess
import sys

import numpy as np
from matplotlib.image import imread

from conftest import ROOT, load_script, tiny_cfg
from karma.train.plain import train_plain

ANALYSES = {"sink_rate_first", "sink_rate_first_uniform", "sink_rate_item", "top1_share", "entropy", "barcode",
            "effective_rank", "mean_cosine", "token_f1", "category_match", "n_examples"}


def test_plain_loop_beats_popularity(cache_dir):
    cfg = tiny_cfg(cache_dir, "train.epochs=3", "data.synthetic_users=400")
    result = train_plain(cfg, log=lambda m: None)
    assert result["steps"] > 0 and len(result["epochs"]) == 3
    after, pop, before = result["after"]["HR@10"], result["popularity"]["HR@10"], result["before"]["HR@10"]
    assert after > before and after > 1.3 * pop, (before, pop, after)
    # the long-tail breakdown: test targets with fewer than 5 training interactions
    prep = result["prepared"]
    rare = int((prep.counts[prep.split.test.targets] < 5).sum())
    assert result["test"]["tail/n_queries"] == rare
    assert {"tail/HR@10", "tail/NDCG@10", "tail/HR@50", "tail/MRR"} <= set(result["test"])
    assert "tail/HR@10" in result["after"] and "tail/HR@10" in result["popularity"]
    # the semantic analyses of the first train.analysis_examples (32) test users
    assert set(result["analyses"]) == ANALYSES and result["analyses"]["n_examples"] == 32
    assert 1 <= result["analyses"]["effective_rank"] <= cfg.model.embed_dim
    assert len(result["decoded"]) == 8


def load_job():
    sys.path.insert(0, str(ROOT / "jobs"))
    return load_script("jobs/train_plain.py")


def test_job_writes_metrics_analyses_and_heatmap(cache_dir, tmp_path):
    out, png = tmp_path / "new" / "r.json", tmp_path / "img" / "attn.png"  # folders made up front
    rc = load_job().main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--heatmap", str(png),
                          f"data.cache_dir={cache_dir}", "train.max_steps=5", "train.analysis_examples=16"])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert {"popularity", "before", "after", "best", "test", "test_served", "analyses", "heatmap"} <= set(summary)
    assert summary["test_served"]["MRR"] >= summary["test"]["MRR"]  # history items taken out of the ranking
    assert "tail/n_queries" in summary["test"] and set(summary["analyses"]) == ANALYSES
    assert "decoded" not in summary  # item texts stay out of result files
    assert summary["heatmap"]["path"] == str(png) and summary["heatmap"]["positions"] > 1
    # provenance: the command, the code's commit, the resolved config; synthetic data reads no file
    prov = summary["provenance"]
    assert prov["command"] == summary["command"] and prov["data_files"] == {}
    assert prov["config"]["train"]["max_steps"] == 5 and prov["config"]["data"]["cache_dir"] == cache_dir
    assert prov["config"]["model"]["tiny_hidden"] == 32  # from configs/tiny.yaml
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert prov["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    # the commit and the resolved config are also at the top of the file
    assert summary["git_commit"] == prov["git_commit"] and summary["config_resolved"] == prov["config"]
    assert png.stat().st_size < 150_000 and imread(png).shape[0] > 100
    no_analyses = load_job().main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out),
                                   f"data.cache_dir={cache_dir}", "train.max_steps=2", "train.analysis_examples=0"])
    assert no_analyses == 0 and "analyses" not in json.loads(out.read_text())
    assert np.isfinite(json.loads(out.read_text())["test"]["HR@10"])


def test_job_names_bad_data_with_exit_code_2(cache_dir, tmp_path, capsys):
    rc = load_job().main(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.cache_dir={cache_dir}",
                          "data.source=recbole", f"data.path={tmp_path / 'missing'}"])
    assert rc == 2 and "data error:" in capsys.readouterr().err
