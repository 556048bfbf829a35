"""The ``seg`` section: the fully-supervised segmenter retrained on pseudo masks (and on GT)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import NONE_PATH, ConfigError, bounded, check_not_empty, check_order, given_path, listed
from weakclip_core.config.weakclip import CrfConfig


DEEPLABV3PLUS_ENCODERS = frozenset({
    "dpn107", "dpn131", "dpn68", "dpn68b", "dpn92", "dpn98", "efficientnet-b0", "efficientnet-b1", "efficientnet-b2",
    "efficientnet-b3", "efficientnet-b4", "efficientnet-b5", "efficientnet-b6", "efficientnet-b7", "mit_b0",
    "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5", "mobilenet_v2", "mobileone_s0", "mobileone_s1", "mobileone_s2",
    "mobileone_s3", "mobileone_s4", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x16d", "resnext101_32x32d", "resnext101_32x48d", "resnext101_32x4d", "resnext101_32x8d",
    "resnext50_32x4d", "se_resnet101", "se_resnet152", "se_resnet50", "se_resnext101_32x4d", "se_resnext50_32x4d",
    "senet154", "timm-efficientnet-b0", "timm-efficientnet-b1", "timm-efficientnet-b2", "timm-efficientnet-b3",
    "timm-efficientnet-b4", "timm-efficientnet-b5", "timm-efficientnet-b6", "timm-efficientnet-b7",
    "timm-efficientnet-b8", "timm-efficientnet-l2", "timm-skresnet18", "timm-skresnet34", "timm-skresnext50_32x4d",
    "timm-tf_efficientnet_lite0", "timm-tf_efficientnet_lite1", "timm-tf_efficientnet_lite2",
    "timm-tf_efficientnet_lite3", "timm-tf_efficientnet_lite4",
})
"""The encoders of segmentation-models-pytorch 0.6 (requirements.txt) that its DeepLabV3+ builds: every name of
its ``encoders`` table but those with no dilated mode (VGG, DenseNet, Inception, Xception). Listed here, not read
from smp, so that a params load stays free of torch (4 s); ``tests/test_config.py`` checks it against smp. Any
``tu-<timm model>`` is smp's timm-universal encoder and is left to smp."""


def check_deeplabv3plus_encoder(encoder: str) -> None:
    """A misspelt ``seg.encoder`` stopped the chain only at ``seg_train``, after every stage before it (hours on
    VOC), as smp's ``KeyError``; here it stops the params load, with the nearest names."""
    if encoder.startswith("tu-") or encoder in DEEPLABV3PLUS_ENCODERS:
        return
    near = difflib.get_close_matches(encoder, sorted(DEEPLABV3PLUS_ENCODERS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise ConfigError(f"encoder: {encoder!r} is not an encoder of segmentation-models-pytorch's DeepLabV3+; {hint}"
                      "e.g. resnet18, resnet50, resnet101, mit_b0..mit_b5, efficientnet-b0..b7, or tu-<timm model>")


@dataclass(frozen=True)
class SegTrainConfig:
    """``optimizer: sgd`` + ``schedule: poly`` is the paper's DeepLab recipe; AdamW is the small default.
    ``head_lr_mult``: the lr of everything but the encoder (decoder + head) is ``lr * head_lr_mult``
    (DeepLabV2 in WSSS papers: 10); 1 = one lr for all. ``freeze_encoder_bn``: the encoder's BatchNorm layers
    keep their (ImageNet) statistics and affine weights and never update, DeepLabV2's practice (the reference
    retraining, a ResNet38, re-estimates the statistics at momentum 3e-4 and keeps only the affine weights:
    docs/METHOD_NOTES.md). Trained instead, they follow the statistics of the crops of each step (synced
    across GPUs under torchrun). The presets turn it on; the decoder / head layers train either way."""

    epochs: int = bounded(6, low=1)
    batch_size: int = bounded(16, low=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = bounded(1e-3, low=0.0)
    momentum: float = bounded(0.9, low=0.0, high=1.0)
    weight_decay: float = bounded(1e-4, low=0.0)
    schedule: Literal["poly", "cosine"] = "poly"
    head_lr_mult: float = bounded(1.0, low=0.0)
    freeze_encoder_bn: bool = False
    crop: int = bounded(128, low=32)
    scale_min: float = bounded(0.5, low=0.1)
    scale_max: float = bounded(2.0, low=0.1)
    checkpoint_every: int = bounded(100, low=1)
    workers: int = bounded(0, low=0)

    def validate(self) -> None:
        check_order("scale_min", self.scale_min, "scale_max", self.scale_max)


def _reference_voc_test_crf() -> CrfConfig:
    """The reference retraining's test-time CRF for VOC (Yingyue-L/deeplabv1-resnet38 ``tools/densecrf.py``,
    ``crf_inference_voc12``): Gaussian sxy 1 compat 3, bilateral sxy 112 srgb 2 compat 3, 10 iterations."""
    return CrfConfig(iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0,
                     bilateral_sxy=112.0, bilateral_srgb=2.0, bilateral_compat=3.0)


@dataclass(frozen=True)
class SegEvalConfig:
    """How ``seg_eval`` predicts the val split. The default is single scale, no flip, no CRF (the synthetic
    benchmark's figures); the paper presets use the reference retraining's test protocol: each view whole at
    scales 0.5-1.5 with flip (``tools/test.py --test_multiscale --test_flip``), then a dense CRF over the classes the prediction
    shows (``tools/make_crf.py``). ``workers``: processes that run the CRF (0: in the stage's own process).
    Changing this section re-runs ``seg_eval`` only, never the training."""

    scales: list[float] = listed([1.0], low=0.1, high=4.0)
    flip: bool = False
    whole_image: bool = False  # each view through the network whole, no sliding window or padding (the reference's
                               # test); deeplabv2 only (smp's need multiples of 32/16: refused with them at load)
    use_crf: bool = False
    crf: CrfConfig = field(default_factory=_reference_voc_test_crf)
    workers: int = bounded(0, low=0)

    def validate(self) -> None:
        check_not_empty("scales", self.scales)


@dataclass(frozen=True)
class SegConfig:
    """DeepLabV3+ (ResNet encoders) or SegFormer (MiT-B0..B5) from segmentation-models-pytorch, or DeepLabV2
    (torchvision ResNet-50/101 at output stride 8 + ASPP 6/12/18/24; ``weakclip_core/models/deeplabv2.py``)."""

    model: Literal["deeplabv3plus", "segformer", "deeplabv2"] = "deeplabv3plus"
    encoder: str = "resnet18"
    encoder_weights: str = NONE_PATH  # a dvc.yaml dep of seg_train; imports/none = random init
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)

    def validate(self) -> None:
        if self.model == "deeplabv3plus":
            check_deeplabv3plus_encoder(self.encoder)
        if self.model == "deeplabv2" and self.encoder not in ("resnet50", "resnet101"):
            raise ConfigError(f"encoder: deeplabv2 needs resnet101 (or resnet50), got {self.encoder!r}")
        if self.model == "segformer" and not self.encoder.startswith("mit_b"):
            raise ConfigError(f"encoder: segformer needs an MiT encoder (mit_b0..mit_b5), got {self.encoder!r}")
        if self.eval.whole_image and self.model != "deeplabv2":
            # smp's models refuse a view whose sides are not multiples of their output stride (16, or 32 for
            # SegFormer): a VOC image (500 x 375) fails at every scale, and only in seg_eval, after both trainings
            raise ConfigError(f"eval.whole_image: true runs each view through the network whole, which {self.model} "
                              "takes only at sides that are multiples of 16 or 32 (a 500x375 VOC image is not): set "
                              "seg.model: deeplabv2 (the reference's whole-image test) or seg.eval.whole_image: false "
                              "(sliding windows of seg.train.crop)")
        if self.train.freeze_encoder_bn and given_path(self.encoder_weights) is None:
            # Frozen at what the encoder loaded: with no weights that is BatchNorm's initial mean 0 / variance 1 /
            # weight 1 / bias 0, no normalisation at all, for the whole training, without a word.
            raise ConfigError("train.freeze_encoder_bn: true keeps the encoder's BatchNorm at the ImageNet statistics "
                              "it loads, but encoder_weights is imports/none (random init): it would never normalise. "
                              "Give seg.encoder_weights, or set seg.train.freeze_encoder_bn: false to train it")
        if self.model == "segformer" and self.train.crop % 32:
            raise ConfigError(f"train.crop: segformer needs a multiple of 32, got {self.train.crop}")
