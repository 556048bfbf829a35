"""Joint image + mask augmentation shared by the dense trainers (weakclip_train, seg_train).

Every random choice comes from a ``numpy.random.Generator`` the caller seeds from
(seed, epoch, index), so an augmented sample is a pure function of those three:
a resumed run sees exactly the samples an uninterrupted one would.
Masks use 255 for "ignore"; padding of masks is 255, never a class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from weakclip_core.data.layout import IGNORE_INDEX

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample of one epoch (independent streams via SeedSequence)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 → (height, width, 3) uint8, bilinear."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 → (height, width) uint8, nearest (class ids never blend)."""
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg-style: random brightness, contrast, saturation and hue jitter, each with probability 1/2."""
    result = image.astype(np.float32)
    if rng.random() < 0.5:
        result = result + rng.uniform(-32, 32)
    if rng.random() < 0.5:
        result = result * rng.uniform(0.5, 1.5)
    result = np.clip(result, 0, 255).astype(np.uint8)
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 1.0
    hue_shift = rng.uniform(-18, 18) * 256 / 360 if rng.random() < 0.5 else 0.0
    if saturation != 1.0 or hue_shift != 0.0:
        hsv = np.asarray(Image.fromarray(result).convert("HSV")).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        hsv[..., 0] = (hsv[..., 0] + hue_shift) % 256
        result = np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB"))
    return result


@dataclass(frozen=True)
class DenseAugmentation:
    """Random resize (``scale_min``..``scale_max`` of the image), pad, random ``crop`` x ``crop``, flip, colour."""

    crop: int
    scale_min: float = 0.5
    scale_max: float = 2.0
    photometric: bool = True

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 image and (H, W) uint8 mask → (crop, crop, 3) and (crop, crop)."""
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image shape {image.shape[:2]} and mask shape {mask.shape} differ")
        scale = rng.uniform(self.scale_min, self.scale_max)
        height = max(1, int(round(image.shape[0] * scale)))
        width = max(1, int(round(image.shape[1] * scale)))
        image = resize_image(image, height, width)
        mask = resize_mask(mask, height, width)
        pad_height, pad_width = max(0, self.crop - height), max(0, self.crop - width)
        if pad_height or pad_width:
            image = np.pad(image, ((0, pad_height), (0, pad_width), (0, 0)), constant_values=0)
            mask = np.pad(mask, ((0, pad_height), (0, pad_width)), constant_values=IGNORE_INDEX)
        top = int(rng.integers(0, image.shape[0] - self.crop + 1))
        left = int(rng.integers(0, image.shape[1] - self.crop + 1))
        image = image[top:top + self.crop, left:left + self.crop]
        mask = mask[top:top + self.crop, left:left + self.crop]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def to_tensor(image: np.ndarray, mean: tuple[float, float, float] = CLIP_MEAN,
              std: tuple[float, float, float] = CLIP_STD) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 normalised with ``mean``/``std`` (in [0, 1] units)."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_tensor) / std_tensor
