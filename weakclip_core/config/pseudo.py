"""The ``pseudo`` section: multi-scale + flip inference and dense-CRF refinement of the train split."""

from __future__ import annotations

from dataclasses import dataclass, field

from weakclip_core.config.schema import ConfigError, bounded, listed
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

    def validate(self) -> None:
        """The repair's ratio is 0 (off) or above 1 (``weakclip_core.method.absent_classes``: at 1 nothing flips)."""
        if 0.0 < self.absent_class_odds_ratio <= 1.0:
            raise ConfigError(f"absent_class_odds_ratio: 0 (off) or > 1, got {self.absent_class_odds_ratio}")
