"""Segmentation metrics: a confusion matrix over K classes with 255 ignored, and IoU from it.

VOC convention: a class absent from both ground truth and prediction over the
whole evaluation (its union is 0) has an undefined IoU; it is reported as
``None`` and left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weakclip_core.data.layout import IGNORE_INDEX


def confusion_matrix(ground_truth: np.ndarray, prediction: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; GT pixels of 255 are skipped.

    Raises ``ValueError`` when the shapes differ or a value outside [0, K) (other
    than ignored GT) appears, naming the offending value.
    """
    if ground_truth.shape != prediction.shape:
        raise ValueError(f"ground truth shape {ground_truth.shape} differs from prediction shape {prediction.shape}")
    gt = ground_truth.astype(np.int64).ravel()
    pred = prediction.astype(np.int64).ravel()
    keep = gt != IGNORE_INDEX
    gt, pred = gt[keep], pred[keep]
    for name, values in (("ground truth", gt), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            bad = values[(values < 0) | (values >= n_classes)][0]
            raise ValueError(f"{name} holds class id {bad}, outside [0, {n_classes}) and not {IGNORE_INDEX}")
    return np.bincount(gt * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


@dataclass(frozen=True)
class IouReport:
    """IoU per class (``None`` where undefined), their mean, pixel accuracy, precision and recall."""

    miou: float
    per_class: list[float | None]
    pixel_accuracy: float
    precision: list[float | None]
    recall: list[float | None]

    def as_dict(self, class_names: list[str]) -> dict:
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_class": dict(zip(class_names, self.per_class)),
            "precision": dict(zip(class_names, self.precision)),
            "recall": dict(zip(class_names, self.recall)),
        }


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
    return [float(n / d) if d > 0 else None for n, d in zip(numerator, denominator)]


NOT_SCORED_NO_GT = "not scored: no GT"
"""The ``not_scored`` note of a metrics file whose split has no GT mask (label-only data): ``miou`` is null."""


def iou_report(confusion: np.ndarray) -> IouReport:
    """IoU_k = TP / (TP + FP + FN) from a (K, K) confusion matrix; mean over defined classes."""
    confusion = confusion.astype(np.float64)
    true_positive = np.diag(confusion)
    gt_count = confusion.sum(axis=1)
    pred_count = confusion.sum(axis=0)
    union = gt_count + pred_count - true_positive
    per_class = _safe_ratio(true_positive, union)
    defined = [v for v in per_class if v is not None]
    total = confusion.sum()
    return IouReport(
        miou=float(np.mean(defined)) if defined else 0.0,
        per_class=per_class,
        pixel_accuracy=float(true_positive.sum() / total) if total > 0 else 0.0,
        precision=_safe_ratio(true_positive, pred_count),
        recall=_safe_ratio(true_positive, gt_count),
    )


def image_miou(confusion: np.ndarray) -> float | None:
    """One image's mIoU from its (K, K) confusion matrix, or ``None`` when the image scores no pixel (a mask of
    ignore only): such an image has no mIoU, so it is never counted as scored nor ranked among the worst."""
    return iou_report(confusion).miou if confusion.any() else None


class ConfusionAccumulator:
    """Sums confusion matrices image by image, so a split is scored without holding every mask."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.confusion = np.zeros((n_classes, n_classes), dtype=np.int64)

    def add(self, ground_truth: np.ndarray, prediction: np.ndarray) -> None:
        self.confusion += confusion_matrix(ground_truth, prediction, self.n_classes)

    def report(self) -> IouReport:
        return iou_report(self.confusion)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Non-interpolated AP of one class over N items: the mean, over its positives, of the precision at
    each positive's rank (scores sorted high to low). Items of equal score form one threshold, as in
    scikit-learn's ``average_precision_score`` (MCTformer's evaluation): each positive of a tie takes the
    precision at the tie's end, so the value does not depend on the order the items come in (a confident
    classifier's float32 sigmoids tie at exactly 1.0). ``scores``, ``positives``: (N,); a positive is a
    label above 0.5. ``None`` when there is no positive (AP undefined)."""
    hits_in_input_order = np.asarray(positives) > 0.5
    if not hits_in_input_order.any():
        return None
    descending = -np.asarray(scores)
    order = np.argsort(descending, kind="stable")
    hits = hits_in_input_order[order]
    sorted_scores = descending[order]
    precision_at_rank = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision_at_rank[tie_ends(sorted_scores)][hits].mean())


def tie_ends(sorted_values: np.ndarray) -> np.ndarray:
    """For each position of a sorted (N,) array, the index of the last element equal to it (its tie's end);
    ``arange(N)`` when no two are equal."""
    positions = np.arange(sorted_values.size)
    is_end = np.append(sorted_values[1:] != sorted_values[:-1], True)
    ends = np.where(is_end, positions, sorted_values.size)
    return np.minimum.accumulate(ends[::-1])[::-1]


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Multi-label mAP of (N, C) ``scores`` against (N, C) 0/1 ``targets``: ``average_precision`` per
    class, averaged over the classes with at least one positive (0.0 when none has)."""
    defined = [ap for ap in (average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1]))
               if ap is not None]
    return float(np.mean(defined)) if defined else 0.0
