"""bench/epoch_cost.py runs its arms side by side on a RecBole-format fixture (no timing claims)."""

import json

import numpy as np
import pytest
from conftest import load_script
from test_readers import write_recbole


def test_epoch_cost_reports_every_arm(tmp_path, cache_dir):
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    write_recbole(tmp_path / "data", {u: rng.integers(0, 40, 8).tolist() for u in range(80)}, n_items=40, L=50,
                  name="Scientific")
    bench = load_script("bench/epoch_cost.py")
    out = tmp_path / "cost.json"
    assert bench.main(["--data", str(tmp_path / "data"), "--rounds", "1", "--arms", "sasrec", "text-karma",
                       "--out", str(out), f"data.cache_dir={cache_dir}", "train.batch_size=32"]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"sasrec", "text-karma"}
    for arm, runs in res["runs"].items():
        assert len(runs) == 1 and runs[0]["steps"] == 400 // 32  # 80 users x 5 training prefixes
        r = runs[0]
        assert r["train_s"] > 0 and r["eval_s"] >= 0  # scoring 80 users may round to 0.00 s
        assert r["epoch_s"] == pytest.approx(r["train_s"] + r["eval_s"], abs=0.011)
    assert res["ratio_to_sasrec"]["sasrec"] == 1.0
    assert res["ratio_to_sasrec"]["text-karma"] == round(res["median_epoch_s"]["text-karma"]
                                                         / res["median_epoch_s"]["sasrec"], 2)
    assert res["command"].startswith("python bench/epoch_cost.py --data")
