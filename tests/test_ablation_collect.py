"""bench/ablation_smollm2.py's tables: test-split means per arm and parts of one grid merged."""

import pytest
from conftest import load_script


def _module():
    return load_script("bench/ablation_smollm2.py")


def part(seeds, hr: dict, pending=()):
    trials = [{"trial_id": f"{arm}-{s}", "status": "TERMINATED", "complete": True, "arm": arm, "seed": s,
               "error": None, "metrics": {"HR@10": 0.9, "test/HR@10": v, "test/NDCG@10": v / 2}}
              for (arm, s), v in hr.items()]
    trials += [{"trial_id": f"{arm}-{s}", "status": "PENDING", "complete": False, "arm": arm, "seed": s,
                "error": None, "metrics": {}} for arm, s in pending]
    return {"space": {"name": "ablation", "metric": "NDCG@10", "mode": "max",
                      "arms": {"action-only": {}, "KARMA": {}}, "seeds": seeds},
            "config": {"train": {"ks": [10]}}, "trials": trials}


def test_parts_of_a_grid_merge_and_a_completed_trial_wins():
    m = _module()
    first = part([0, 1], {("action-only", 0): 0.1, ("KARMA", 0): 0.2}, pending=[("action-only", 1), ("KARMA", 1)])
    second = part([1, 2], {("action-only", 1): 0.3, ("KARMA", 1): 0.4, ("action-only", 2): 0.2, ("KARMA", 2): 0.3})
    merged = m.merge([first, second])
    assert merged["space"]["seeds"] == [0, 1, 2] and len(merged["trials"]) == 6
    assert all(t["complete"] for t in merged["trials"])
    text = m.table(merged)
    assert "| action-only | 3 | 0.2000 ± 0.1000 |" in text  # test split: the 0.9 validation value never shows
    assert "| KARMA | 3 | +0.1000 ± 0.0000 | +0.0500 ± 0.0000 |" in text  # paired by seed
    assert "Not in the tables" not in text
    assert "Not in the tables: action-only seed 1 (PENDING)" in m.table(first)
    with pytest.raises(SystemExit, match="arms differ"):
        m.merge([first, {**second, "space": {**second["space"], "arms": {"x": {}}}}])
