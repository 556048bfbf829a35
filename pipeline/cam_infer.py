"""Stage ``cam_infer``: MCTformer-V2 CAM seeds for the train split, scored over the whole threshold curve.

Runs the trained model at ``cam.infer.scales`` (with horizontal flip), writes
the ``cam.infer.variant`` CAMs of every train image to ``artifacts/cams/train.h5``
and, in the same pass, scores all four variants against the ground truth for
every background threshold (docs/METHOD.md §1) on ``dataset.score_split`` (default: the
train split; VOC's ``train`` inside ``train_aug``). The best threshold is chosen with
the GT, and the metrics file says so. With no GT mask on that split (label-only data) the CAMs are still
written and ``metrics/cam.json`` holds ``miou: null`` and ``not_scored: "not scored: no GT"``.
``cam.source: npy_folder`` imports MCTformer's CAM dumps instead of running a model (same store, same curve);
``none`` writes an empty store (seeds from ``weakclip.seeds.mask_folder``).
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from weakclip_core.artifacts.atomic import remove_stale_temporaries, write_json, write_text
from weakclip_core.method.cam import CAM_VARIANTS, ThresholdSweep, multiscale_cams, threshold_values
from weakclip_core.artifacts.cam_store import CamStoreWriter
from weakclip_core.config import Params, to_plain
from weakclip_core.errors import InputError
from weakclip_core.data.imports import read_mctformer_cam
from weakclip_core.data.layout import PreparedDataset, read_image_size
from weakclip_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from weakclip_core.evaluation.metrics import NOT_SCORED_NO_GT
from weakclip_core.runtime.device import resolve_device, set_threads
from weakclip_core.method.inference import normalise_images
from weakclip_core.models.mctformer import load_trained_mctformer
from weakclip_core.models.reference_checkpoints import ReferenceCheckpointError, load_reference_mctformer

from pipeline._stage import StageSpec, require_input, run_stage, run_stage_cli

STAGE = "cam_infer"
IMPORTED_VARIANT = "imported"  # metrics/cam.json's variant when the CAMs come from cam.npy_folder


@dataclass(frozen=True)
class CamInferPaths:
    """What the stage reads and writes (dvc.yaml); tests point these into a temporary folder."""

    model: Path = Path("artifacts/mctformer/model.pt")
    store: Path = Path("artifacts/cams/train.h5")
    metrics: Path = Path("metrics/cam.json")
    curve: Path = Path("plots/cam_threshold.csv")


def image_batches(image_ids: list[str], dataset: PreparedDataset, batch_size: int):
    """Yield lists of (image_id, (H, W, 3) uint8) of one image size, at most ``batch_size`` long, in id order."""
    pending: list[tuple[str, np.ndarray]] = []
    for image_id in image_ids:
        image = dataset.image(image_id)
        if pending and (image.shape != pending[0][1].shape or len(pending) == batch_size):
            yield pending
            pending = []
        pending.append((image_id, image))
    if pending:
        yield pending


def curve_csv(thresholds: np.ndarray, selected: str, curves: dict[str, list[float]]) -> str:
    """``threshold,miou,<variant>...``: ``miou`` is the selected variant's curve."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["threshold", "miou", *CAM_VARIANTS])
    for index, threshold in enumerate(thresholds):
        writer.writerow([f"{threshold:.4f}", f"{curves[selected][index]:.6f}",
                         *(f"{curves[variant][index]:.6f}" for variant in CAM_VARIANTS)])
    return stream.getvalue()


def import_cams(params: Params, paths: CamInferPaths, dataset: PreparedDataset, show_progress: bool) -> dict[str, Any]:
    """``cam.source: npy_folder``: MCTformer's CAM dumps into the CAM store, scored over the same threshold curve
    (column ``imported``); ``none``: an empty, complete store that says so. Every dump is checked (keys = the
    image's labels, maps at the image's size) before the store is renamed into place."""
    infer, source = params.cam.infer, params.cam.source
    split, score_split = params.dataset.train_split, params.dataset.scored_split
    image_ids = dataset.split(split) if source == "npy_folder" else []
    scored_ids = set(dataset.scored_ids(split, score_split))
    thresholds = threshold_values(infer.threshold_start, infer.threshold_stop, infer.threshold_step)
    sweep = ThresholdSweep(dataset.n_classes, thresholds)
    folder = Path(params.cam.npy_folder)
    record = {"source": source, "split": split, **({"npy_folder": str(folder)} if source == "npy_folder" else {})}
    n_scored = 0
    with CamStoreWriter(paths.store, dataset.name, dataset.class_names, record) as writer:
        for image_id in tqdm(image_ids, desc=f"{STAGE} import", unit="img", disable=not show_progress):
            classes = dataset.image_labels(image_id)
            image_shape = read_image_size(dataset.image_path(image_id))
            cams = read_mctformer_cam(folder / f"{image_id}.npy", classes, image_shape)
            writer.add(image_id, classes, cams)
            if image_id in scored_ids and dataset.has_mask(image_id):
                sweep.add(dataset.checked_mask(image_id, image_shape), cams, classes)
                n_scored += 1
    common = {"split": score_split, "predicted_split": split, "variant": IMPORTED_VARIANT, "source": source,
              "n_images": n_scored, "variants": None}
    if n_scored == 0:
        reason = NOT_SCORED_NO_GT if source == "npy_folder" else "not scored: no CAMs (cam.source: none)"
        metrics = {"miou": None, "not_scored": reason, "best_threshold": None, "per_class": None,
                   "threshold_chosen_with_gt": False, **common}
        write_json(paths.metrics, metrics)
        write_text(paths.curve, "threshold,miou\n")
        return metrics
    best_threshold, report = sweep.best()
    metrics = {"miou": report.miou, "best_threshold": best_threshold,
               "per_class": dict(zip(dataset.class_names, report.per_class)), "threshold_chosen_with_gt": True,
               **common}
    write_json(paths.metrics, metrics)
    curve = sweep.curve()
    write_text(paths.curve, "threshold,miou\n" + "".join(f"{threshold:.4f},{curve[index]:.6f}\n"
                                                         for index, threshold in enumerate(thresholds)))
    return metrics


def infer_cams(params: Params, paths: CamInferPaths = CamInferPaths(), show_progress: bool = True) -> dict[str, Any]:
    """Write the CAM store, the metrics and the threshold curve; returns the metrics dict."""
    infer = params.cam.infer
    set_threads(params.runtime.threads)
    device = resolve_device(params.runtime.device)
    for output in (paths.store, paths.metrics, paths.curve):  # a killed earlier run's temporaries
        remove_stale_temporaries(output.parent, output.name)
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    if params.cam.source in ("npy_folder", "none"):
        return import_cams(params, paths, dataset, show_progress)
    if params.cam.source == "checkpoint":  # a released MCTformer-V2 checkpoint (the reference's key layout)
        model = load_reference_mctformer(params.cam.checkpoint, heads=params.cam.arch.heads).to(device)
        if model.n_classes != dataset.n_classes - 1:
            raise ReferenceCheckpointError(f"{params.cam.checkpoint}: an MCTformer-V2 of {model.n_classes} classes, "
                                           f"the dataset {dataset.root} has {dataset.n_classes - 1}")
        saved = {"config": {"arch": {"checkpoint": params.cam.checkpoint, "image_size": model.train_grid
                                     * model.patch_size, "patch_size": model.patch_size, "depth": len(model.blocks)}},
                 "class_names": dataset.class_names, "steps": None}
    else:
        model, saved = load_trained_mctformer(require_input(paths.model, "cam_train"), device)
    if saved.get("class_names", dataset.class_names) != dataset.class_names:
        raise InputError(f"{paths.model}: trained for classes {saved['class_names']}, the dataset "
                         f"{dataset.root} has {dataset.class_names} (re-run cam_train)")
    split = params.dataset.train_split
    image_ids = dataset.split(split)
    score_split = params.dataset.scored_split
    scored_ids = set(dataset.scored_ids(split, score_split))
    thresholds = threshold_values(infer.threshold_start, infer.threshold_stop, infer.threshold_step)
    sweeps = {variant: ThresholdSweep(dataset.n_classes, thresholds) for variant in CAM_VARIANTS}
    n_scored = 0
    record = {"cam_infer": to_plain(infer), "arch": saved["config"]["arch"], "split": split,
              "model_steps": saved.get("steps")}
    with CamStoreWriter(paths.store, dataset.name, dataset.class_names, record) as writer:
        progress = tqdm(total=len(image_ids), desc=STAGE, unit="img", disable=not show_progress)
        for batch in image_batches(image_ids, dataset, infer.batch_size):
            image_classes = [dataset.image_labels(image_id) for image_id, _ in batch]
            images = normalise_images([image for _, image in batch], IMAGENET_MEAN, IMAGENET_STD).to(device)
            cams = multiscale_cams(model, images, image_classes, infer.scales, infer.flip, infer.attention_layers)
            cams = {variant: maps.cpu().numpy() for variant, maps in cams.items()}
            for row, ((image_id, image), classes) in enumerate(zip(batch, image_classes)):
                labelled = slice(0, len(classes))  # the image's classes' maps, in its label order
                writer.add(image_id, classes, np.clip(cams[infer.variant][row, labelled], 0.0, 1.0))
                if image_id in scored_ids and dataset.has_mask(image_id):
                    ground_truth = dataset.checked_mask(image_id, image.shape[:2])
                    for variant in CAM_VARIANTS:
                        sweeps[variant].add(ground_truth, cams[variant][row, labelled], classes)
                    n_scored += 1
            progress.update(len(batch))
        progress.close()
    if n_scored == 0:  # label-only data: the CAMs are written, the figures say why there are none
        metrics = {"miou": None, "not_scored": NOT_SCORED_NO_GT, "best_threshold": None, "per_class": None,
                   "split": score_split, "predicted_split": split, "variant": infer.variant,
                   "threshold_chosen_with_gt": False, "n_images": 0, "scales": list(infer.scales),
                   "flip": infer.flip, "variants": None}
        write_json(paths.metrics, metrics)
        write_text(paths.curve, curve_csv(np.zeros(0), infer.variant, {}))
        return metrics

    curves = {variant: sweeps[variant].curve() for variant in CAM_VARIANTS}
    best = {variant: sweeps[variant].best() for variant in CAM_VARIANTS}
    best_threshold, report = best[infer.variant]
    metrics = {
        "miou": report.miou,
        "best_threshold": best_threshold,
        "per_class": dict(zip(dataset.class_names, report.per_class)),
        "split": score_split,
        "predicted_split": split,
        "variant": infer.variant,
        "threshold_chosen_with_gt": True,
        "n_images": n_scored,
        "scales": list(infer.scales),
        "flip": infer.flip,
        "variants": {variant: {"miou": best[variant][1].miou, "best_threshold": best[variant][0]}
                     for variant in CAM_VARIANTS},
    }
    write_json(paths.metrics, metrics)
    write_text(paths.curve, curve_csv(thresholds, infer.variant, curves))
    return metrics


def summary_line(params: Params, args: argparse.Namespace, context: None) -> str:
    metrics = infer_cams(params)
    if metrics["miou"] is None:
        return f"{STAGE}: CAMs of split {metrics['predicted_split']} written; {metrics['not_scored']}"
    if metrics["variants"] is None:
        return (f"{STAGE}: imported CAMs, {metrics['split']} mIoU {metrics['miou']:.3f} "
                f"@ t={metrics['best_threshold']:.2f} over {metrics['n_images']} images")
    summary = ", ".join(f"{variant} {values['miou']:.3f} @ {values['best_threshold']:.2f}"
                        for variant, values in metrics["variants"].items())
    return (f"{STAGE}: {metrics['split']} mIoU ({metrics['variant']}) {metrics['miou']:.3f} "
            f"@ t={metrics['best_threshold']:.2f} over {metrics['n_images']} images; {summary}")


SPEC = StageSpec(name=STAGE, module="pipeline.cam_infer", description=__doc__.splitlines()[0], run=summary_line)


def main(argv: list[str] | None = None) -> int | None:
    return run_stage(SPEC, argv)

if __name__ == "__main__":
    run_stage_cli(main, "cam_infer")
