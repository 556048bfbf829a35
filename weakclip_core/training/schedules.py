"""Learning-rate schedules as pure functions of the step, and the one place an optimizer's lr is set."""

from __future__ import annotations

import math

import torch


def warmup_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up from base_lr/warmup to base_lr, cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def poly_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """DeepLab's poly schedule: base_lr * (1 - step/total)^power."""
    return base_lr * (1.0 - min(step, total_steps) / max(1, total_steps)) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
