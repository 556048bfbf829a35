"""Absent-class repair: every class an image is labelled with should appear in its pseudo mask.

The image-level labels say which classes are in an image, yet the argmax of background against a
weakly localised class can leave that class with no pixel at all (on the synthetic default this is
most of the object area the pseudo masks miss: ``docs/METHOD_NOTES.md``). No GT is needed to see that
a mask contradicts its own labels, so the repair uses the labels only:

for each labelled class ``c`` with no pixel in the refined mask, its probability is multiplied by the
factor that makes it beat background wherever its odds against background, ``p_c / p_bg``, exceed
``1 / odds_ratio`` of its best odds; the best is taken over the pixels whose probabilities (before any
CRF) favour background. The probabilities are renormalised and refined again (dense CRF, or argmax
without one). ``odds_ratio`` 2 takes the region where the class is more than half as likely, relative to
background, as at its most likely background pixel.

What it does not do, by design (measured in ``docs/METHOD_NOTES.md``): the boost scales the whole row,
so the class may also take pixels another labelled class won (the CAM of a weak class often sits on its
companion; limiting the boost to background's pixels measured worse); and it has no absolute floor: a
label is trusted even where its class has little evidence, and the CRF decides the final extent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from weakclip_core.data.layout import labels_from_mask

MIN_BACKGROUND_PROBABILITY = 1e-8
"""Background probabilities are clipped here before the odds are formed (a pixel where background has
probability 0 would otherwise give infinite odds)."""


def absent_classes(mask: np.ndarray, classes: Sequence[int]) -> list[int]:
    """The foreground entries of ``classes`` (background 0 excluded) with no pixel in the (H, W) ``mask``."""
    present = set(labels_from_mask(mask))
    return [class_index for class_index in classes if class_index != 0 and class_index not in present]


def boost_absent_classes(probabilities: np.ndarray, classes: Sequence[int], absent: Sequence[int],
                         odds_ratio: float) -> np.ndarray:
    """(n, H, W) probabilities over ``classes`` (row 0 = background) → the same with ``absent`` boosted.

    Each absent class's row is scaled by ``odds_ratio / max(p_c / p_bg)``, the maximum taken over the
    pixels whose argmax is background (a class is left alone when no pixel is background's, or when its
    probability is 0 on all of them); then every pixel is renormalised to sum to 1. Rows of other classes
    keep their values up to that renormalisation. ``odds_ratio`` must exceed 1: at 1 the best pixel only
    ties with background, and a tie goes to background. Returns float32.
    """
    if probabilities.ndim != 3 or probabilities.shape[0] != len(classes):
        raise ValueError(f"probabilities must be (n_classes={len(classes)}, H, W), got {probabilities.shape}")
    if len(classes) == 0 or classes[0] != 0:
        raise ValueError(f"classes must start with background 0, got {list(classes)}")
    if not 1.0 < odds_ratio < math.inf:
        raise ValueError(f"odds_ratio must be finite and > 1, got {odds_ratio}")
    unknown = [class_index for class_index in absent if class_index not in classes or class_index == 0]
    if unknown:
        raise ValueError(f"absent classes {unknown} are not foreground entries of {list(classes)}")
    boosted = probabilities.astype(np.float64)
    background_wins = boosted.argmax(axis=0) == 0
    if not absent or not background_wins.any():
        return probabilities.astype(np.float32)
    background = np.maximum(boosted[0], MIN_BACKGROUND_PROBABILITY)
    for class_index in dict.fromkeys(absent):  # each class once, in order
        row = list(classes).index(class_index)
        best_odds = float((boosted[row] / background)[background_wins].max())
        if best_odds <= 0.0:
            continue  # the class has probability 0 wherever background wins: nothing to grow from
        boosted[row] *= odds_ratio / best_odds
    boosted /= np.maximum(boosted.sum(axis=0, keepdims=True), MIN_BACKGROUND_PROBABILITY)
    return boosted.astype(np.float32)
