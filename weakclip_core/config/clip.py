"""The ``clip`` section: the frozen CLIP that WeakCLIP adapts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import NONE_PATH, ConfigError, bounded, given_path


@dataclass(frozen=True)
class ClipArchConfig:
    """open_clip architecture of the CLIP built by ``source: pretrain`` (small ViT + text transformer)."""

    embed_dim: int = bounded(128, low=8)
    image_size: int = bounded(128, low=32)
    patch_size: int = bounded(16, low=4)
    vision_width: int = bounded(128, low=16)
    vision_layers: int = bounded(12, low=1)
    vision_head_width: int = bounded(64, low=8)
    text_width: int = bounded(128, low=16)
    text_layers: int = bounded(3, low=1)
    text_heads: int = bounded(2, low=1)
    context_length: int = bounded(32, low=8)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclass(frozen=True)
class ClipPretrainConfig:
    """Contrastive pre-training of the small CLIP on generated images and captions.

    ``corpus``: ``web`` (default) streams the synthetic generator's own "web" of captioned images, disjoint
    from the WSSS splits (``weakclip_core/training/web_corpus.py``): ``web_images`` new images per epoch, one to
    ``web_max_objects`` objects each. ``train_split`` trains on the prepared train split's images and captions
    (the earlier default: too little data for the CLIP to learn its classes, docs/METHOD_NOTES.md).
    ``caption_dropout``: probability of dropping each clause of a caption (at
    least one is kept), so object phrases align with the image on their own.
    ``attribute_dropout`` (web only): probability that an object phrase loses its attributes ("a red-headed grey
    heron" -> "a heron"), as most alt-text names things bare; a bare name can only be matched by what the class
    looks like, not by colour words.
    """

    epochs: int = bounded(20, low=1)
    batch_size: int = bounded(64, low=2)
    lr: float = bounded(5e-4, low=0.0)
    weight_decay: float = bounded(0.1, low=0.0)
    warmup_steps: int = bounded(50, low=0)
    caption_dropout: float = bounded(0.5, low=0.0, high=1.0)
    attribute_dropout: float = bounded(0.0, low=0.0, high=1.0)
    workers: int = bounded(0, low=0)
    corpus: Literal["web", "train_split"] = "web"
    web_images: int = bounded(6400, low=2)
    web_max_objects: int = bounded(4, low=1, high=8)

    def validate(self) -> None:
        """On the web stream the step count is known here (``web_images // batch_size`` an epoch); on the train
        split it depends on the split's size and ``clip_pretrain`` checks it."""
        if self.corpus != "web":
            return
        if self.web_images < self.batch_size:
            raise ConfigError(f"web_images: {self.web_images} images an epoch is less than one batch_size "
                              f"({self.batch_size}): no training step")
        total_steps = self.web_images // self.batch_size * self.epochs
        if self.warmup_steps > total_steps:
            raise ConfigError(f"warmup_steps: {self.warmup_steps} is more than the {total_steps} steps of training "
                              f"(web_images {self.web_images} // batch_size {self.batch_size} x epochs "
                              f"{self.epochs}): the lr would never reach lr; lower warmup_steps")


@dataclass(frozen=True)
class ClipConfig:
    """``source: file`` loads a local weights file; ``source: pretrain`` trains a small CLIP here.

    ``model_name`` is the open_clip architecture name of the weights file
    (``ViT-B-16`` for real runs). A hub tag such as ``openai`` is refused: no
    weights are downloaded at run time.
    """

    source: Literal["file", "pretrain", "random"] = "pretrain"
    model_name: str = "ViT-B-16"
    weights: str = NONE_PATH  # a dvc.yaml dep of the clip stage; imports/none = not given
    arch: ClipArchConfig = field(default_factory=ClipArchConfig)
    pretrain: ClipPretrainConfig = field(default_factory=ClipPretrainConfig)

    def validate(self) -> None:
        if self.source == "file" and given_path(self.weights) is None:
            raise ConfigError("weights: required when source is 'file' (a local .pt/.bin/.safetensors path)")
