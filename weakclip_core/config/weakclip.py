"""The ``weakclip`` section: the WeakCLIP model, its seeds, losses and training schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import ConfigError, bounded, listed


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF settings (pydensecrf): Gaussian and bilateral kernels."""

    iterations: int = bounded(10, low=1)
    gaussian_sxy: float = bounded(3.0, low=0.0)
    gaussian_compat: float = bounded(3.0, low=0.0)
    bilateral_sxy: float = bounded(80.0, low=0.0)
    bilateral_srgb: float = bounded(13.0, low=0.0)
    bilateral_compat: float = bounded(10.0, low=0.0)


@dataclass(frozen=True)
class SeedConfig:
    """How CAMs become training seeds: confident thresholds (paper) or dense argmax (ablation).

    ``chosen_with_gt``: set true when the thresholds were picked by looking at
    ground truth (e.g. cam.json's best threshold or a seed-mIoU sweep); the
    stage copies it into ``metrics/weakclip.json`` as ``thresholds_chosen_with_gt``.
    """

    mode: Literal["confident", "dense"] = "confident"
    fg_threshold: float = bounded(0.4, low=0.0, high=1.0)
    bg_threshold: float = bounded(0.15, low=0.0, high=1.0)
    chosen_with_gt: bool = False

    def validate(self) -> None:
        if self.bg_threshold > self.fg_threshold:
            raise ConfigError(f"bg_threshold: {self.bg_threshold} is above fg_threshold {self.fg_threshold}")


@dataclass(frozen=True)
class WeakClipLossConfig:
    """total = seed + boundary_weight * boundary + aux_weight * aux, on P resized to ``loss_size``."""

    boundary_weight: float = bounded(1.0, low=0.0)
    aux_weight: float = bounded(0.4, low=0.0)
    aux_temperature: float = bounded(0.07, low=1e-4)
    loss_size: int = bounded(64, low=8)
    ratio_min: float = bounded(0.05, low=0.0)
    ratio_max: float = bounded(20.0, low=1.0)
    crf_workers: int = bounded(2, low=0)
    crf: CrfConfig = field(default_factory=CrfConfig)


@dataclass(frozen=True)
class WeakClipTrainConfig:
    """AdamW, linear warm-up then cosine to ``min_lr``; the paper's augmentations scaled to ``crop``."""

    iterations: int = bounded(600, low=1)
    batch_size: int = bounded(16, low=1)
    lr: float = bounded(1e-4, low=0.0)
    min_lr: float = bounded(1e-6, low=0.0)
    weight_decay: float = bounded(3e-5, low=0.0)
    warmup_iterations: int = bounded(50, low=0)
    crop: int = bounded(128, low=16)
    scale_min: float = bounded(0.5, low=0.1)
    scale_max: float = bounded(2.0, low=0.1)
    checkpoint_every: int = bounded(100, low=1)
    workers: int = bounded(0, low=0)


@dataclass(frozen=True)
class WeakClipConfig:
    """Numbers of the paper at ViT-B/16: prompt_len 8, temperature_init 0.1, taps 3/5/7/11,
    co-attention width 256 x 4 heads x 3 layers, neck/head width 256."""

    prompt_len: int = bounded(8, low=1, high=64)
    text_context_length: int = bounded(13, low=4)
    temperature_init: float = bounded(0.1, low=0.0)
    taps: list[int] = listed([3, 5, 7, 11], low=0)
    co_attention: bool = True
    co_attention_width: int = bounded(256, low=8)
    co_attention_heads: int = bounded(4, low=1)
    co_attention_layers: int = bounded(3, low=1)
    neck_width: int = bounded(256, low=8)
    head_width: int = bounded(128, low=8)
    dropout: float = bounded(0.1, low=0.0, high=1.0)
    seeds: SeedConfig = field(default_factory=SeedConfig)
    loss: WeakClipLossConfig = field(default_factory=WeakClipLossConfig)
    train: WeakClipTrainConfig = field(default_factory=WeakClipTrainConfig)

    def validate(self) -> None:
        if len(self.taps) != 4:
            raise ConfigError(f"taps: expected 4 block indices (1/4, 1/8, 1/16, 1/32), got {len(self.taps)}")
        if self.co_attention_width % self.co_attention_heads:
            raise ConfigError(f"co_attention_width: {self.co_attention_width} is not divisible by "
                              f"co_attention_heads {self.co_attention_heads}")
