"""Joint image + mask augmentation shared by the dense trainers (weakclip_train, seg_train).

Every random choice comes from a ``numpy.random.Generator`` the caller seeds from
(seed, epoch, index), so an augmented sample is a pure function of those three:
a resumed run sees exactly the samples an uninterrupted one would.
Masks use 255 for "ignore"; padding of masks is 255, never a class.

``DenseAugmentation`` is the segmenter's (seg_train): resize relative to the image, pad black, crop, flip,
colour. ``MmsegAugmentation`` is the WeakCLIP reference's mmseg 0.x train pipeline (hustvl/WeakCLIP
``configs/_base_/datasets/pascal_voc12.py``): keep-ratio ``Resize`` of an ``img_scale`` base times a random
ratio, ``RandomCrop`` with the ``cat_max_ratio`` rule, flip, ``PhotoMetricDistortion``; its crop is returned
unpadded and ``pad_normalised`` pads after normalisation (0 = the mean colour; mask 255), as mmseg's
``Normalize`` → ``Pad`` do.
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


# --------------------------------------------------------------------------- the reference's mmseg pipeline

CLIP_MEAN_UINT8 = tuple(int(round(channel * 255)) for channel in CLIP_MEAN)  # (123, 117, 104)


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) mmcv's keep-ratio ``imrescale`` gives for a ``scale`` = (long, short) edge bound.

    factor = min(long / max(h, w), short / min(h, w)); each side becomes int(side * factor + 0.5).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def ratio_size(height: int, width: int, ratio: float, img_scale: tuple[int, int] | None) -> tuple[int, int]:
    """mmseg's size for one ratio: the bound (int(a * ratio), int(b * ratio)) of the base (a, b), then
    ``keep_ratio_size``. The base is ``img_scale`` (the reference: (2048, 512)), or the image's own size when
    ``None`` (mmseg's ``img_scale=None`` mode: the ratio scales the image itself)."""
    base = img_scale if img_scale is not None else (width, height)
    bound = (max(1, int(base[0] * ratio)), max(1, int(base[1] * ratio)))
    return keep_ratio_size(height, width, bound)


def crop_box(mask: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator,
             ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(top, left) of a ``crop`` x ``crop`` window (clipped to the image) as mmseg's ``RandomCrop`` draws it.

    With ``cat_max_ratio`` < 1 a window is accepted when it shows more than one class (``ignore_index``
    not counted) and no class covers ``cat_max_ratio`` or more of its counted pixels; up to 10 windows are
    tried, and after 10 rejections the next window drawn is taken as is (mmseg's loop).
    """
    margin_h, margin_w = max(mask.shape[0] - crop, 0), max(mask.shape[1] - crop, 0)

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = mask[top:top + crop, left:left + crop]
            labels, counts = np.unique(window, return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB in [0, 1] → HSV with hue in [0, 1) (fractions of 360 degrees), S and V in [0, 1]."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, delta / np.where(value > 0, value, 1.0), 0.0)
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(red == value, (green - blue) / safe,
                   np.where(green == value, 2.0 + (blue - red) / safe, 4.0 + (red - green) / safe))
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return np.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of ``_rgb_to_hsv``."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.astype(np.int64) % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    red = np.choose(sector, [value, q, p, p, t, value])
    green = np.choose(sector, [t, value, value, q, p, p])
    blue = np.choose(sector, [p, p, t, value, value, q])
    return np.stack([red, green, blue], axis=-1)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def hue_shift(image: np.ndarray, delta: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB with its hue turned by ``delta`` OpenCV hue units (0..180 scale: 2 degrees each)."""
    hsv = _rgb_to_hsv(image.astype(np.float64) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + delta * 2.0 / 360.0) % 1.0
    return _to_uint8(_hsv_to_rgb(hsv) * 255.0)


def mmseg_photometric_distortion(image: np.ndarray, rng: np.random.Generator, hue_delta: int = 18,
                                 brightness_delta: float = 32.0, contrast_range: tuple[float, float] = (0.5, 1.5),
                                 saturation_range: tuple[float, float] = (0.5, 1.5)) -> np.ndarray:
    """mmseg 0.x ``PhotoMetricDistortion`` on (H, W, 3) uint8 RGB, each step with probability 1/2, in its order:
    brightness (+U(-32, 32)), contrast (x U(0.5, 1.5)) first or last (a coin), saturation (x U(0.5, 1.5)),
    hue (+ an integer in [-hue_delta, hue_delta) OpenCV units, i.e. ±2·hue_delta degrees).

    HSV here is computed in floating point (mmseg uses OpenCV's uint8 HSV, whose hue has 2-degree steps).
    """
    result = image

    def convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        result = convert(result, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0
    if not contrast_last and rng.integers(2):
        result = convert(result, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = _rgb_to_hsv(result.astype(np.float64) / 255.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0.0, 1.0)
        result = _to_uint8(_hsv_to_rgb(hsv) * 255.0)
    if rng.integers(2):
        result = hue_shift(result, int(rng.integers(-hue_delta, hue_delta)) if hue_delta > 0 else 0)
    if contrast_last and rng.integers(2):
        result = convert(result, alpha=rng.uniform(*contrast_range))
    return result


@dataclass(frozen=True)
class MmsegAugmentation:
    """The reference's WeakCLIP train pipeline (mmseg 0.x), up to normalisation; the crop is not padded.

    ``Resize(img_scale, ratio_range=(ratio_min, ratio_max), keep_ratio=True)`` (``img_scale`` ``None``: the
    image's own size is the base) → ``RandomCrop(crop, cat_max_ratio)`` → ``RandomFlip(0.5)`` →
    ``PhotoMetricDistortion(hue_delta)``. Returns a (h, w, 3) uint8 image and (h, w) mask with h, w <= crop;
    ``pad_normalised`` completes it after normalisation.
    """

    crop: int
    ratio_min: float = 0.5
    ratio_max: float = 2.0
    img_scale: tuple[int, int] | None = None
    cat_max_ratio: float = 0.75
    hue_delta: int = 18
    photometric: bool = True

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image shape {image.shape[:2]} and mask shape {mask.shape} differ")
        ratio = rng.uniform(self.ratio_min, self.ratio_max)
        height, width = ratio_size(image.shape[0], image.shape[1], ratio, self.img_scale)
        image = resize_image(image, height, width)
        mask = resize_mask(mask, height, width)
        top, left = crop_box(mask, self.crop, self.cat_max_ratio, rng)
        image = image[top:top + self.crop, left:left + self.crop]
        mask = mask[top:top + self.crop, left:left + self.crop]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = np.ascontiguousarray(image)
        if self.photometric:
            image = mmseg_photometric_distortion(image, rng, self.hue_delta)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def pad_normalised(image: torch.Tensor, raw_image: torch.Tensor, mask: torch.Tensor,
                   crop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a (3, h, w) normalised image, its (3, h, w) uint8 raw pixels and (h, w) mask at the bottom/right
    to ``crop`` x ``crop``: the normalised image with 0 (the mean colour, as mmseg's ``Pad`` after
    ``Normalize``), the raw pixels with the mean colour in uint8 (``CLIP_MEAN_UINT8``), the mask with 255."""
    pad_h, pad_w = crop - image.shape[1], crop - image.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"image {tuple(image.shape[1:])} is larger than the crop {crop}")
    if pad_h == 0 and pad_w == 0:
        return image, raw_image, mask
    padding = (0, pad_w, 0, pad_h)
    image = torch.nn.functional.pad(image, padding, value=0.0)
    mask = torch.nn.functional.pad(mask, padding, value=IGNORE_INDEX)
    raw = torch.empty((3, crop, crop), dtype=raw_image.dtype)
    raw[:] = torch.tensor(CLIP_MEAN_UINT8, dtype=raw_image.dtype).view(3, 1, 1)
    raw[:, :raw_image.shape[1], :raw_image.shape[2]] = raw_image
    return image, raw, mask
