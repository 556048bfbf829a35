"""One image's class probabilities → its pseudo masks: dense CRF, absent-class repair, CRF again (docs/METHOD.md §3).

This is the whole per-image computation of the ``pseudo_masks`` stage, kept free of files, folders and
processes so it can be tested on hand-made arrays and reused: the stage decides where the masks go, in
which worker, and what it records about them.

Steps, on probabilities already restricted to the image's labels + background:

1. ``raw``: the plain argmax (what the masks would be with no refinement at all);
2. the dense CRF (``weakclip_core.method.crf``; skipped when no CRF config is given) and its argmax;
3. when a labelled class has no pixel in that mask and the repair is on (odds ratio > 0), its probability is
   boosted (``weakclip_core.method.absent_classes``) and step 2 runs again on the boosted probabilities.

Row ``i`` of the probabilities belongs to ``classes[i]``; the argmax is mapped back through ``classes``, so a
class outside the image's labels + background can never appear in a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.data.layout import IGNORE_INDEX
from weakclip_core.method.absent_classes import absent_classes, boost_absent_classes
from weakclip_core.method.crf import dense_crf


@dataclass(frozen=True)
class RefinedMasks:
    """What refining one image's probabilities yields.

    ``raw`` and ``final`` are (H, W) uint8 dataset class ids. The absent lists hold the labelled
    (foreground) classes with no pixel in the mask after the first CRF (``absent_before_repair``) and in
    ``final`` (``absent_after_repair``); without the repair the two are equal.
    """

    raw: np.ndarray
    final: np.ndarray
    absent_before_repair: tuple[int, ...]
    absent_after_repair: tuple[int, ...]


def _crf_argmax(image: np.ndarray, probabilities: np.ndarray, class_ids: np.ndarray,
                crf_config: CrfConfig | None) -> np.ndarray:
    """(H, W) uint8 class ids: the argmax after the dense CRF, or of ``probabilities`` when there is none."""
    if crf_config is None:
        return class_ids[probabilities.argmax(axis=0)]
    return class_ids[dense_crf(image, probabilities, crf_config).argmax(axis=0)]


def refine_probabilities(image: np.ndarray, probabilities: np.ndarray, classes: Sequence[int],
                         crf_config: CrfConfig | None, absent_class_odds_ratio: float) -> RefinedMasks:
    """Refine one image's probabilities into its raw and final masks (see the module docstring).

    image: (H, W, 3) uint8 RGB (read by the CRF's colour kernel only). probabilities: (n, H, W) float,
    each pixel summing to 1, row ``i`` for dataset class ``classes[i]``. classes: n distinct class ids,
    background 0 first. crf_config: ``None`` for no CRF (plain argmax). absent_class_odds_ratio: 0 for no
    repair, else > 1 (``boost_absent_classes``). Deterministic: the same inputs give the same bytes.
    """
    if probabilities.ndim != 3 or probabilities.shape[0] != len(classes):
        raise ValueError(f"probabilities must be (n_classes={len(classes)}, H, W), got {probabilities.shape}")
    if len(classes) == 0 or classes[0] != 0:
        raise ValueError(f"classes must start with background 0, got {list(classes)}")
    if any(not 0 <= class_index < IGNORE_INDEX for class_index in classes):
        raise ValueError(f"classes must lie in 0..{IGNORE_INDEX - 1}, got {list(classes)}")
    class_ids = np.asarray(classes, dtype=np.uint8)
    raw = class_ids[probabilities.argmax(axis=0)]
    final = _crf_argmax(image, probabilities, class_ids, crf_config)
    absent_before = absent_classes(final, classes)
    if absent_before and absent_class_odds_ratio > 0:
        boosted = boost_absent_classes(probabilities, classes, absent_before, absent_class_odds_ratio)
        final = _crf_argmax(image, boosted, class_ids, crf_config)
    return RefinedMasks(raw=raw, final=final, absent_before_repair=tuple(absent_before),
                        absent_after_repair=tuple(absent_classes(final, classes)))
