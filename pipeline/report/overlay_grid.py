"""The report's overlay grid: a fixed sample of train and val images, each beside its GT and every mask
the chain made of it (CAM seeds, pseudo mask, predictions of the trained models), with a colour legend.

The predictions come from running the trained models (``artifacts/weakclip``, ``artifacts/seg/<source>``)
single-scale on those few images; absent models or files become a note, not a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.report.figures import array_png, mask_overlay, scaled_tile
from pipeline.report.inputs import ReportInputs
from pipeline.report.markup import escape, img_tag, missing_line
from weakclip_core.artifacts.cam_store import CamStoreError, CamStoreReader
from weakclip_core.artifacts.weakclip import load_weakclip_model
from weakclip_core.data.layout import IGNORE_INDEX, DatasetError, PreparedDataset, read_mask
from weakclip_core.evaluation.overlays import evenly_spaced
from weakclip_core.evaluation.palette import VOC_COLOURS
from weakclip_core.method.inference import DenseModel, InferenceAugmentation, predict_image_batch
from weakclip_core.method.seeds import seeds_from_cams
from weakclip_core.models.segmenter import load_segmenter
from weakclip_core.runtime.device import resolve_device

SEGMENTER_LABELS = {"pseudo": "retrained on pseudo masks", "gt": "trained on GT"}


@dataclass
class MaskColumn:
    """One column of the overlay grid: a mask per image id (absent ids show a short note)."""

    label: str
    masks: dict[str, np.ndarray]
    absent_note: str = "not available"


def seed_column(inputs: ReportInputs, image_ids: list[str]) -> tuple[MaskColumn | None, str | None]:
    """Seed masks from the CAM store, made with ``weakclip.seeds`` (what weakclip_train trains on)."""
    path = inputs.resolve(inputs.cam_store)
    if not path.is_file():
        return None, f"{path}: not found (run the cam_infer stage); no 'CAM seeds' column"
    try:
        reader = CamStoreReader(path)
        seeds = {}
        for image_id in image_ids:
            if image_id in reader:
                classes, cams = reader.read(image_id)
                seeds[image_id] = seeds_from_cams(cams, classes, inputs.seed_config)
        reader.close()
    except (CamStoreError, OSError, ValueError) as error:
        return None, f"{path}: unreadable CAM store ({error}); no 'CAM seeds' column"
    return MaskColumn("CAM seeds", seeds, "not in store"), None


def mask_dir_column(label: str, directory: Path, image_ids: list[str]) -> tuple[MaskColumn | None, str | None]:
    """Masks written as ``<directory>/<image_id>.png`` (the pseudo masks)."""
    if not directory.is_dir():
        return None, f"{directory}: not found; no '{label}' column"
    masks = {}
    for image_id in image_ids:
        path = directory / f"{image_id}.png"
        if path.is_file():
            try:
                masks[image_id] = read_mask(path)
            except (OSError, ValueError) as error:
                return None, f"{path}: unreadable ({error}); no '{label}' column"
    return MaskColumn(label, masks, "not written"), None


def predicted_masks(model: DenseModel, images: list[np.ndarray], labels: list[list[int]] | None, n_classes: int,
                    crop: int, device: torch.device, mean: list[float] | None = None,
                    std: list[float] | None = None) -> list[np.ndarray]:
    """Single-scale sliding-window argmax masks (H, W) uint8 of a dense model (labels restrict the classes)."""
    views = InferenceAugmentation(scales=(1.0,), flip=False, crop=crop, stride=max(1, (2 * crop) // 3))
    normalisation = {"mean": mean, "std": std} if mean is not None and std is not None else {}
    masks = []
    for index, image in enumerate(images):  # one by one: sizes differ on real datasets
        image_labels = None if labels is None else [labels[index]]
        probabilities = predict_image_batch(model, [image], image_labels, n_classes, views, device, **normalisation)
        masks.append(probabilities[0].argmax(axis=0).astype(np.uint8))
    return masks


@dataclass
class TrainedModels:
    """The trained WeakCLIP and segmenters, loaded once for both splits (``None`` + a note when absent)."""

    weakclip: Any = None
    segmenters: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, inputs: ReportInputs, class_names: list[str]) -> "TrainedModels":
        loaded = cls()
        path = inputs.resolve(inputs.weakclip_model)
        if not path.is_file():
            loaded.notes.append(f"{path}: not found (run weakclip_train); no 'WeakCLIP prediction' column")
        else:
            try:
                model = load_weakclip_model(path)
                if list(model.class_names) != class_names:
                    raise ValueError(f"trained for classes {model.class_names[:4]}..., the dataset has "
                                     f"{class_names[:4]}...")
                loaded.weakclip = model
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                loaded.notes.append(f"{path}: cannot be loaded ({error}); no 'WeakCLIP prediction' column")
        for source, model_path in inputs.segmenter_models.items():
            path = inputs.resolve(model_path)
            if not path.is_file():
                loaded.notes.append(f"{path}: not found (run seg_train@{source}); no segmenter@{source} column")
                continue
            try:
                segmenter, saved = load_segmenter(path)
                if list(saved["config"]["class_names"]) != class_names:
                    raise ValueError(f"trained for classes {saved['config']['class_names'][:4]}...")
                loaded.segmenters[source] = (segmenter, saved["config"])
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                loaded.notes.append(f"{path}: cannot be loaded ({error}); no segmenter@{source} column")
        return loaded


def model_columns(models: TrainedModels, dataset: PreparedDataset, image_ids: list[str], restrict_to_labels: bool,
                  crop: int, device: torch.device) -> list[MaskColumn]:
    """Predictions of the trained models for ``image_ids``; WeakCLIP restricted to the image labels on train
    (as pseudo_masks runs it), every model unrestricted on val."""
    images = [dataset.image(image_id) for image_id in image_ids]
    columns = []
    with torch.inference_mode():
        if models.weakclip is not None:
            weakclip = models.weakclip.to(device)
            labels = [dataset.image_labels(i) for i in image_ids] if restrict_to_labels else None
            masks = predicted_masks(lambda batch: weakclip(batch).logits, images, labels, dataset.n_classes, crop,
                                    device)
            columns.append(MaskColumn("WeakCLIP prediction", dict(zip(image_ids, masks))))
        for source, (segmenter, record) in models.segmenters.items():
            masks = predicted_masks(segmenter.to(device), images, None, dataset.n_classes,
                                    int(record["seg"]["train"]["crop"]), device, record["mean"], record["std"])
            columns.append(MaskColumn(SEGMENTER_LABELS.get(source, source), dict(zip(image_ids, masks))))
    return columns


def _overlay_img(image: np.ndarray, mask: np.ndarray, alt: str) -> str:
    return img_tag(array_png(scaled_tile(mask_overlay(image, mask))), alt, "tile")


def overlay_table(dataset: PreparedDataset, image_ids: list[str], columns: list[MaskColumn]) -> str:
    """Rows: images; columns: image, GT, then each mask column, every tile an inlined PNG."""
    header = "<tr><th>id</th><th>image</th><th>GT</th>" + "".join(
        f"<th>{escape(column.label)}</th>" for column in columns) + "</tr>"
    rows = []
    for image_id in image_ids:
        image = dataset.image(image_id)
        cells = [img_tag(array_png(scaled_tile(image)), f"{image_id} image", "tile")]
        cells.append(_overlay_img(image, dataset.mask(image_id), f"{image_id} GT")
                     if dataset.has_mask(image_id) else "<span class=na>no GT</span>")
        for column in columns:
            mask = column.masks.get(image_id)
            cells.append(_overlay_img(image, mask, f"{image_id} {column.label}")
                         if mask is not None else f"<span class=na>{escape(column.absent_note)}</span>")
        rows.append(f"<tr><td>{escape(image_id)}</td>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return f"<table class=overlays>{header}{''.join(rows)}</table>"


def legend(class_names: list[str]) -> str:
    """A colour chip and name for every class, and for ignore (255)."""
    swatches = []
    for index, name in [*enumerate(class_names[:IGNORE_INDEX]), (IGNORE_INDEX, "ignore")]:
        red, green, blue = (int(v) for v in VOC_COLOURS[index])
        swatches.append(f'<span class=swatch><span class=chip style="background:rgb({red},{green},{blue})"></span>'
                        f"{index} {escape(name)}</span>")
    return "<p class=legend>" + " ".join(swatches) + "</p>"


def readable_images(dataset: PreparedDataset, image_ids: list[str]) -> tuple[list[str], list[str]]:
    """The ids whose image file reads, and a problem (naming the file) for each that does not: a missing or
    broken image in the sample becomes a line of the report, not a crash of the whole page."""
    readable, problems = [], []
    for image_id in image_ids:
        try:
            dataset.image(image_id)
        except (DatasetError, OSError) as error:
            problems.append(str(error))
        else:
            readable.append(image_id)
    return readable, problems


def section_overlays(inputs: ReportInputs) -> str:
    """A fixed sample of train images (image, GT, CAM seeds, WeakCLIP prediction, pseudo mask, retrained
    predictions) and of val images (image, GT, WeakCLIP and segmenter predictions)."""
    parts = ["<h2>Overlays</h2>"]
    prepared = inputs.resolve(inputs.prepared_dir) if inputs.prepared_dir else None
    if prepared is None or not prepared.is_dir():
        return "".join(parts) + missing_line(f"{prepared}: prepared dataset not found (run the prepare stage)")
    try:
        dataset = PreparedDataset.open(prepared)
        train_ids = evenly_spaced(dataset.split(inputs.train_split), inputs.n_samples)
        val_ids = evenly_spaced(dataset.split(inputs.val_split), inputs.n_samples)
    except (DatasetError, OSError, ValueError) as error:
        return "".join(parts) + missing_line(f"{prepared}: unreadable prepared dataset ({error})")
    parts.append(legend(dataset.class_names))
    device = resolve_device(inputs.device)
    models = TrainedModels.load(inputs, dataset.class_names)
    parts += [missing_line(note) for note in models.notes]
    parts.append("<p class=note>Predictions are single-scale, no CRF (the pseudo masks are the stage's "
                 "multi-scale + CRF output); on the train split WeakCLIP is restricted to the image's labels, "
                 "as the pseudo_masks stage runs it.</p>")
    for split, sampled_ids, is_train in ((inputs.train_split, train_ids, True), (inputs.val_split, val_ids, False)):
        parts.append(f"<h3>{escape(split)} split</h3>")
        image_ids, unreadable = readable_images(dataset, sampled_ids)
        parts += [missing_line(f"{problem}: left out of the sample") for problem in unreadable]
        columns: list[MaskColumn] = []
        if is_train:
            for column, problem in (seed_column(inputs, image_ids),
                                    mask_dir_column("pseudo mask", inputs.resolve(inputs.pseudo_dir), image_ids)):
                if column is not None:
                    columns.append(column)
                else:
                    parts.append(missing_line(problem or ""))
        try:
            columns += model_columns(models, dataset, image_ids, is_train, inputs.weakclip_crop, device)
        except (RuntimeError, ValueError) as error:
            parts.append(missing_line(f"predicting the {split} sample failed: {error}"))
        parts.append(overlay_table(dataset, image_ids, columns))
    return "".join(parts)
