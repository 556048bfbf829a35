"""A tiny VOC-layout dataset and CAM store written by tests (no dependency on the synthetic generator).

Each image is a grey background with one or two coloured squares; class k has
colour ``CLASS_COLOURS[k - 1]``. The caption names the classes; the CAM store
holds, per present class, a blurred version of that class's GT region, so the
seeds are good but not perfect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weakclip_core.artifacts.cam_store import CamStoreWriter
from weakclip_core.data.layout import write_image, write_labels, write_mask, write_split

CLASS_NAMES = ["background", "apple", "boat", "cat"]
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]
TINY_CLIP_ARCH = {"embed_dim": 32, "image_size": 64, "patch_size": 16, "vision_width": 32, "vision_layers": 4,
                  "vision_head_width": 16, "text_width": 32, "text_layers": 1, "text_heads": 2,
                  "context_length": 16}
TINY_WEAKCLIP_TAPS = [0, 1, 2, 3]  # inside TINY_CLIP_ARCH's 4 blocks (the loader refuses taps past them)


def _sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    image = np.full((size, size, 3), 128, dtype=np.float64) + rng.normal(0, 6, (size, size, 3))
    mask = np.zeros((size, size), dtype=np.uint8)
    n_objects = int(rng.integers(1, 3))
    classes = sorted(rng.choice(len(CLASS_COLOURS), size=n_objects, replace=False).tolist())
    for slot, class_offset in enumerate(classes):
        side = int(rng.integers(size // 4, size // 2))
        top = int(rng.integers(0, size - side))
        left = int(rng.integers(0, size // 2 - side // 2)) + slot * (size // 2)
        left = min(left, size - side)
        image[top:top + side, left:left + side] = CLASS_COLOURS[class_offset]
        mask[top:top + side, left:left + side] = class_offset + 1
    present = sorted(int(c) for c in np.unique(mask) if c != 0)
    return np.clip(image, 0, 255).astype(np.uint8), mask, present


def _blurred_cam(region: np.ndarray) -> np.ndarray:
    """A soft CAM: the region's 5x5 box-blur, min-max normalised to [0, 1]."""
    padded = np.pad(region.astype(np.float64), 2)
    height, width = region.shape
    blurred = sum(padded[dy:dy + height, dx:dx + width] for dy in range(5) for dx in range(5)) / 25.0
    return (blurred / blurred.max()) if blurred.max() > 0 else blurred


def write_tiny_voc(root: Path, n_train: int = 24, n_val: int = 8, size: int = 64, seed: int = 0,
                   cam_path: Path | None = None) -> None:
    """Write the dataset under ``root`` (and a CAM store of the train split at ``cam_path``)."""
    rng = np.random.default_rng(seed)
    labels: dict[str, list[int]] = {}
    captions: list[str] = []
    train_cams: dict[str, tuple[list[int], np.ndarray]] = {}
    for split, count in (("train", n_train), ("val", n_val)):
        image_ids = [f"{split}_{index:03d}" for index in range(count)]
        for image_id in image_ids:
            image, mask, present = _sample(rng, size)
            write_image(root / "JPEGImages" / f"{image_id}.jpg", image)
            write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
            labels[image_id] = present
            captions.append(f"{image_id}\t" + " and ".join(f"a {CLASS_NAMES[c]}" for c in present))
            if split == "train":
                train_cams[image_id] = (present, np.stack([_blurred_cam(mask == c) for c in present]))
        write_split(root, split, image_ids)
    write_labels(root, "tiny", CLASS_NAMES, labels)
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    if cam_path is not None:
        with CamStoreWriter(cam_path, "tiny", CLASS_NAMES, {"made_by": "tests/tiny_voc.py"}) as writer:
            for image_id, (present, cams) in train_cams.items():
                writer.add(image_id, present, cams.astype(np.float32))
