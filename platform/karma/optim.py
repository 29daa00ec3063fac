"""The optimizer (AdamW over parameter groups) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from karma.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, new_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups. No weight decay on biases, norms, embeddings and the temperature (1-d or
    lookup tables). With new_lr_scale != 1 the parameters outside `model.backbone` (what KARMA
    adds to the LLM: item tower, interest tokens, heads, temperature) train at lr * new_lr_scale:
    a pretrained LLM wants a gentle learning rate, freshly initialised layers a larger one. At 1
    the two groups are the ones checkpoints were always saved with."""
    groups: dict[tuple[bool, bool], list] = {(False, False): [], (True, False): [], (False, True): [], (True, True): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "emb" in name or name.startswith("interest.")
        new = new_lr_scale != 1.0 and not name.startswith("backbone.")
        groups[(plain, new)].append(p)
    return [{"params": ps, "weight_decay": 0.0 if plain else weight_decay, "lr": lr * (new_lr_scale if new else 1.0)}
            for (plain, new), ps in groups.items() if ps or not new]


def make_optimizer(model: torch.nn.Module, train: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the train config's lr, weight decay and new_lr_scale."""
    groups = param_groups(model, train.weight_decay, train.lr, train.new_lr_scale)
    return torch.optim.AdamW(groups, lr=train.lr, fused=fused)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to `floor` at `total` steps."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
