"""The ``cam`` section: MCTformer-V2 seed training (``cam_train``) and inference (``cam_infer``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import NONE_PATH, ConfigError, bounded, check_not_empty, check_order, given_path, listed


@dataclass(frozen=True)
class MCTformerArchConfig:
    """The ViT of MCTformer-V2. DeiT-S is width 384, depth 12, 6 heads, input 224."""

    image_size: int = bounded(128, low=16)
    patch_size: int = bounded(16, low=2)
    width: int = bounded(192, low=8)
    depth: int = bounded(6, low=3)
    heads: int = bounded(3, low=1)
    mlp_ratio: float = bounded(4.0, low=1.0)
    drop_path: float = bounded(0.1, low=0.0, high=0.9)
    pretrained: str = NONE_PATH  # an ImageNet DeiT/ViT state dict file (a DVC dep of cam_train); imports/none: none

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"width: {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class CamTrainConfig:
    """AdamW + linear warm-up + cosine; lr scales as ``lr * batch_size / 512`` like MCTformer."""

    epochs: int = bounded(30, low=1)
    batch_size: int = bounded(32, low=1)
    lr: float = bounded(5e-4, low=0.0)
    weight_decay: float = bounded(0.05, low=0.0)
    warmup_epochs: int = bounded(2, low=0)
    checkpoint_every: int = bounded(100, low=1)
    workers: int = bounded(0, low=0)
    crop_scale_min: float = bounded(0.5, low=0.01, high=1.0)
    randaugment_ops: int = bounded(2, low=0)
    randaugment_magnitude: int = bounded(9, low=0, high=30)
    # MCTformer's timm recipe (main.py: --aa, --reprob, --min-lr): a timm rand_augment_transform config string
    # ("rand-m9-mstd0.5-inc1"; "" = off), timm RandomErasing probability (pixel mode, one box), cosine floor
    auto_augment: str = ""
    reprob: float = bounded(0.0, low=0.0, high=1.0)
    min_lr: float = bounded(0.0, low=0.0)
    # warmup_cosine: linear warm-up, then the cosine over the remaining epochs, set every step (the synthetic
    # default's); timm_epoch_cosine: MCTformer's timm scheduler, set once an epoch, one epoch late (the presets)
    lr_schedule: Literal["warmup_cosine", "timm_epoch_cosine"] = "warmup_cosine"

    def validate(self) -> None:
        check_order("warmup_epochs", self.warmup_epochs, "epochs", self.epochs,
                    "the lr would never reach lr; lower warmup_epochs or train more epochs")
        if self.auto_augment and not self.auto_augment.startswith("rand"):
            raise ConfigError(f"auto_augment: a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', "
                              f"or '' for off; got {self.auto_augment!r}")
        if self.auto_augment and self.randaugment_ops > 0:
            raise ConfigError("auto_augment: set either auto_augment (timm) or randaugment_ops (torchvision), "
                              "not both")


@dataclass(frozen=True)
class CamInferConfig:
    """Fused CAM inference; ``variant`` selects the ablation written to the store."""

    variant: Literal["class_token", "patch_cam", "fused", "fused_affinity"] = "fused_affinity"
    scales: list[float] = listed([1.0, 0.75, 1.25], low=0.1, high=4.0)
    flip: bool = True
    attention_layers: int = bounded(3, low=1)
    threshold_start: float = bounded(0.0, low=0.0, high=1.0)
    threshold_stop: float = bounded(0.59, low=0.0, high=1.0)
    threshold_step: float = bounded(0.01, low=1e-4, high=1.0)
    batch_size: int = bounded(16, low=1)

    def validate(self) -> None:
        check_not_empty("scales", self.scales)
        check_order("threshold_start", self.threshold_start, "threshold_stop", self.threshold_stop)


@dataclass(frozen=True)
class CamConfig:
    """``source``: where the CAM seeds come from. ``train`` (default): ``cam_train`` trains MCTformer-V2 and
    ``cam_infer`` runs it. ``npy_folder``: ``cam_train`` trains nothing (it records why) and ``cam_infer``
    imports ``npy_folder``, one MCTformer CAM dump per train image (``<id>.npy``: a pickled dict 0-based
    foreground class index -> (H, W) map in [0, 1], as the reference's ``--cam-npy-dir``), into the same CAM
    store and threshold curve. ``none``: neither runs (for ``weakclip.seeds.source: mask_folder``); the CAM
    store is written empty and says so. ``checkpoint``: ``cam_infer`` runs a released MCTformer-V2 checkpoint
    (the reference's layout, ``weakclip_core/models/reference_checkpoints.py``; ``arch.heads`` gives its head
    count) instead of a model trained here. ``npy_folder`` and ``checkpoint`` are dvc.yaml deps;
    ``imports/none`` = not given."""

    source: Literal["train", "checkpoint", "npy_folder", "none"] = "train"
    npy_folder: str = NONE_PATH
    checkpoint: str = NONE_PATH
    arch: MCTformerArchConfig = field(default_factory=MCTformerArchConfig)
    train: CamTrainConfig = field(default_factory=CamTrainConfig)
    infer: CamInferConfig = field(default_factory=CamInferConfig)

    def validate(self) -> None:
        if self.source == "checkpoint" and given_path(self.checkpoint) is None:
            raise ConfigError("checkpoint: required when source is 'checkpoint' (a released MCTformer-V2 "
                              f"checkpoint file), got {self.checkpoint!r}")
        if self.source == "npy_folder" and given_path(self.npy_folder) is None:
            raise ConfigError("npy_folder: required when source is 'npy_folder' (the folder of MCTformer CAM "
                              f"<id>.npy dumps), got {self.npy_folder!r}")
