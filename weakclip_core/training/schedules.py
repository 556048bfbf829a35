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


MMCV_WARMUP_RATIO = 1e-6  # the reference config's lr_config warmup_ratio


def mmcv_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0,
                   warmup_ratio: float = MMCV_WARMUP_RATIO) -> float:
    """Learning rate at ``step`` (0-based) as mmcv's ``CosineAnnealingLrUpdaterHook`` with linear warm-up sets it
    (the WeakCLIP reference, ``lr_config = dict(policy='CosineAnnealing', min_lr=1e-6, by_epoch=False,
    warmup='linear', warmup_iters=1500, warmup_ratio=1e-6)``): the cosine runs over all ``total_steps`` from step
    0, and while ``step < warmup_steps`` it is multiplied by ``warmup_ratio + (1 - warmup_ratio) * step /
    warmup_steps`` (mmcv's ``regular_lr * (1 - k)``, ``k = (1 - step / warmup) * (1 - ratio)``)."""
    regular = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    if step < warmup_steps:
        return regular * (warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps)
    return regular


TIMM_WARMUP_LR = 1e-6  # MCTformer's main.py --warmup-lr default, the warm-up's first lr (not scaled by the batch)


def timm_epoch_cosine_lr(step: int, steps_per_epoch: int, epochs: int, base_lr: float, warmup_epochs: int,
                         min_lr: float = 0.0, warmup_lr: float = TIMM_WARMUP_LR) -> float:
    """Learning rate at ``step`` (0-based) as MCTformer-V2 trains (``main.py`` at 9606597): timm's
    ``CosineLRScheduler`` (``t_initial = epochs``, ``warmup_t = warmup_epochs``, ``warmup_prefix`` off, so the
    warm-up is laid over the cosine's first epochs) stepped by ``lr_scheduler.step(epoch)`` at each epoch's END.
    So the lr is constant within an epoch, and epoch e trains at timm's lr for e - 1: epoch 0 at ``warmup_lr``
    (the scheduler's initial lr; ``base_lr`` without a warm-up), epoch 1 at timm's lr for 0, which is
    ``warmup_lr`` again, and the cosine's floor is approached but never quite reached in the last epoch."""
    epoch = step // steps_per_epoch
    if epoch == 0:
        return warmup_lr if warmup_epochs > 0 else base_lr
    t = epoch - 1  # the epoch whose end set this lr
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


def poly_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """DeepLab's poly schedule: base_lr * (1 - step/total)^power."""
    return base_lr * (1.0 - min(step, total_steps) / max(1, total_steps)) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
