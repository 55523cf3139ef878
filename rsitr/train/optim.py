"""The optimizer (two learning rates: heads and unfrozen backbone layers) and the warm-up/cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from rsitr.config import TrainConfig
from rsitr.models.msa import MSA


def make_optimizer(model: MSA, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a smaller learning rate for the pretrained towers than for the new heads."""
    towers: list[torch.nn.Parameter] = []
    heads: list[torch.nn.Parameter] = []
    temperatures: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if name.endswith("log_temperature"):
            temperatures.append(param)
        elif param.requires_grad:
            (towers if name.startswith(("backbone.", "text.")) else heads).append(param)
    groups: list[dict[str, Any]] = [{"params": heads, "lr": train.lr}]
    if towers:
        groups.append({"params": towers, "lr": train.backbone_lr})
    if temperatures:  # decay would pull the temperature towards 1
        groups.append({"params": temperatures, "lr": train.lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, weight_decay=train.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> Any:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``total_steps`` optimizer steps.

    Contrastive heads collapse (every embedding the same point) when AdamW starts at full learning rate, so
    the warm-up matters; one epoch is the default.
    """
    warmup = max(1, min(warmup_steps, total_steps // 2))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
