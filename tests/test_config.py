import pytest

from karma.config import Config, ConfigError, from_dict, load_config, parse_override
from conftest import ROOT


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.data.source == "synthetic" and cfg.model.backbone == "tiny"
    assert cfg.dist.zero_stage == 2 and cfg.dist.precision == "bf16"


@pytest.mark.parametrize("name", ["tiny.yaml", "smollm2.yaml", "qwen0.5b-gpu.yaml", "karma-scientific.yaml",
                                  "sasrec-scientific.yaml", "karma-movielens.yaml", "sasrec-movielens.yaml"])
def test_shipped_configs_load(name):
    assert isinstance(load_config(ROOT / "configs" / name), Config)


def test_overrides_parse_types():
    cfg = load_config(None, ["train.lr=3e-4", "train.batch_size=16", "model.lora=true", "train.ks=[5,10,20]",
                             "data.path=/tmp/x.y", "model.backbone=smollm2"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.batch_size == 16 and cfg.model.lora is True
    assert cfg.train.ks == [5, 10, 20] and cfg.data.path == "/tmp/x.y" and cfg.model.backbone == "smollm2"
    assert parse_override("loss.w_gen=0") == (["loss", "w_gen"], 0)


@pytest.mark.parametrize("overrides, needle", [
    (["train.lrr=1"], "unknown key(s) ['lrr'] in train"),
    (["trian.lr=1"], "unknown key(s) ['trian'] in the top level"),
    (["dist.zero_stage=4"], "dist.zero_stage: 4 is not a ZeRO stage"),
    (["dist.gpus_per_worker=1.5"], "dist.gpus_per_worker: 1.5 is neither a fraction in (0, 1]"),
    (["dist.gpus_per_worker=0"], "dist.gpus_per_worker: 0 is neither"),
    (["train.batch_size=abc"], "train.batch_size: expected an integer"),
    (["train.batch_size=1"], "train.batch_size: must be at least 2"),
    (["dist.precision=fp8"], "dist.precision: 'fp8' is not allowed"),
    (["loss.negatives=full"], "loss.negatives: 'full' is not allowed; choose one of ['sampled', 'all']"),
    (["model.n_interest=0"], "model.n_interest: must be at least 1"),
    (["loss.w_gen=-1"], "loss.w_gen / loss.w_rec"),
    (["data.source=recbole"], "data.path: required"),
    (["data.split=time"], "data.valid_start / data.test_start"),
    (["model.lora=maybe"], "model.lora: expected true or false"),
    (["model.id_shrinkage=-1"], "model.id_shrinkage: must be >= 0"),
    (["model.id_shrinkage=2"], "model.id_shrinkage: weighs the learned half against the text channel"),
    (["model.rec_input=learned"], "model.rec_input=learned: the learned half exists only with the text channel"),
    (["model.rec_input=half"], "model.rec_input"),
    (["model.query_text_scale=0"], "model.query_text_scale: must be > 0"),
    (["model.train_id_shrinkage=-1"], "model.train_id_shrinkage: must be >= 0"),
    (["model.train_id_shrinkage=2"], "model.train_id_shrinkage: weighs the learned half against the text channel"),
    (["model.query_text_scale=2"], "model.query_text_scale: scales the text channel's half"),
    (["train.lr"], "write it as section.key=value"),
    # NDCG@10 selects the best epoch: without K=10 training would crash after its first epoch.
    (["train.ks=[5,20]"], "train.ks: [5, 20] lacks 10; validation NDCG@10 picks the best epoch and drives early "
                          "stopping, so add it, e.g. train.ks=[5,10,20]"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    section = tmp_path / "section.yaml"
    section.write_text("train: 3")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(section)


def test_digest_changes_with_values():
    assert from_dict({}).digest() == from_dict({}).digest()
    assert from_dict({}).digest() != from_dict({"train": {"lr": 0.5}}).digest()


def test_dotted_values_are_applied_typed_and_leave_the_base_alone():
    base = load_config(None).to_dict()
    cfg = from_dict(base, dotted={"loss.w_gen": 0.25, "model.head_reduce": "mixture", "train.ks": [10, 20]})
    assert cfg.loss.w_gen == 0.25 and cfg.model.head_reduce == "mixture" and cfg.train.ks == [10, 20]
    assert base["loss"]["w_gen"] == 0.5 and base["train"]["ks"] == [10, 50, 200]  # not changed
    # Typed, not re-read as text: the string "true" is no boolean.
    with pytest.raises(ConfigError, match="model.lora: expected true or false, got 'true'"):
        from_dict(base, dotted={"model.lora": "true"})
    with pytest.raises(ConfigError, match=r"^train.lr.x: lr is not a section$"):
        from_dict(base, dotted={"train.lr.x": 1})
    with pytest.raises(ConfigError, match=r"^override 'train.lr.x=1': lr is not a section$"):
        from_dict(base, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(base, dotted={"train.lrr": 1})


def test_override_into_a_section_left_empty_in_yaml(tmp_path):
    f = tmp_path / "empty_section.yaml"
    f.write_text("train:\nloss:\n  w_gen: 0.1\n")
    cfg = load_config(f, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5 and cfg.loss.w_gen == 0.1


@pytest.mark.parametrize("model", ["karma", "sasrec"])
def test_one_recipe_per_model_whatever_the_data(model):
    """A recipe's per-data-set configs differ only in their data fields (and run names): what
    carries to a user's own data is the rest, unchanged. The SASRec baseline's one tuned value,
    its dropout, is picked on each set's validation split."""
    sci = load_config(ROOT / "configs" / f"{model}-scientific.yaml")
    ml = load_config(ROOT / "configs" / f"{model}-movielens.yaml")
    if model == "sasrec":
        assert sci.model.sasrec_dropout != ml.model.sasrec_dropout  # tuned per set (see the configs' comments)
        ml.model.sasrec_dropout = sci.model.sasrec_dropout
    for section in ("model", "loss", "train", "dist"):
        assert getattr(sci, section) == getattr(ml, section), section
    assert (sci.data.source, ml.data.source) == ("recbole", "movielens")
    assert sci.data.max_history == ml.data.max_history
