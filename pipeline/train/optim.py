"""AdamW with FLAVA's weight-decay exclusions and a linear-warmup cosine schedule.

Decay is a prior on weight matrices; applied to norms, biases, embedding tables or the contrastive logit
scale it only pulls them towards zero (the logit scale would lose its temperature), so they get none.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig

# leaf parameter names of tables that live outside nn.Embedding (ViT cls/mask tokens, position tables)
_NO_DECAY_LEAF_PARTS = ("embed", "token", "logit_scale")


def no_decay_names(model: nn.Module) -> set[str]:
    """Trainable parameters that must not be decayed: of embedding and norm modules, vectors and scalars
    (biases, logit scale), and raw token/position tables. A patch-embedding conv's weight still decays."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if not param.requires_grad:
                continue
            if (
                isinstance(module, nn.Embedding)
                or "norm" in type(module).__name__.lower()
                or param.ndim < 2
                or any(part in param_name.lower() for part in _NO_DECAY_LEAF_PARTS)
            ):
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, decay and no decay; each group carries its parameter names for inspection."""
    skip = no_decay_names(model)
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in skip else decay).append((name, param))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in plain], "names": [n for n, _ in plain], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """Build after sharding: FSDP2 replaces parameters by DTensors, which the optimizer must hold."""
    beta1, beta2 = train.betas
    optimizer = torch.optim.AdamW(
        param_groups(model, train.weight_decay), lr=train.lr, betas=(beta1, beta2), eps=train.adam_eps
    )
    init_state(optimizer)
    return optimizer


def init_state(optimizer: torch.optim.AdamW) -> None:
    """Creates AdamW's state for every parameter up front, with the values its lazy init would give.

    Heads of a kind not yet sampled have no gradient, so lazily they would have no state: a checkpoint
    would then lack their keys, and DCP's own fill-in (a zero-lr step) would advance their step count,
    so a resumed run would drift from an uninterrupted one. Eager zeros make both identical.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup from ~0, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_steps, train.steps, train.min_lr_ratio)
    )
