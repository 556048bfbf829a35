"""Report images: an image beside its masks (GT, predictions) blended in VOC colours, and confusion matrices.

Written atomically as PNGs under a stage's ``reports/`` folder. PIL draws the overlays (fast, no
figure state) with the shared colours and blend of ``weakclip_core.evaluation.palette``; matplotlib (Agg
backend) draws the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from weakclip_core.artifacts.atomic import atomic_path
from weakclip_core.evaluation.palette import blend

TITLE_HEIGHT = 14


def overlay_panel(image: np.ndarray, masks: Sequence[tuple[str, np.ndarray]], caption: str = "",
                  upscale: int = 1) -> Image.Image:
    """One row: the image, then each (title, (H, W) mask) blended over it; titles above, caption below."""
    height, width = image.shape[:2]
    tiles = [("image", image)] + [(title, blend(image, mask)) for title, mask in masks]
    tile_height, tile_width = height * upscale, width * upscale
    caption_height = TITLE_HEIGHT if caption else 0
    canvas = Image.new("RGB", (tile_width * len(tiles), tile_height + TITLE_HEIGHT + caption_height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (title, tile) in enumerate(tiles):
        tile_image = Image.fromarray(tile).resize((tile_width, tile_height), Image.NEAREST)
        canvas.paste(tile_image, (column * tile_width, TITLE_HEIGHT))
        draw.text((column * tile_width + 2, 1), title, fill="black")
    if caption:
        draw.text((2, TITLE_HEIGHT + tile_height + 1), caption, fill="black")
    return canvas


def save_overlay(path: str | Path, image: np.ndarray, masks: Sequence[tuple[str, np.ndarray]],
                 caption: str = "") -> None:
    """Write :func:`overlay_panel` as a PNG, atomically; small images are drawn at 2x or more."""
    upscale = max(1, 256 // max(image.shape[:2]))
    panel = overlay_panel(image, masks, caption, upscale=upscale)
    with atomic_path(path, suffix=".png") as temporary_path:
        panel.save(temporary_path, format="PNG")


def save_confusion_matrix(path: str | Path, confusion: np.ndarray, class_names: Sequence[str],
                          title: str = "") -> None:
    """Row-normalised (recall per GT class) confusion matrix image, cells annotated in percent
    (the matrix already leaves out ignored (255) GT pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    row_sums = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, row_sums, out=np.zeros_like(confusion), where=row_sums > 0)
    size = max(4.0, 0.45 * len(class_names) + 2.0)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(class_names)), class_names, fontsize=7)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth (% of row)")
    if len(class_names) <= 30:
        for row in range(len(class_names)):
            for column in range(len(class_names)):
                value = normalised[row, column]
                if value >= 0.005:
                    axes.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                              color="white" if value > 0.5 else "black")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temporary_path:
        figure.savefig(temporary_path, format="png", dpi=100)
    plt.close(figure)


def evenly_spaced(image_ids: Sequence[str], count: int) -> list[str]:
    """A fixed, spread-out sample of ``count`` ids (the same for every run over the same split)."""
    if count <= 0 or not image_ids:
        return []
    if count >= len(image_ids):
        return list(image_ids)
    step = len(image_ids) / count
    return [image_ids[int(i * step)] for i in range(count)]


def lowest_scoring(scores: dict[str, float], count: int) -> list[str]:
    """The ``count`` ids of lowest score (ties broken by id, so the choice is deterministic)."""
    return [image_id for image_id, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]))[:count]]
