"""The ablation report's table (no Ray): retrieval, long-tail and semantic metrics per arm,
mean ± sample std over seeds, metrics no trial reported left out."""

import pytest

from karma.tune import Space, TrialSummary, arms_table, markdown_table, report_split


def trial(arm: str, seed: int, **metrics) -> TrialSummary:
    return TrialSummary(f"{arm}-{seed}", "TERMINATED", {"arm": arm, "train.seed": seed}, metrics, True, "1", "r", None)


def test_arms_table_reports_tail_and_analyses():
    space = Space(name="ablation", metric="NDCG@10", mode="max",
                  arms={"action-only": {"loss.w_gen": 0.0}, "KARMA": {"loss.w_gen": 0.5}}, seeds=[0, 1])
    base = {"HR@10": 0.1, "NDCG@10": 0.05, "MRR": 0.04, "tail/HR@10": 0.01, "tail/NDCG@10": 0.005,
            "tail/MRR": 0.003, "tail/n_queries": 50, "sink_rate_first": 0.7, "effective_rank": 3.0}
    trials = [trial("KARMA", 0, **{**base, "tail/HR@10": 0.02}), trial("KARMA", 1, **{**base, "tail/HR@10": 0.04}),
              trial("action-only", 0, **base), trial("action-only", 1, **base)]
    table = arms_table(trials, space, [10])
    assert list(dict.fromkeys(table["arm"])) == ["action-only", "KARMA"]  # the space's order
    assert list(dict.fromkeys(table["metric"])) == ["HR@10", "NDCG@10", "MRR", "tail/HR@10", "tail/NDCG@10",
                                                    "tail/MRR", "sink_rate_first", "effective_rank"]
    cell = table[(table["arm"] == "KARMA") & (table["metric"] == "tail/HR@10")].iloc[0]
    assert cell["mean"] == pytest.approx(0.03) and cell["std"] == pytest.approx(0.02 / 2 ** 0.5) and cell["n"] == 2
    md = markdown_table(table)
    assert "| tail/HR@10 |" in md.splitlines()[0] and "0.0300 ± 0.0141" in md


def test_arms_table_reports_the_test_split_when_every_trial_has_it():
    space = Space(name="ablation", metric="NDCG@10", mode="max", arms={"a": {"loss.w_gen": 0.0}}, seeds=[0, 1])
    valid_and_test = {"HR@10": 0.1, "NDCG@10": 0.05, "test/HR@10": 0.2, "test/NDCG@10": 0.07}
    both = [trial("a", 0, **valid_and_test), trial("a", 1, **valid_and_test)]
    table = arms_table(both, space, [10]).set_index("metric")
    assert report_split(both) == "test"
    assert table.loc["HR@10", "mean"] == pytest.approx(0.2) and table.loc["NDCG@10", "mean"] == pytest.approx(0.07)
    one_without = [trial("a", 0, **valid_and_test), trial("a", 1, **{"HR@10": 0.3, "NDCG@10": 0.05})]
    assert report_split(one_without) == "valid"  # mixing splits would make the spread meaningless
    assert arms_table(one_without, space, [10]).set_index("metric").loc["HR@10", "mean"] == pytest.approx(0.2)
