"""Dense test-time inference of any segmentation model: multi-scale, horizontal flip, sliding window.

The model is a plain callable ``(B, 3, h, w) normalised image → (B, K, h', w') logits`` (any output
stride: logits are resized bilinearly to the window), so WeakCLIP, the retrained segmenter and a test's
fixed convolution all run through the same code. Per scale and flip the logits of overlapping windows
are averaged, resized to the image, turned into probabilities with a softmax restricted to the allowed
classes (the image's labels + background: every other class gets probability exactly 0 and is therefore
never emitted; or over all classes when none are given), and the probabilities are averaged over scales
and flips (docs/METHOD.md §3).

Scaling follows the reference's mmseg test pipeline when ``img_scale`` is set: scale s resizes the image,
aspect kept, to fit (int(long·s), int(short·s)) of ``img_scale`` (``transforms.ratio_size``; (2048, 512)
makes a VOC image's short side 512·s). Without it, s multiplies the image's own size. A scaled image
smaller than the window runs as is (the reference's ``slide_inference``), or padded to the window with
``pad_to_crop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from weakclip_core.data.transforms import CLIP_MEAN, CLIP_STD, ratio_size

DenseModel = Callable[[torch.Tensor], torch.Tensor]
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class InferenceAugmentation:
    """Scales, flip, and the sliding window (``crop`` x ``crop``, step ``stride``).

    ``img_scale`` (long, short): the base each scale multiplies, aspect kept (mmseg's keep-ratio
    ``Resize``); ``None``: round(s·H) x round(s·W) of the image itself. A scaled image smaller than
    ``crop`` on a side is zero-padded (in normalised units, i.e. the mean colour) to ``crop`` on that side
    when ``pad_to_crop``, else its window is that side's full length (run as is); a larger one is covered
    by windows that always include its far edge. ``min_window``: the smallest side the model takes (WeakCLIP's
    pyramid needs two patches a side); a scaled image below it is zero-padded to it even without
    ``pad_to_crop``, the padding cropped off the result as ``pad_to_crop``'s is.
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crop: int = 128
    stride: int = 85
    img_scale: tuple[int, int] | None = None
    pad_to_crop: bool = True
    min_window: int = 1

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("scales: at least one scale is needed")
        if any(scale <= 0 for scale in self.scales):
            raise ValueError(f"scales: every scale must be > 0, got {list(self.scales)}")
        if self.crop < 1 or self.stride < 1:
            raise ValueError(f"crop and stride must be >= 1, got crop={self.crop} stride={self.stride}")
        if not 1 <= self.min_window <= self.crop:
            raise ValueError(f"min_window must be in 1..crop ({self.crop}), got {self.min_window}")
        if self.stride > self.crop:
            raise ValueError(f"stride {self.stride} is larger than crop {self.crop}: windows would leave gaps")


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of ``length`` (already padded to >= ``crop``).

    Steps of ``stride`` from 0, plus a last window flush with the far edge, so every pixel is covered.
    """
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    starts.append(length - crop)
    return sorted(set(starts))


@torch.inference_mode()
def sliding_window_logits(model: DenseModel, images: torch.Tensor, crop: int, stride: int,
                          max_forward_batch: int = 64, pad_to_crop: bool = True, min_window: int = 1) -> torch.Tensor:
    """(B, 3, H, W) normalised → (B, K, H, W) logits, averaged over the windows covering each pixel.

    Images smaller than ``crop`` on a side are zero-padded at the bottom/right first (``pad_to_crop``;
    the padding is cropped off the result), or else the window shrinks to that side (mmseg's
    ``slide_inference`` runs it as is), down to ``min_window``, below which the image is padded the same way (a
    model that cannot take a smaller input: a thin image used to stop the stage deep in the model). The windows
    of all images are stacked and run through the model in chunks
    of at most ``max_forward_batch`` (large batches amortise per-forward work such as WeakCLIP's text
    encoder); each window's logits are resized (bilinear) from the model's output grid to the window's
    size before they are accumulated.
    """
    batch, _, height, width = images.shape
    if pad_to_crop:
        padded_height, padded_width = max(height, crop), max(width, crop)
        window_h, window_w = crop, crop
    else:
        padded_height, padded_width = max(height, min_window), max(width, min_window)
        window_h, window_w = min(crop, padded_height), min(crop, padded_width)
    if (padded_height, padded_width) != (height, width):
        images = F.pad(images, (0, padded_width - width, 0, padded_height - height), value=0.0)
    positions = [(top, left) for top in window_starts(padded_height, window_h, stride)
                 for left in window_starts(padded_width, window_w, stride)]
    windows_per_forward = max(1, max_forward_batch // batch)
    logit_sum: torch.Tensor | None = None
    window_count = torch.zeros((1, 1, padded_height, padded_width), dtype=torch.float32, device=images.device)
    for first in range(0, len(positions), windows_per_forward):
        chunk = positions[first:first + windows_per_forward]
        windows = torch.cat([images[:, :, top:top + window_h, left:left + window_w] for top, left in chunk])
        logits = model(windows).float()
        if logits.ndim != 4 or logits.shape[0] != windows.shape[0]:
            raise ValueError(f"model output must be (B={windows.shape[0]}, K, h, w) logits, got {tuple(logits.shape)}")
        if logits.shape[-2:] != (window_h, window_w):
            logits = F.interpolate(logits, size=(window_h, window_w), mode="bilinear", align_corners=False)
        if logit_sum is None:
            logit_sum = torch.zeros((batch, logits.shape[1], padded_height, padded_width),
                                    dtype=torch.float32, device=images.device)
        for offset, (top, left) in enumerate(chunk):
            logit_sum[:, :, top:top + window_h, left:left + window_w] += logits[offset * batch:(offset + 1) * batch]
            window_count[:, :, top:top + window_h, left:left + window_w] += 1.0
    assert logit_sum is not None
    return (logit_sum / window_count)[:, :, :height, :width]


def allowed_class_mask(labels: Sequence[Sequence[int]], n_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, K) bool: background (0) plus each image's foreground labels."""
    allowed = torch.zeros((len(labels), n_classes), dtype=torch.bool, device=device)
    allowed[:, 0] = True
    for row, classes in enumerate(labels):
        for class_index in classes:
            if not 0 <= class_index < n_classes:
                raise ValueError(f"image {row}: class {class_index} outside 0..{n_classes - 1}")
            allowed[row, class_index] = True
    return allowed


def restricted_softmax(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """(B, K, H, W) logits → probabilities; classes not ``allowed`` (B, K) get exactly 0."""
    if allowed is None:
        return logits.softmax(dim=1)
    if allowed.shape != logits.shape[:2]:
        raise ValueError(f"allowed mask {tuple(allowed.shape)} does not match logits {tuple(logits.shape[:2])}")
    if not bool(allowed.any(dim=1).all()):
        raise ValueError("every image needs at least one allowed class")
    masked = logits.masked_fill(~allowed[:, :, None, None], float("-inf"))
    return masked.softmax(dim=1)


@torch.inference_mode()
def predict_probabilities(model: DenseModel, images: torch.Tensor, tta: InferenceAugmentation,
                          allowed: torch.Tensor | None = None, max_forward_batch: int = 64) -> torch.Tensor:
    """(B, 3, H, W) normalised images → (B, K, H, W) probabilities averaged over scales and flips.

    For each scale s the batch is resized (bilinear) to round(s*H) x round(s*W) (or, with
    ``tta.img_scale``, to mmseg's keep-ratio size of s times that base), run through the
    sliding window (and again mirrored, when ``tta.flip``, with the logits mirrored back), the logits
    resized back to H x W and soft-maxed over the ``allowed`` (B, K) classes only. ``max_forward_batch``
    bounds the windows per model call (memory).
    """
    height, width = images.shape[-2:]
    probability_sum: torch.Tensor | None = None
    n_views = 0
    for scale in tta.scales:
        scaled_size = (ratio_size(height, width, scale, tta.img_scale) if tta.img_scale is not None
                       else (max(1, int(round(height * scale))), max(1, int(round(width * scale)))))
        scaled = images if scaled_size == (height, width) else F.interpolate(
            images, size=scaled_size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if tta.flip else (False,)):
            view = scaled.flip(-1) if flipped else scaled
            logits = sliding_window_logits(model, view, tta.crop, tta.stride, max_forward_batch, tta.pad_to_crop,
                                           tta.min_window)
            if flipped:
                logits = logits.flip(-1)
            if scaled_size != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probabilities = restricted_softmax(logits, allowed)
            probability_sum = probabilities if probability_sum is None else probability_sum + probabilities
            n_views += 1
    assert probability_sum is not None
    return probability_sum / n_views


def normalise_images(images: Sequence[np.ndarray], mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """A list of same-size (H, W, 3) uint8 images → (B, 3, H, W) float32, ``(x/255 - mean) / std``."""
    stacked = torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images]))
    tensor = stacked.permute(0, 3, 1, 2).float().div_(255.0)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (tensor - mean_tensor) / std_tensor


def _probabilities_per_image(model: DenseModel, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]] | None,
                             n_classes: int, tta: InferenceAugmentation, device: torch.device | str,
                             mean: Sequence[float], std: Sequence[float],
                             max_forward_batch: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the image, its (K, H_i, W_i) probabilities on ``device``), images of one size as one batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[:2]), []).append(index)
    for indices in groups.values():
        batch = normalise_images([images[i] for i in indices], mean, std).to(device)
        allowed = None if labels is None else allowed_class_mask([labels[i] for i in indices], n_classes, device)
        probabilities = predict_probabilities(model, batch, tta, allowed, max_forward_batch)
        if probabilities.shape[1] != n_classes:
            raise ValueError(f"model predicts {probabilities.shape[1]} classes, the dataset has {n_classes}")
        for row, index in enumerate(indices):
            yield index, probabilities[row]


def predict_image_batch(model: DenseModel, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]] | None,
                        n_classes: int, tta: InferenceAugmentation, device: torch.device | str = "cpu",
                        mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                        max_forward_batch: int = 64) -> list[np.ndarray]:
    """Probabilities (K, H_i, W_i) float32 for each (H_i, W_i, 3) uint8 image.

    Images of the same size run as one batch (in their order of first appearance); ``labels`` restricts
    each image to its foreground classes + background (``None``: no restriction, e.g. on the val split).
    """
    return predict_reduced_batch(model, images, labels, n_classes, tta,
                                 lambda _, probabilities: probabilities.float().cpu().numpy(),
                                 device, mean, std, max_forward_batch)


def predict_label_batch(model: DenseModel, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]] | None,
                        n_classes: int, tta: InferenceAugmentation, device: torch.device | str = "cpu",
                        mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                        max_forward_batch: int = 64) -> list[np.ndarray]:
    """The argmax class map (H_i, W_i) uint8 of each image (the first class of a tie, as numpy's), as
    ``predict_image_batch``'s probabilities give it, taken on ``device``: an evaluation that needs only the
    argmax copied each image's K float maps to the host and took it there on one core (COCO: 81 x 480 x 640
    float32, 100 MB and ~0.2 s an image, hours over a split)."""
    if n_classes > 255:
        raise ValueError(f"{n_classes} classes do not fit a uint8 class map (masks are 8-bit PNGs, 255 = ignore)")
    return predict_reduced_batch(model, images, labels, n_classes, tta,
                                 lambda _, probabilities: probabilities.argmax(dim=0).to(torch.uint8).cpu().numpy(),
                                 device, mean, std, max_forward_batch)


def predict_reduced_batch(model: DenseModel, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]] | None,
                          n_classes: int, tta: InferenceAugmentation, reduce: Callable[[int, torch.Tensor], ResultT],
                          device: torch.device | str = "cpu", mean: Sequence[float] = CLIP_MEAN,
                          std: Sequence[float] = CLIP_STD, max_forward_batch: int = 64) -> list[ResultT]:
    """``reduce(i, probabilities)`` of each image i's (K, H_i, W_i) probabilities (``predict_image_batch``'s,
    still on ``device``), in image order: what needs less than the K full-size maps (an argmax, the few classes
    it shows, an image's label rows) is computed where they are and only its result is copied to the host. The
    device holds one same-size group's maps at a time, so ``reduce`` should return host data, not views of them."""
    results: dict[int, ResultT] = {}
    for index, probabilities in _probabilities_per_image(model, images, labels, n_classes, tta, device, mean, std,
                                                          max_forward_batch):
        results[index] = reduce(index, probabilities)
    return [results[index] for index in sorted(results)]
