"""MCTformer-V2 CAMs: attention fusion, affinity refinement, multi-scale + flip inference, threshold sweep.

The four variants (the ablations of MCTformer-V2), each (B, C, h, w) on the patch grid:

- ``class_token``: class-to-patch attention of the last ``attention_layers``
  layers, averaged over heads, summed over those layers;
- ``patch_cam``: ReLU of the PatchCAM branch;
- ``fused``: ``class_token * patch_cam``;
- ``fused_affinity``: ``fused`` refined by the patch-to-patch attention summed
  over all layers: ``refined[c, i] = sum_j A[i, j] * fused[c, j]``.

``multiscale_cams`` runs them over scales and horizontal flips, keeps each
image's labelled classes, upsamples them to the image, averages, and min-max
normalises each class map to [0, 1].

``ThresholdSweep`` scores CAMs against ground truth for every background
threshold at once: background score = t, prediction = argmax over {t, CAMs of
the present classes}. A pixel is foreground for exactly the thresholds below
its best CAM score, so one histogram per image fills every threshold's
confusion matrix; no threshold is skipped and nothing stops early.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weakclip_core.data.layout import IGNORE_INDEX
from weakclip_core.evaluation.metrics import ConfusionAccumulator, IouReport
from weakclip_core.models.mctformer import MCTformerV2

CAM_VARIANTS: tuple[str, ...] = ("class_token", "patch_cam", "fused", "fused_affinity")
NORMALISE_FLOOR = 1e-12


def cam_variants(attentions: Sequence[Tensor], patch_cams: Tensor, attention_layers: int) -> dict[str, Tensor]:
    """The four CAM variants from one forward pass.

    ``attentions``: one (B, N, N) softmax map per layer averaged over its heads
    (``MCTformerOutput.attentions``), N = C + h*w with the C class tokens first. ``patch_cams``: (B, C, h, w). Returns
    ``{variant: (B, C, h, w)}``.
    """
    if not 1 <= attention_layers <= len(attentions):
        raise ValueError(f"cam.infer.attention_layers: {attention_layers} is outside 1..{len(attentions)} "
                         f"(the model's depth)")
    batch, n_classes, grid_height, grid_width = patch_cams.shape
    head_mean = torch.stack(list(attentions))  # (L, B, N, N)
    class_to_patch = head_mean[-attention_layers:].sum(dim=0)[:, :n_classes, n_classes:]
    class_token = class_to_patch.reshape(batch, n_classes, grid_height, grid_width)
    patch_cam = F.relu(patch_cams)
    fused = class_token * patch_cam
    affinity = head_mean.sum(dim=0)[:, n_classes:, n_classes:]  # (B, P, P)
    refined = torch.einsum("bij,bcj->bci", affinity, fused.flatten(2))
    return {"class_token": class_token, "patch_cam": patch_cam, "fused": fused,
            "fused_affinity": refined.reshape(batch, n_classes, grid_height, grid_width)}


def scaled_size(height: int, width: int, scale: float, patch_size: int) -> tuple[int, int]:
    """(H, W) scaled by ``scale`` and rounded to whole pixels (at least one patch), as the reference's
    ``VOC12DatasetMS`` sizes each view (``round(side * s)``; Python's round, halves to even). The model's
    stride-``patch_size`` patch embedding then drops the last ``side mod patch_size`` rows and columns, and the
    grid is stretched over the whole image (``engine.generate_attention_maps_ms``). Until 2026-12-04 each view
    was resized to the nearest multiple of the patch instead: the same at every synthetic view (128 px at
    0.75 / 1 / 1.25 are multiples of 16), a grid shifted by up to half a patch on a 500x375 VOC image."""
    return max(patch_size, round(height * scale)), max(patch_size, round(width * scale))


def normalise_per_class(cams: Tensor) -> Tensor:
    """Min-max normalise each (b, c) map of (B, C, H, W) to [0, 1]; a constant map becomes 0."""
    flat = cams.flatten(2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(NORMALISE_FLOOR)).reshape(cams.shape)


def label_rows(image_classes: Sequence[Sequence[int]], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """The class-token row of each image's labels, padded: ``rows`` (B, L) long, image b's first
    ``len(image_classes[b])`` entries its classes' rows (class c, 1-based, is row c - 1) in order, the rest 0;
    ``valid`` (B, L, 1, 1) float, 1 where a row is a label. L: the most labels of any image (at least 1)."""
    width = max(1, max((len(classes) for classes in image_classes), default=0))
    rows = torch.zeros(len(image_classes), width, dtype=torch.long)
    valid = torch.zeros(len(image_classes), width, 1, 1)
    for index, classes in enumerate(image_classes):
        rows[index, :len(classes)] = torch.tensor([class_index - 1 for class_index in classes], dtype=torch.long)
        valid[index, :len(classes)] = 1.0
    return rows.to(device), valid.to(device)


@torch.no_grad()
def multiscale_cams(model: MCTformerV2, images: Tensor, image_classes: Sequence[Sequence[int]],
                    scales: Sequence[float], flip: bool, attention_layers: int) -> dict[str, Tensor]:
    """CAMs of every variant for each image's labelled classes, at the images' size, averaged over scales (and
    flips), in [0, 1].

    ``images`` (B, 3, H, W) normalised, all of one size; ``image_classes``: each image's foreground classes
    (1-based, as ``labels.json``). Each scale's maps are upsampled bilinearly to (H, W), un-flipped and averaged;
    then each class map is min-max normalised. Returns ``{variant: (B, L, H, W)}`` float32 on the images'
    device: image b's first ``len(image_classes[b])`` maps are its classes' in that order, the rest (up to L, the
    most labels of any image) are 0.

    Only the labelled classes' maps are upsampled: all C of them at the image's size took C / L times the memory
    and the device-to-host copy (COCO, 80 classes, a batch of 16 at 640x480 with flip: ~19 GB of a GPU and 6 GB
    copied per batch). The gathered maps are in the standard layout, so the bilinear resize works map by map and
    an image's maps do not depend on which other images share its batch (PatchCAM's conv output is channels-last,
    whose resize kernel vectorises over the channels: its maps moved by ~1e-7 from the all-class resize).
    """
    model.eval()
    batch, _, height, width = images.shape
    if len(image_classes) != batch:
        raise ValueError(f"{len(image_classes)} label lists for {batch} images")
    rows, valid = label_rows(image_classes, images.device)
    sums: dict[str, Tensor] = {}
    n_views = 0
    for scale in scales:
        view_size = scaled_size(height, width, scale, model.patch_size)
        scaled = F.interpolate(images, size=view_size, mode="bilinear", align_corners=False)
        views = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        output = model(views, return_attention=True)
        view_rows = torch.cat([rows, rows]) if flip else rows
        for variant, cams in cam_variants(output.attentions, output.patch_cams, attention_layers).items():
            labelled = cams.gather(1, view_rows[:, :, None, None].expand(-1, -1, *cams.shape[2:]))
            labelled = F.interpolate(labelled, size=(height, width), mode="bilinear", align_corners=False)
            view_sum = labelled[:batch] + labelled[batch:].flip(-1) if flip else labelled
            sums[variant] = sums.get(variant, 0) + view_sum * valid
        n_views += 2 if flip else 1
    return {variant: normalise_per_class(total / n_views) for variant, total in sums.items()}


def threshold_values(start: float, stop: float, step: float) -> np.ndarray:
    """start, start + step, ... up to and including ``stop`` (rounded to 6 decimals against float drift)."""
    if stop < start:
        raise ValueError(f"cam.infer.threshold_stop {stop} is below threshold_start {start}")
    count = int(np.floor((stop - start) / step + 1e-6)) + 1
    return np.round(start + step * np.arange(count), 6)


def first_max_over_rows(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scores.max(axis=0), scores.argmax(axis=0))`` of an (n, P) array, the first row winning ties as
    ``argmax``, row by row: numpy's reductions over axis 0 of a few long rows run ~10x slower (11 ms for
    3 x 307,200 float32 against ~1 ms here)."""
    best = scores[0].copy()
    best_row = np.zeros(scores.shape[1], dtype=np.int64)
    for row in range(1, scores.shape[0]):
        higher = scores[row] > best  # strictly: an equal later row does not take the pixel
        best_row[higher] = row
        np.maximum(best, scores[row], out=best)
    return best, best_row


class ThresholdSweep:
    """One confusion matrix per background threshold, filled in one pass over the images.

    ``n_classes`` is K including background (0). For threshold t a pixel is
    predicted as its best present class when that class's CAM is > t, else
    background (the background score t wins ties, as argmax over {t, CAMs}
    picks the first maximum).
    """

    def __init__(self, n_classes: int, thresholds: np.ndarray) -> None:
        self.n_classes = n_classes
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.ndim != 1 or not self.thresholds.size or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be a non-empty increasing 1-D array")
        # One (T, K, K) array; accumulator i's confusion is a view of its slice i.
        self.confusions = np.zeros((len(self.thresholds), n_classes, n_classes), dtype=np.int64)
        self.accumulators = [ConfusionAccumulator(n_classes) for _ in self.thresholds]
        for accumulator, confusion in zip(self.accumulators, self.confusions):
            accumulator.confusion = confusion

    def add(self, ground_truth: np.ndarray, cams: np.ndarray, classes: Sequence[int]) -> None:
        """Add one image: GT (H, W) with 255 ignored; ``cams`` (n_present, H, W) for foreground ``classes``.

        The histogram is taken over the classes this image can touch (its GT classes, its labels and
        background), not all K: on COCO (K = 81) the K x K x T one cost ~30 ms an image for every variant,
        ~3 h of one core over the 82k train images; the counts are the same."""
        if cams.shape[0] != len(classes) or cams.shape[1:] != ground_truth.shape:
            raise ValueError(f"CAMs {cams.shape} do not match {len(classes)} classes and GT {ground_truth.shape}")
        n_classes, n_thresholds = self.n_classes, len(self.thresholds)
        gt = ground_truth.astype(np.int64).ravel()
        keep = gt != IGNORE_INDEX
        gt = gt[keep]
        if gt.size and (gt.min() < 0 or gt.max() >= n_classes):
            raise ValueError(f"ground truth holds class id {gt[(gt < 0) | (gt >= n_classes)][0]}, "
                             f"outside [0, {n_classes})")
        if len(classes):
            best_score, best_row = first_max_over_rows(cams.reshape(len(classes), -1))
            best_class = np.asarray(classes, dtype=np.int64)[best_row[keep]]
            # Number of thresholds strictly below the score: the pixel is foreground for thresholds[:level].
            # (The float64 cast after the max: it is exact and keeps the order, so it is the same max.)
            level = np.searchsorted(self.thresholds, best_score[keep].astype(np.float64), side="left")
        else:
            best_class = np.zeros_like(gt)
            level = np.zeros_like(gt)
        touched = np.bincount(gt, minlength=n_classes) > 0
        touched[0] = True
        touched[np.asarray(classes, dtype=np.int64)] = True
        present = np.flatnonzero(touched)  # sorted, background first: compact index 0 is class 0
        compact = np.zeros(n_classes, dtype=np.int64)
        compact[present] = np.arange(len(present))
        size = len(present)
        histogram = np.bincount((compact[gt] * size + compact[best_class]) * (n_thresholds + 1) + level,
                                minlength=size * size * (n_thresholds + 1))
        histogram = histogram.reshape(size, size, n_thresholds + 1)
        # foreground[g, c, i]: pixels of GT g predicted c at threshold i (those with level > i).
        at_or_above = np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1]
        foreground = np.moveaxis(at_or_above[..., 1:], -1, 0)  # (T, size, size)
        block = foreground.copy()
        block[:, :, 0] += histogram.sum(axis=(1, 2))[None, :] - foreground.sum(axis=2)  # the rest: background
        self.confusions[:, present[:, None], present[None, :]] += block

    def reports(self) -> list[IouReport]:
        return [accumulator.report() for accumulator in self.accumulators]

    def curve(self) -> list[float]:
        """mIoU at every threshold, in threshold order."""
        return [report.miou for report in self.reports()]

    def best(self) -> tuple[float, IouReport]:
        """(threshold, report) of the highest mIoU; the lowest such threshold on ties."""
        reports = self.reports()
        best_index = int(np.argmax([report.miou for report in reports]))
        return float(self.thresholds[best_index]), reports[best_index]
