"""The plain loop learns: on the synthetic set the tiny KARMA model beats the popularity baseline."""

from conftest import tiny_cfg
from karma.train.plain import train_plain


def test_plain_loop_beats_popularity(cache_dir):
    cfg = tiny_cfg(cache_dir, "train.epochs=3", "data.synthetic_users=400")
    result = train_plain(cfg, log=lambda m: None)
    assert result["steps"] > 0 and len(result["epochs"]) == 3
    after, pop, before = result["after"]["HR@10"], result["popularity"]["HR@10"], result["before"]["HR@10"]
    assert after > before and after > 1.3 * pop, (before, pop, after)
