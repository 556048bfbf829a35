"""The ``pseudo`` section: multi-scale + flip inference and dense-CRF refinement of the train split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weakclip_core.config.schema import ConfigError, bounded, check_not_empty, listed
from weakclip_core.config.weakclip import CrfConfig


def _voc_pseudo_crf() -> CrfConfig:
    """docs/METHOD.md §3, VOC: Gaussian sxy 3 compat 3, bilateral sxy 83 srgb 5 compat 3."""
    return CrfConfig(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0,
                     bilateral_sxy=83.0, bilateral_srgb=5.0, bilateral_compat=3.0)


@dataclass(frozen=True)
class PseudoConfig:
    """Multi-scale inference, dense CRF and the absent-class repair of the train split's pseudo masks."""

    scales: list[float] = listed([0.75, 1.0, 1.25], low=0.1, high=4.0)
    flip: bool = True
    crop: int = bounded(128, low=16)
    stride: int = bounded(85, low=1)
    batch_size: int = bounded(32, low=1)
    workers: int = bounded(2, low=0)
    use_crf: bool = True
    output_dir: str = "data/pseudo_masks"
    crf: CrfConfig = field(default_factory=_voc_pseudo_crf)
    overlay_samples: int = bounded(8, low=0)
    absent_class_odds_ratio: float = bounded(0.0, low=0.0, high=1000.0)  # 0: off (the paper has none)
    # mmseg MultiScaleFlipAug(img_scale, img_ratios=scales) + Resize(keep_ratio): the [long, short] base each scale
    # multiplies ([2048, 512] in the reference); [] = the image's own size
    img_scale: list[int] = listed([], low=1)
    pad_small_windows: bool = False  # false: a scaled image smaller than crop runs as is (the reference's
                                     # slide_inference); true: zero-padded (mean colour) to crop
    # labels: softmax over the image's labels + background (the paper's text); all: over every class, the CRF then
    # keeps the classes the argmax shows (the reference's aug_test + make_crf)
    softmax_classes: Literal["labels", "all"] = "labels"

    def validate(self) -> None:
        """At least one scale; windows without gaps (``stride`` <= ``crop``); the repair's ratio is 0 (off) or
        above 1 (``weakclip_core.method.absent_classes``: at 1 nothing flips)."""
        check_not_empty("scales", self.scales)
        if self.stride > self.crop:
            raise ConfigError(f"stride: {self.stride} is larger than crop {self.crop} "
                              f"(the sliding windows would leave gaps)")
        if len(self.img_scale) not in (0, 2):
            raise ConfigError(f"img_scale: expected [] or [long, short], got {self.img_scale}")
        if 0.0 < self.absent_class_odds_ratio <= 1.0:
            raise ConfigError(f"absent_class_odds_ratio: 0 (off) or > 1, got {self.absent_class_odds_ratio}")
