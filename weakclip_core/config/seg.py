"""The ``seg`` section: the fully-supervised segmenter retrained on pseudo masks (and on GT)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import ConfigError, bounded, check_order


@dataclass(frozen=True)
class SegTrainConfig:
    """``optimizer: sgd`` + ``schedule: poly`` is the paper's DeepLab recipe; AdamW is the small default."""

    epochs: int = bounded(6, low=1)
    batch_size: int = bounded(16, low=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = bounded(1e-3, low=0.0)
    momentum: float = bounded(0.9, low=0.0, high=1.0)
    weight_decay: float = bounded(1e-4, low=0.0)
    schedule: Literal["poly", "cosine"] = "poly"
    crop: int = bounded(128, low=32)
    scale_min: float = bounded(0.5, low=0.1)
    scale_max: float = bounded(2.0, low=0.1)
    checkpoint_every: int = bounded(100, low=1)
    workers: int = bounded(0, low=0)

    def validate(self) -> None:
        check_order("scale_min", self.scale_min, "scale_max", self.scale_max)


@dataclass(frozen=True)
class SegConfig:
    """DeepLabV3+ (ResNet encoders) or SegFormer (MiT-B0..B5) from segmentation-models-pytorch."""

    model: Literal["deeplabv3plus", "segformer"] = "deeplabv3plus"
    encoder: str = "resnet18"
    encoder_weights: str = ""
    train: SegTrainConfig = field(default_factory=SegTrainConfig)

    def validate(self) -> None:
        if self.model == "segformer" and not self.encoder.startswith("mit_b"):
            raise ConfigError(f"encoder: segformer needs an MiT encoder (mit_b0..mit_b5), got {self.encoder!r}")
        if self.model == "segformer" and self.train.crop % 32:
            raise ConfigError(f"train.crop: segformer needs a multiple of 32, got {self.train.crop}")
