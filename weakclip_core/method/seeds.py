"""Training seeds for WeakCLIP from the CAMs of an image's present classes.

Two ways to turn CAMs into a seed mask (0 background, class index k, 255 ignore):

- ``confident_seeds`` (the paper): a pixel is class k where CAM_k >= fg_threshold
  and k wins the argmax over the present classes; background where every CAM is
  <= bg_threshold (every pixel of an image with no present class); ignore (255)
  elsewhere, so the uncertain band around objects carries no label.
- ``dense_seeds`` (ablation; what the reference scripts feed): argmax over
  {bg_threshold as the background score, CAMs}; every pixel gets a label.

CAMs come from the CAM store: ``(n_present, H, W)`` float in [0, 1], one map per
present foreground class, in the order of ``classes``.
"""

from __future__ import annotations

import numpy as np

from weakclip_core.config.weakclip import SeedConfig
from weakclip_core.data.layout import IGNORE_INDEX


def _check_inputs(cams: np.ndarray, classes: list[int]) -> None:
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"CAMs must be (n_present={len(classes)}, H, W), got shape {cams.shape}")
    if any(not 1 <= c < IGNORE_INDEX for c in classes):
        raise ValueError(f"class indices {classes} must lie in 1..{IGNORE_INDEX - 1}")


def confident_seeds(cams: np.ndarray, classes: list[int], fg_threshold: float, bg_threshold: float) -> np.ndarray:
    """(n_present, H, W) CAMs → (H, W) uint8 seed mask: confident classes, confident background, 255 elsewhere.

    A pixel whose best CAM is >= fg_threshold takes that class (ties go to the
    first class in ``classes``); a pixel whose best CAM is <= bg_threshold is
    background. When the two thresholds are equal, a pixel exactly at the
    threshold is foreground.
    """
    _check_inputs(cams, classes)
    height, width = cams.shape[1:]
    if not classes:
        return np.zeros((height, width), dtype=np.uint8)
    best_score = cams.max(axis=0)
    best_class = np.asarray(classes, dtype=np.uint8)[cams.argmax(axis=0)]
    seed_mask = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
    seed_mask[best_score <= bg_threshold] = 0
    foreground = best_score >= fg_threshold
    seed_mask[foreground] = best_class[foreground]
    return seed_mask


def dense_seeds(cams: np.ndarray, classes: list[int], bg_threshold: float) -> np.ndarray:
    """(n_present, H, W) CAMs → (H, W) uint8: argmax over {bg_threshold, CAMs}; a tie goes to background."""
    _check_inputs(cams, classes)
    height, width = cams.shape[1:]
    scores = np.concatenate([np.full((1, height, width), bg_threshold, dtype=np.float32),
                             cams.astype(np.float32)], axis=0)
    labels = np.asarray([0, *classes], dtype=np.uint8)
    return labels[scores.argmax(axis=0)]


def seeds_from_cams(cams: np.ndarray, classes: list[int], config: SeedConfig) -> np.ndarray:
    """The seed mask of ``config.mode`` (``confident`` or ``dense``) for one image."""
    if config.mode == "confident":
        return confident_seeds(cams, classes, config.fg_threshold, config.bg_threshold)
    return dense_seeds(cams, classes, config.bg_threshold)
