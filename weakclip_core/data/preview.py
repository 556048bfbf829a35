"""A picture of a prepared dataset: images beside their VOC-palette GT masks, with label names.

It lets a person see in one glance that ``prepare`` wrote what they expect
(objects, masks aligned, ignore bands, class names) before hours of training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from weakclip_core.artifacts.atomic import atomic_path
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.evaluation.palette import colourise


def _fit(array: np.ndarray, tile: int, resample: Image.Resampling) -> Image.Image:
    """Scale an image so its longer side is ``tile`` px, padded to a (tile, tile) square."""
    image = Image.fromarray(array)
    scale = tile / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    square = Image.new("RGB", (tile, tile), (255, 255, 255))
    square.paste(resized, ((tile - resized.width) // 2, (tile - resized.height) // 2))
    return square


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
          draw: ImageDraw.ImageDraw) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + ([current] if current else [])


def write_dataset_preview(dataset: PreparedDataset, split: str, out_path: str | Path, n_samples: int = 12,
                          columns: int = 4, tile: int = 160) -> list[str]:
    """Write a PNG grid of ``n_samples`` images of ``split`` (spread evenly over it), each shown as
    image | coloured mask with the label names below; returns the image ids shown."""
    image_ids = dataset.split(split)
    positions = np.linspace(0, len(image_ids) - 1, num=min(n_samples, len(image_ids))).round().astype(int)
    shown = [image_ids[i] for i in dict.fromkeys(positions.tolist())]
    font = ImageFont.load_default(size=12)
    caption_lines, line_height, gap = 3, 14, 8
    cell_width, cell_height = 2 * tile + gap, tile + caption_lines * line_height + gap
    rows = (len(shown) + columns - 1) // columns
    title_height = 22
    canvas = Image.new("RGB", (columns * cell_width + gap, rows * cell_height + title_height + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), f"{dataset.name} / {split}: {len(image_ids)} images, {dataset.n_classes - 1} classes "
                        f"(left: image, right: GT mask in the VOC palette, cream = 255 ignore)",
              fill=(0, 0, 0), font=font)
    for number, image_id in enumerate(shown):
        left = gap + (number % columns) * cell_width
        top = title_height + (number // columns) * cell_height
        canvas.paste(_fit(dataset.image(image_id), tile, Image.Resampling.BILINEAR), (left, top))
        if dataset.has_mask(image_id):
            canvas.paste(_fit(colourise(dataset.mask(image_id)), tile, Image.Resampling.NEAREST),
                         (left + tile, top))
        names = ", ".join(dataset.class_names[c] for c in dataset.labels.get(image_id, []))
        text = f"{image_id}: {names or '(no labels)'}"
        for line_number, line in enumerate(_wrap(text, font, 2 * tile, draw)[:caption_lines]):
            draw.text((left, top + tile + 2 + line_number * line_height), line, fill=(0, 0, 0), font=font)
    with atomic_path(out_path, suffix=".png") as temporary_path:
        canvas.save(temporary_path, format="PNG")
    return shown
