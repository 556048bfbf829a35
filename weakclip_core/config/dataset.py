"""The ``dataset`` section: which dataset the chain runs on and how ``prepare`` builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import ConfigError, bounded


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the built-in synthetic WSSS benchmark (see weakclip_core/data/synthetic.py).

    The difficulty knobs make it hard the way VOC is: a class is told apart by a
    small discriminative part while the body is shared (``part_fraction``), classes
    co-occur with their context texture and companion (``context_prob``), and
    unlabelled clutter (``distractors``) sits on textured backgrounds.
    """

    image_size: int = bounded(128, low=32, high=1024)
    n_train: int = bounded(800, low=4)
    n_val: int = bounded(200, low=2)
    n_classes: int = bounded(10, low=2, high=20)
    min_objects: int = bounded(1, low=1, high=8)
    max_objects: int = bounded(4, low=1, high=8)
    part_fraction: float = bounded(0.3, low=0.05, high=1.0)
    body_colour_jitter: float = bounded(0.08, low=0.0, high=1.0)
    body_tint: float = bounded(0.0, low=0.0, high=1.0)
    context_prob: float = bounded(0.8, low=0.0, high=1.0)
    companion_prob: float = bounded(0.5, low=0.0, high=1.0)
    distractors: int = bounded(3, low=0, high=20)
    occlusion: float = bounded(0.3, low=0.0, high=1.0)
    ignore_band: int = bounded(2, low=0, high=16)
    workers: int = bounded(2, low=1, high=64)

    def validate(self) -> None:
        if self.min_objects > self.max_objects:
            raise ConfigError(f"min_objects: {self.min_objects} is greater than max_objects {self.max_objects}")


@dataclass(frozen=True)
class DatasetConfig:
    """Where the dataset comes from and which splits the stages use.

    ``source`` is the VOC 2012 root (the folder holding JPEGImages/) or the COCO
    2014 root (holding annotations/ and train2014/, val2014/); ignored for synthetic.
    ``prepared_dir`` is where ``prepare`` writes the VOC-layout copy every stage reads.
    ``score_split`` is the split whose GT scores the train-split stages (cam_infer, weakclip_train,
    pseudo_masks): they still run over all of ``train_split`` but report mIoU on this subset of it
    (VOC: ``train``, the 1,464 images of the paper's seed / pseudo-mask figures, inside ``train_aug``).
    Empty means ``train_split``.
    """

    name: Literal["synthetic", "voc", "coco"] = "synthetic"
    seed: int = bounded(0, low=0)
    source: str = ""
    prepared_dir: str = "data/prepared/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    score_split: str = ""
    voc_mask_dir: Literal["SegmentationClass", "SegmentationClassAug"] = "SegmentationClass"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def scored_split(self) -> str:
        """The split the train-split stages score against GT: ``score_split``, or ``train_split`` when empty."""
        return self.score_split or self.train_split

    def validate(self) -> None:
        if self.name != "synthetic" and not self.source:
            raise ConfigError(f"source: required when name is {self.name!r} (path to the {self.name.upper()} tree)")
