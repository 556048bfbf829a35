"""Stage ``seg_eval@{pseudo,gt}``: score the retrained segmenter on the val split (docs/METHOD.md §4).

Prediction at ``seg.eval``'s scales (with the horizontal flip when ``seg.eval.flip``; sliding ``crop``
windows of the training crop, smaller images padded, or each view whole with ``seg.eval.whole_image``),
probabilities averaged over the views, no label restriction (val labels are not given to a segmenter),
then, when ``seg.eval.use_crf``, the reference retraining's dense CRF over the classes the prediction shows
(``weakclip_core.method.prediction_crf``, in ``seg.eval.workers`` processes). The default is one scale, no
flip, no CRF; the paper presets use the reference's protocol (whole views at scales 0.5-1.5, flip, CRF). Writes
``metrics/seg_<source>.json`` (mIoU, per-class IoU, precision, recall, pixel accuracy, split, GT-use
flags carried from the masks' provenance, the protocol under ``eval``) and ``reports/seg_<source>/``: a
confusion-matrix image, overlays of a fixed sample of val images and of the worst images by per-image mIoU.
Label-only data: only the val images with a GT mask are scored; with none (or, for ``gt``, no GT-trained
model: ``seg_train@gt``'s ``not_trained.json``) the metrics hold ``miou: null`` and ``not_scored`` says why,
the reports folder is empty.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from weakclip_core.artifacts.atomic import FolderContents, atomic_dir, check_output_dir, write_json
from weakclip_core.config import Params, SegEvalConfig, to_plain
from weakclip_core.data.layout import DatasetError, PreparedDataset
from weakclip_core.runtime.device import resolve_device, set_threads
from weakclip_core.method.inference import InferenceAugmentation, predict_label_batch, predict_reduced_batch
from weakclip_core.method.prediction_crf import crf_on_shown_job, shown_classes_on_device
from weakclip_core.runtime.processes import die_with_parent
from weakclip_core.evaluation.metrics import (NOT_SCORED_NO_GT, ConfusionAccumulator, confusion_matrix, image_miou,
                                              iou_report)
from weakclip_core.evaluation.overlays import evenly_spaced, lowest_scoring, save_confusion_matrix, save_overlay
from weakclip_core.artifacts.model_file import NOT_TRAINED_FILE
from weakclip_core.models.segmenter import load_segmenter

from pipeline._stage import StageSpec, require_input, run_stage, run_stage_cli

SOURCES: tuple[str, ...] = ("pseudo", "gt")
EVAL_BATCH = 16
WHOLE_VIEW = 1 << 16  # seg.eval.whole_image: a window this large covers any view whole (pad_to_crop off)
REPORT_CONTENTS = FolderContents(files=("*.png",))  # all seg_eval writes into reports/seg_<source>/


def protocol_record(evaluation: SegEvalConfig) -> dict[str, Any]:
    """How the figures were predicted, for the metrics file and the summary: scales, flip, the CRF (or None)."""
    return {"scales": list(evaluation.scales), "flip": evaluation.flip,
            **({"whole_image": True} if evaluation.whole_image else {}),
            "crf": to_plain(evaluation.crf) if evaluation.use_crf else None}


@dataclass(frozen=True)
class SegEvalPaths:
    """Where the stage reads and writes (dvc.yaml); tests point these into a temporary folder."""

    model_root: Path = Path("artifacts/seg")
    metrics_root: Path = Path("metrics")
    reports_root: Path = Path("reports")

    def model(self, source: str) -> Path:
        return self.model_root / source / "model.pt"

    def metrics(self, source: str) -> Path:
        return self.metrics_root / f"seg_{source}.json"

    def reports(self, source: str) -> Path:
        return self.reports_root / f"seg_{source}"


def naming_the_image(image_id: str, crf_prediction: Callable[[], np.ndarray]) -> np.ndarray:
    """``crf_prediction()``; an error it raises (in the stage or in a CRF worker) gets a note naming the image,
    which a worker's traceback does not."""
    try:
        return crf_prediction()
    except Exception as error:
        error.add_note(f"while making the CRF prediction of image {image_id}")
        raise


def evaluate_segmenter(params: Params, source: str, paths: SegEvalPaths = SegEvalPaths(), n_samples: int = 8,
                       n_worst: int = 8, show_progress: bool = True) -> dict[str, Any]:
    """Predict the val split, write the metrics file and the report images; returns the metrics dict."""
    if source not in SOURCES:
        raise ValueError(f"--source: expected one of {list(SOURCES)}, got {source!r}")
    check_output_dir(paths.reports(source), REPORT_CONTENTS,
                     reads={"dataset.prepared_dir": params.dataset.prepared_dir, "the segmenter": paths.model(source)})
    set_threads(params.runtime.threads)
    device = resolve_device(params.runtime.device)
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    split = params.dataset.val_split
    image_ids = dataset.split(split)
    not_trained = paths.model(source).parent / NOT_TRAINED_FILE
    scored_ids = [image_id for image_id in image_ids if dataset.has_mask(image_id)]
    if (not paths.model(source).is_file() and not_trained.is_file()) or not scored_ids:
        # label-only data: no GT-trained model, or no val GT to score against; the figure says why
        reason = (json.loads(not_trained.read_text()).get("not_trained", NOT_SCORED_NO_GT)
                  if not paths.model(source).is_file() and not_trained.is_file() else NOT_SCORED_NO_GT)
        metrics = {"miou": None, "not_scored": reason, "split": split, "n_images": 0, "source": source,
                   "threshold_chosen_with_gt": False, "gt_used_in_training": source == "gt"}
        with atomic_dir(paths.reports(source), REPORT_CONTENTS):
            pass
        write_json(paths.metrics(source), metrics)
        return metrics
    model, saved = load_segmenter(require_input(paths.model(source), f"seg_train@{source}"))
    record = saved["config"]
    if list(record["class_names"]) != dataset.class_names:
        raise DatasetError(f"{paths.model(source)}: trained for classes {record['class_names']}, but "
                           f"{dataset.root} has {dataset.class_names}")
    model = model.to(device)
    crop = int(record["seg"]["train"]["crop"])
    evaluation = params.seg.eval
    # whole_image: each view through the network whole, one window as large as the view and no padding
    window, stride = (WHOLE_VIEW, WHOLE_VIEW) if evaluation.whole_image else (crop, max(1, (2 * crop) // 3))
    views = InferenceAugmentation(scales=tuple(evaluation.scales), flip=evaluation.flip, crop=window, stride=stride,
                                  pad_to_crop=not evaluation.whole_image)
    n_without_gt = len(image_ids) - len(scored_ids)
    image_ids = scored_ids  # partial GT (label-only data): the val images that have a GT mask are scored

    accumulator = ConfusionAccumulator(dataset.n_classes)
    per_image_miou: dict[str, float] = {}
    report_ids = set(evenly_spaced(image_ids, n_samples))
    kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    worst_candidates: dict[str, np.ndarray] = {}
    progress = tqdm(total=len(image_ids), desc=f"seg_eval@{source}", unit="img", disable=not show_progress)

    def score_batch(batch_ids: list[str], images: list[np.ndarray], predictions: list[np.ndarray]) -> None:
        nonlocal worst_candidates
        for image_id, image, prediction in zip(batch_ids, images, predictions):
            ground_truth = dataset.checked_mask(image_id, image.shape[:2])
            confusion = confusion_matrix(ground_truth, prediction, dataset.n_classes)
            accumulator.confusion += confusion
            if image_id in report_ids:
                kept[image_id] = (image, ground_truth, prediction)
            score = image_miou(confusion)
            if score is None:  # a mask of ignore (255) only: never "worst"
                continue
            per_image_miou[image_id] = score
            worst_candidates[image_id] = prediction
            # Keep only the current worst predictions in memory.
            if len(worst_candidates) > 4 * max(1, n_worst) + EVAL_BATCH:
                keep = set(lowest_scoring({i: per_image_miou[i] for i in worst_candidates}, n_worst))
                worst_candidates = {i: p for i, p in worst_candidates.items() if i in keep}
        progress.update(len(batch_ids))

    with ExitStack() as stack:
        crf_pool = None
        if evaluation.use_crf and evaluation.workers > 0:
            crf_pool = ProcessPoolExecutor(max_workers=evaluation.workers,
                                           mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent)
            stack.callback(crf_pool.shutdown, wait=True, cancel_futures=True)
        # CRF batches in flight, oldest first: the workers run one batch's CRFs while the device infers the next
        # (scored in image order all the same, so the figures and the reports do not depend on the workers).
        in_flight: deque[tuple[list[str], list[np.ndarray], list[Future]]] = deque()

        def score_oldest_in_flight() -> None:
            done_ids, done_images, futures = in_flight.popleft()
            score_batch(done_ids, done_images, [naming_the_image(image_id, future.result)
                                                for image_id, future in zip(done_ids, futures)])

        for start in range(0, len(image_ids), EVAL_BATCH):
            batch_ids = image_ids[start:start + EVAL_BATCH]
            images = [dataset.image(image_id) for image_id in batch_ids]
            if evaluation.use_crf:  # only the classes the argmax shows leave the device, for the CRF workers
                shown = predict_reduced_batch(model, images, None, dataset.n_classes, views,
                                              lambda _, probability: shown_classes_on_device(probability),
                                              device, mean=record["mean"], std=record["std"],
                                              max_forward_batch=EVAL_BATCH)
                jobs = [(image, classes, rows, evaluation.crf) for image, (classes, rows) in zip(images, shown)]
                if crf_pool is None:
                    score_batch(batch_ids, images, [naming_the_image(image_id, partial(crf_on_shown_job, job))
                                                    for image_id, job in zip(batch_ids, jobs)])
                    continue
                in_flight.append((batch_ids, images, [crf_pool.submit(crf_on_shown_job, job) for job in jobs]))
                while len(in_flight) > 1:  # at most two batches' CRFs queued: one running, one waiting
                    score_oldest_in_flight()
            else:  # the argmax on the device: only the class map comes to the host
                score_batch(batch_ids, images, predict_label_batch(model, images, None, dataset.n_classes, views,
                                                                   device, mean=record["mean"], std=record["std"],
                                                                   max_forward_batch=EVAL_BATCH))
        while in_flight:
            score_oldest_in_flight()
    progress.close()

    report = iou_report(accumulator.confusion)
    provenance = saved.get("mask_provenance", {})
    metrics: dict[str, Any] = {
        "split": split,
        "n_images": len(image_ids),
        **({"n_images_without_gt": n_without_gt} if n_without_gt else {}),
        "source": source,
        "trained_on": "ground-truth masks (fully-supervised upper bound)" if source == "gt" else "pseudo masks",
        "model": record["seg"]["model"],
        "encoder": record["seg"]["encoder"],
        **report.as_dict(dataset.class_names),
        "threshold_chosen_with_gt": bool(provenance.get("threshold_chosen_with_gt", False)),
        "gt_used_in_training": source == "gt" or bool(provenance.get("gt_used", False)),
        "cam_variant": provenance.get("cam_variant"),
        "eval": protocol_record(evaluation),
    }
    with atomic_dir(paths.reports(source), REPORT_CONTENTS) as reports_dir:
        save_confusion_matrix(reports_dir / "confusion_matrix.png", accumulator.confusion, dataset.class_names,
                              title=f"seg@{source} on {split}: mIoU {100 * report.miou:.1f}")
        for image_id in sorted(kept):
            image, ground_truth, prediction = kept[image_id]
            save_overlay(reports_dir / f"sample_{image_id}.png", image, [("GT", ground_truth), ("prediction", prediction)],
                         caption=f"{image_id}  " + (f"mIoU {100 * per_image_miou[image_id]:.1f}"
                                                     if image_id in per_image_miou else "no pixel scored"))
        for rank, image_id in enumerate(lowest_scoring({i: per_image_miou[i] for i in worst_candidates}, n_worst)):
            save_overlay(reports_dir / f"worst_{rank}_{image_id}.png", dataset.image(image_id),
                         [("GT", dataset.mask(image_id)), ("prediction", worst_candidates[image_id])],
                         caption=f"{image_id}  mIoU {100 * per_image_miou[image_id]:.1f}")
    write_json(paths.metrics(source), metrics)
    return metrics


def summary_line(params: Params, args: argparse.Namespace, context: None) -> str:
    metrics = evaluate_segmenter(params, args.source)
    if metrics["miou"] is None:
        return f"seg_eval@{args.source}: {metrics['split']}: {metrics['not_scored']} -> {SegEvalPaths().metrics(args.source)}"
    return (f"seg_eval@{args.source}: {metrics['split']} mIoU {metrics['miou']:.4f} "  # a fraction, as every stage prints
            f"over {metrics['n_images']} images -> {SegEvalPaths().metrics(args.source)}")


SPEC = StageSpec(name="seg_eval", module="pipeline.seg_eval", description=__doc__.splitlines()[0], run=summary_line,
                 add_arguments=lambda parser: parser.add_argument("--source", choices=SOURCES, required=True,
                                                                  help="which trained segmenter to score"),
                 label=lambda args: f"seg_eval@{args.source}")


def main(argv: list[str] | None = None) -> int | None:
    return run_stage(SPEC, argv)

if __name__ == "__main__":
    run_stage_cli(main, "seg_eval")
