"""The VOC colours every picture of a mask is drawn in, and the two ways a mask is drawn with them.

One table, one colouring and one blend, shared by the dataset preview (``prepare``), the stages' overlays
(``pseudo_masks``, ``seg_eval``) and the HTML report, so a class has the same colour in every picture. The
table comes from the dataset contract's palette (``weakclip_core.data.layout.voc_palette``, which the
mask PNGs carry). Only numpy: the ``prepare`` stage draws with it without loading PIL's drawing code or
matplotlib.
"""

from __future__ import annotations

import numpy as np

from weakclip_core.data.layout import voc_palette

VOC_COLOURS: np.ndarray = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
"""(256, 3) uint8 RGB of each class index; 0 black background, 255 (ignore) cream (224, 224, 192). Read-only."""
VOC_COLOURS.setflags(write=False)

OVERLAY_ALPHA = 0.55
"""How much of a mask's colour :func:`blend` mixes into the image (the rest is the image)."""


def colourise(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices → (H, W, 3) uint8 VOC colours (255 = ignore in the VOC cream colour)."""
    return VOC_COLOURS[mask.astype(np.uint8)]


def blend(image: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The mask's colours over the image: (H, W, 3) uint8 image, (H, W) mask → (H, W, 3) uint8.

    Background (0) leaves the image as it is; every other index, ignore (255) included, is mixed as
    ``(1 - alpha) * image + alpha * colour`` in float32 and rounded to the nearest integer (ties to even),
    so the unlabelled band of a GT or seed mask stays visible.
    """
    colours = colourise(mask).astype(np.float32)
    painted = (mask != 0)[..., None]
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where(painted, mixed, image.astype(np.float32)).round().astype(np.uint8)
