"""The ``dataset`` section: which dataset the chain runs on and how ``prepare`` builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import NONE_PATH, ConfigError, bounded, given_path

SYNTHETIC_WEB_SPLIT = "web"
"""The synthetic generator's split name of the small CLIP's pre-training stream (``clip.pretrain.corpus: web``):
no WSSS split may take it, so no web image is a train or val image."""

RANDOM_PART_COLOURS_MAX_CLASSES = 10
"""With ``part_colours: random`` only the part's shape and position tell a class apart: the generator's designs
give that many distinct (shape, position) pairs (tests/test_synthetic.py counts them)."""


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
    part_colours: Literal["per_class", "random"] = "per_class"  # random: colour says nothing about the class
    context_prob: float = bounded(0.8, low=0.0, high=1.0)
    companion_prob: float = bounded(0.5, low=0.0, high=1.0)
    distractors: int = bounded(3, low=0, high=20)
    occlusion: float = bounded(0.3, low=0.0, high=1.0)
    ignore_band: int = bounded(2, low=0, high=16)
    workers: int = bounded(2, low=1, high=64)

    def validate(self) -> None:
        if self.min_objects > self.max_objects:
            raise ConfigError(f"min_objects: {self.min_objects} is greater than max_objects {self.max_objects}")
        if self.part_colours == "random" and self.n_classes > RANDOM_PART_COLOURS_MAX_CLASSES:
            raise ConfigError(f"n_classes: {self.n_classes} classes cannot be told apart with part_colours: random "
                              f"(part shape and position give {RANDOM_PART_COLOURS_MAX_CLASSES}); use per_class "
                              f"or at most {RANDOM_PART_COLOURS_MAX_CLASSES} classes")


@dataclass(frozen=True)
class DatasetConfig:
    """Where the dataset comes from and which splits the stages use.

    ``source`` is the VOC 2012 root (the folder holding JPEGImages/) or the COCO
    2014 root (holding annotations/ and train2014/, val2014/); ignored for synthetic.
    ``prepared_dir`` is where ``prepare`` writes the VOC-layout copy every stage reads.
    ``name: custom`` reads your own label-only data from ``source`` (README "Your own data"): ``images/``,
    ``classes.txt``, ``labels.csv`` or ``labels.json`` (image id -> class names), ``splits/<split>.txt`` and an
    optional ``masks/`` of GT masks. ``voc_cls_labels``: a VOC run takes its image-level labels from
    MCTformer's ``cls_labels.npy`` (a pickled dict id -> 20 floats) instead of deriving them from the GT
    masks, which then become optional (images without one are simply not scored). ``coco_masks``: a folder of
    pre-rendered COCO masks (``<id>.png`` or hustvl's ``000000000009.png``) used instead of rendering the
    annotations, in ``coco_mask_encoding``: ``contiguous`` (0..80, hustvl ``parse_coco.py``'s
    ``class_labels``) or ``category_id`` (raw COCO ids 1..90, the reference's 91-class masks).
    ``score_split`` is the split whose GT scores the train-split stages (cam_infer, weakclip_train,
    pseudo_masks): they still run over all of ``train_split`` but report mIoU on this subset of it
    (VOC: ``train``, the 1,464 images of the paper's seed / pseudo-mask figures, inside ``train_aug``).
    Empty means ``train_split``. The path params (``source``, ``voc_cls_labels``, ``coco_masks``) are dvc.yaml
    deps of ``prepare``; ``imports/none`` (or ``""`` outside DVC) means "not given".
    """

    name: Literal["synthetic", "voc", "coco", "custom"] = "synthetic"
    seed: int = bounded(0, low=0)
    source: str = NONE_PATH
    prepared_dir: str = "data/prepared/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    score_split: str = ""
    voc_mask_dir: Literal["SegmentationClass", "SegmentationClassAug"] = "SegmentationClass"
    voc_cls_labels: str = NONE_PATH
    coco_masks: str = NONE_PATH
    coco_mask_encoding: Literal["contiguous", "category_id"] = "contiguous"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def scored_split(self) -> str:
        """The split the train-split stages score against GT: ``score_split``, or ``train_split`` when empty."""
        return self.score_split or self.train_split

    def validate(self) -> None:
        if self.name != "synthetic" and given_path(self.source) is None:
            raise ConfigError(f"source: required when name is {self.name!r} (path to the {self.name.upper()} tree)")
        if given_path(self.coco_masks) and self.name != "coco":
            raise ConfigError(f"coco_masks: only read when name is 'coco', got name {self.name!r}")
        if given_path(self.voc_cls_labels) and self.name != "voc":
            raise ConfigError(f"voc_cls_labels: only read when name is 'voc', got name {self.name!r}")
        if self.name == "synthetic":
            for key, split in (("train_split", self.train_split), ("val_split", self.val_split)):
                if split == SYNTHETIC_WEB_SPLIT:
                    raise ConfigError(f"{key}: {split!r} is the synthetic generator's CLIP pre-training stream "
                                      "(clip.pretrain.corpus: web), which must stay apart from the WSSS splits; "
                                      "name the split otherwise")
