"""The report's pictures as PNG bytes: matplotlib plots (Agg backend) and mask overlay tiles.

Masks are drawn with ``weakclip_core.evaluation.palette`` (the colours and blend of every stage's
overlays), so a class looks the same in the report as in ``reports/pseudo`` and ``reports/seg_*``.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from weakclip_core.evaluation.palette import blend  # noqa: E402

TILE_HEIGHT = 144
"""Rows of every overlay tile (``img.tile`` in the page's style has the same height)."""
MAX_CURVE_PANELS = 12


def figure_png(figure: plt.Figure) -> bytes:
    """The figure as PNG bytes (100 dpi, tight box); the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def array_png(array: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 RGB array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def cam_curve_png(thresholds: np.ndarray, mious: np.ndarray) -> bytes:
    """mIoU (fractions, (N,)) against the background threshold ((N,)), the best point marked in red."""
    best = int(np.argmax(mious))
    figure, axis = plt.subplots(figsize=(6.0, 3.2))
    axis.plot(thresholds, 100 * mious, color="#1f77b4")
    axis.scatter([thresholds[best]], [100 * mious[best]], color="#d62728", zorder=3,
                 label=f"best t={thresholds[best]:.2f}: {100 * mious[best]:.1f}")
    axis.set_xlabel("background threshold t")
    axis.set_ylabel("mIoU %")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    return figure_png(figure)


def training_curves_png(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """One panel per metric (the first ``MAX_CURVE_PANELS``, three to a row): ``{name: (steps, values)}``."""
    names = list(curves)[:MAX_CURVE_PANELS]
    n_columns = min(3, len(names))
    n_rows = math.ceil(len(names) / n_columns)
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(4.0 * n_columns, 2.6 * n_rows), squeeze=False)
    for axis, name in zip(axes.ravel(), names):
        steps, values = curves[name]
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in axes.ravel()[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    return figure_png(figure)


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the (h, w) ``mask`` blended over the (H, W, 3) uint8 ``image`` in the VOC colours.

    A mask of another size (e.g. seeds at the CAM's resolution) is first resized to the image, nearest,
    so class ids never mix. Background stays the plain image; ignore (255) is tinted too, so the
    unlabelled band of seeds is visible.
    """
    if mask.shape != image.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize((image.shape[1], image.shape[0]), Image.NEAREST))
    return blend(image, mask)


def scaled_tile(array: np.ndarray) -> np.ndarray:
    """Resize an (H, W, 3) picture to TILE_HEIGHT rows, keeping the aspect ratio (bilinear)."""
    height, width = array.shape[:2]
    new_width = max(1, round(width * TILE_HEIGHT / height))
    return np.asarray(Image.fromarray(array).resize((new_width, TILE_HEIGHT), Image.BILINEAR))
