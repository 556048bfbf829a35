"""``make report``: one self-contained, offline HTML page of the chain's results (``reports/index.html``).

Everything the page shows is inlined: plots are drawn with matplotlib to PNG
and embedded as base64 ``data:`` URIs, styles sit in one ``<style>`` element,
and there is no script, font or stylesheet from the network. The page opens
from a USB stick on a machine with no internet.

Sections, each drawn from whatever exists (a missing or unreadable input gets
one clear line naming the file, never a crash):

- the headline (``metrics/summary.json``) and the stage-by-stage mIoU table
  (``metrics/<stage>.json``), with the paper's number beside ours for VOC/COCO;
- per-class IoU of every stage that reports it;
- the CAM background-threshold curve (``plots/cam_threshold.csv``);
- training curves (``dvclive/<stage>/plots/metrics/**/*.tsv``);
- overlays for a fixed sample (``weakclip_core.evaluation.overlays.evenly_spaced``) of
  train images (image, GT, CAM seeds from the store, WeakCLIP prediction, pseudo
  mask, retrained predictions) and of val images (image, GT, predictions). The
  predictions come from running the trained models (``artifacts/weakclip``,
  ``artifacts/seg/<source>``) single-scale on those few images.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import torch  # noqa: E402

from weakclip_core.artifacts.atomic import atomic_path  # noqa: E402
from weakclip_core.artifacts.cam_store import CamStoreError, CamStoreReader  # noqa: E402
from weakclip_core.config import Params, SeedConfig, load_params  # noqa: E402
from weakclip_core.data.layout import DatasetError, PreparedDataset, read_mask, voc_palette  # noqa: E402
from weakclip_core.runtime.device import resolve_device  # noqa: E402
from weakclip_core.method.inference import DenseModel, InferenceAugmentation, predict_image_batch  # noqa: E402
from weakclip_core.evaluation.overlays import evenly_spaced  # noqa: E402
from weakclip_core.method.seeds import seeds_from_cams  # noqa: E402
from weakclip_core.models.segmenter import load_segmenter  # noqa: E402
from weakclip_core.artifacts.weakclip import load_weakclip_model  # noqa: E402

IGNORE_INDEX = 255
TILE_HEIGHT = 144

# (metrics file stem, label, the summary.json key of the same number)
STAGES: list[tuple[str, str, str]] = [
    ("cam", "CAM seeds (MCTformer-V2)", "cam_miou"),
    ("weakclip", "WeakCLIP prediction", "weakclip_miou"),
    ("pseudo", "Pseudo masks (WeakCLIP + CRF)", "pseudo_miou"),
    ("seg_pseudo", "Segmenter retrained on pseudo masks", "seg_pseudo_miou"),
    ("seg_gt", "Segmenter trained on GT (upper bound)", "seg_gt_miou"),
]
SUMMARY_KEYS = ["cam_miou", "weakclip_miou", "pseudo_miou", "seg_pseudo_miou", "seg_gt_miou", "wsss_fsss_ratio"]

# The paper's numbers (METHOD.md), as fractions, with the split they were measured on.
PAPER_REFERENCE: dict[str, dict[str, tuple[float, str]]] = {
    "voc": {"cam_miou": (0.617, "train (1,464)"), "pseudo_miou": (0.772, "train"),
            "seg_pseudo_miou": (0.740, "val"), "wsss_fsss_ratio": (0.95, "val vs FSSS DeepLabV2 77.7")},
    "coco": {"pseudo_miou": (0.484, "train"), "seg_pseudo_miou": (0.461, "val")},
}


@dataclass
class ReportInputs:
    """Where the report looks. ``from_params`` fills it from ``params.yaml`` and the dvc.yaml outputs."""

    root: Path
    dataset_name: str = "synthetic"
    metrics_dir: Path = Path("metrics")
    cam_curve_csv: Path = Path("plots/cam_threshold.csv")
    dvclive_dir: Path = Path("dvclive")
    prepared_dir: Path | None = None
    train_split: str = "train"
    val_split: str = "val"
    cam_store: Path = Path("artifacts/cams/train.h5")
    seed_config: SeedConfig = field(default_factory=SeedConfig)
    pseudo_dir: Path = Path("data/pseudo_masks")
    weakclip_model: Path = Path("artifacts/weakclip/model.pt")
    weakclip_crop: int = 128
    segmenter_models: dict[str, Path] = field(default_factory=lambda: {
        "pseudo": Path("artifacts/seg/pseudo/model.pt"), "gt": Path("artifacts/seg/gt/model.pt")})
    device: str = "auto"
    extra_images: list[Path] = field(default_factory=list)
    n_samples: int = 6

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.root / path

    @classmethod
    def from_params(cls, params: Params, root: Path, n_samples: int = 6) -> "ReportInputs":
        return cls(
            root=root,
            dataset_name=params.dataset.name,
            prepared_dir=Path(params.dataset.prepared_dir),
            train_split=params.dataset.train_split,
            val_split=params.dataset.val_split,
            seed_config=params.weakclip.seeds,
            pseudo_dir=Path(params.pseudo.output_dir),
            weakclip_crop=params.weakclip.train.crop,
            device=params.runtime.device,
            extra_images=[Path("reports/dataset_preview.png")],
            n_samples=n_samples,
        )


# --------------------------------------------------------------------------- small helpers

def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _missing(text: str) -> str:
    return f'<p class="missing">{_escape(text)}</p>'


def _png_data_uri(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def _img(png_bytes: bytes, alt: str, css_class: str = "") -> str:
    class_attr = f' class="{css_class}"' if css_class else ""
    return f'<img{class_attr} alt="{_escape(alt)}" src="{_png_data_uri(png_bytes)}">'


def _figure_png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _array_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _format_fraction(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—" if value is None else _escape(value)
    return f"{100.0 * value:.1f}"


def _format_scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _escape(value)


def read_json_file(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(data, None) or (None, a line saying why it could not be read)."""
    if not path.is_file():
        return None, f"{path}: not found (its stage has not run yet)"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return None, f"{path}: unreadable JSON ({error})"
    if not isinstance(data, dict):
        return None, f"{path}: expected a JSON object, got {type(data).__name__}"
    return data, None


# --------------------------------------------------------------------------- sections

def section_headline(inputs: ReportInputs) -> str:
    """``metrics/summary.json`` beside the paper's numbers for the same dataset."""
    path = inputs.resolve(inputs.metrics_dir) / "summary.json"
    summary, problem = read_json_file(path)
    parts = ["<h2>Headline</h2>"]
    if summary is None:
        return "".join(parts) + _missing(f"{problem} — run `dvc repro summary`.")
    reference = PAPER_REFERENCE.get(inputs.dataset_name, {})
    rows = []
    def shown(key: str, value: Any) -> str:
        is_ratio = key == "wsss_fsss_ratio" and isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"{value:.3f}" if is_ratio else _format_fraction(value)

    for key in SUMMARY_KEYS:
        paper = reference.get(key)
        paper_text = f"{shown(key, paper[0])} ({_escape(paper[1])})" if paper else "—"
        value = summary.get(key)
        rows.append(f"<tr><td>{_escape(key)}</td><td class=num>{shown(key, value)}</td>"
                    f"<td class=num>{paper_text}</td></tr>")
    return "".join(parts) + ("<table><tr><th>key</th><th>ours (mIoU %)</th><th>paper</th></tr>"
                             + "".join(rows) + "</table>"
                             + "<p class=note>mIoU in percent; the ratio is seg_pseudo / seg_gt. "
                               "Paper numbers are from METHOD.md on the real dataset.</p>")


def _stage_details(metrics: dict[str, Any]) -> str:
    """The scalar entries of a metrics file other than the mIoU (split, threshold, variant, ...)."""
    items = [f"{_escape(key)}={_format_scalar(value)}" for key, value in metrics.items()
             if key != "miou" and isinstance(value, (str, int, float, bool)) and not isinstance(value, dict)]
    return ", ".join(items[:12])


def section_stages(inputs: ReportInputs) -> tuple[str, dict[str, dict[str, Any]]]:
    """The stage-by-stage mIoU table; returns the HTML and the metrics read (for per-class IoU)."""
    metrics_dir = inputs.resolve(inputs.metrics_dir)
    rows, missing_lines, read = [], [], {}
    for stem, label, _ in STAGES:
        metrics, problem = read_json_file(metrics_dir / f"{stem}.json")
        if metrics is None:
            missing_lines.append(_missing(problem or ""))
            continue
        read[stem] = metrics
        split = metrics.get("split", "?")
        rows.append(f"<tr><td>{_escape(label)}</td><td>{_escape(split)}</td>"
                    f"<td class=num>{_format_fraction(metrics.get('miou'))}</td>"
                    f"<td class=details>{_stage_details(metrics)}</td></tr>")
    html_text = "<h2>Stage by stage</h2>"
    if rows:
        html_text += ("<table><tr><th>stage</th><th>split</th><th>mIoU %</th><th>details</th></tr>"
                      + "".join(rows) + "</table>")
    return html_text + "".join(missing_lines), read


def section_per_class(read: dict[str, dict[str, Any]]) -> str:
    """Per-class IoU (%) of every stage whose metrics hold ``per_class``."""
    columns = [(stem, label) for stem, label, _ in STAGES
               if isinstance(read.get(stem, {}).get("per_class"), dict)]
    parts = ["<h2>Per-class IoU</h2>"]
    if not columns:
        return "".join(parts) + _missing("no metrics file with per_class IoU yet (metrics/<stage>.json)")
    class_names: list[str] = []
    for stem, _ in columns:
        for name in read[stem]["per_class"]:
            if name not in class_names:
                class_names.append(name)
    header = "".join(f"<th>{_escape(stem)}</th>" for stem, _ in columns)
    body = []
    for name in class_names:
        cells = "".join(f"<td class=num>{_format_fraction(read[stem]['per_class'].get(name))}</td>"
                        for stem, _ in columns)
        body.append(f"<tr><td>{_escape(name)}</td>{cells}</tr>")
    return "".join(parts) + f"<table><tr><th>class</th>{header}</tr>{''.join(body)}</table>"


def read_numeric_table(path: Path, delimiter: str) -> dict[str, list[float]]:
    """Columns of a CSV/TSV with a header row, as floats (non-numeric cells become NaN)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames or []}
        for row in reader:
            for name in columns:
                try:
                    columns[name].append(float(row[name]))
                except (TypeError, ValueError):
                    columns[name].append(float("nan"))
    return columns


def section_cam_curve(inputs: ReportInputs) -> str:
    """mIoU of the CAM seeds against the background threshold, best point marked."""
    path = inputs.resolve(inputs.cam_curve_csv)
    parts = ["<h2>CAM background-threshold curve</h2>"]
    if not path.is_file():
        return "".join(parts) + _missing(f"{path}: not found (run the cam_infer stage)")
    try:
        columns = read_numeric_table(path, ",")
        thresholds, mious = np.asarray(columns["threshold"]), np.asarray(columns["miou"])
    except (OSError, KeyError, csv.Error) as error:
        return "".join(parts) + _missing(f"{path}: unreadable (needs columns threshold, miou): {error}")
    finite = np.isfinite(thresholds) & np.isfinite(mious)
    if not finite.any():
        return "".join(parts) + _missing(f"{path}: no numeric rows")
    thresholds, mious = thresholds[finite], mious[finite]
    best = int(np.argmax(mious))
    figure, axis = plt.subplots(figsize=(6.0, 3.2))
    axis.plot(thresholds, 100 * mious, color="#1f77b4")
    axis.scatter([thresholds[best]], [100 * mious[best]], color="#d62728", zorder=3,
                 label=f"best t={thresholds[best]:.2f}: {100 * mious[best]:.1f}")
    axis.set_xlabel("background threshold t")
    axis.set_ylabel("mIoU %")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    return ("".join(parts) + _img(_figure_png(figure), "CAM threshold curve", "plot")
            + "<p class=note>The threshold is chosen with GT: an upper bound for the seeds, as in the paper.</p>")


def training_curves(stage_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{metric name: (steps, values)}`` from dvclive's ``plots/metrics/**/*.tsv`` of one stage."""
    metrics_dir = stage_dir / "plots" / "metrics"
    curves = {}
    for tsv in sorted(metrics_dir.rglob("*.tsv")):
        columns = read_numeric_table(tsv, "\t")
        value_columns = [name for name in columns if name not in ("timestamp", "step")]
        if "step" not in columns or not value_columns:
            continue
        steps, values = np.asarray(columns["step"]), np.asarray(columns[value_columns[-1]])
        keep = np.isfinite(steps) & np.isfinite(values)
        if keep.any():
            curves[tsv.relative_to(metrics_dir).with_suffix("").as_posix()] = (steps[keep], values[keep])
    return curves


def section_training(inputs: ReportInputs) -> str:
    """One figure per training stage, one panel per logged metric."""
    root = inputs.resolve(inputs.dvclive_dir)
    parts = ["<h2>Training curves</h2>"]
    stage_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not stage_dirs:
        return "".join(parts) + _missing(f"{root}: no dvclive logs yet (run the training stages)")
    for stage_dir in stage_dirs:
        try:
            curves = training_curves(stage_dir)
        except (OSError, csv.Error) as error:
            parts.append(_missing(f"{stage_dir}: unreadable dvclive plots ({error})"))
            continue
        if not curves:
            parts.append(_missing(f"{stage_dir / 'plots' / 'metrics'}: no metric TSV files"))
            continue
        names = list(curves)[:12]
        n_columns = min(3, len(names))
        n_rows = math.ceil(len(names) / n_columns)
        figure, axes = plt.subplots(n_rows, n_columns, figsize=(4.0 * n_columns, 2.6 * n_rows), squeeze=False)
        for axis, name in zip(axes.ravel(), names):
            steps, values = curves[name]
            axis.plot(steps, values, linewidth=1.2)
            axis.set_title(name, fontsize=9)
            axis.set_xlabel("step", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
        for axis in axes.ravel()[len(names):]:
            axis.axis("off")
        figure.tight_layout()
        parts.append(f"<h3>{_escape(stage_dir.name)}</h3>" + _img(_figure_png(figure), f"{stage_dir.name} curves",
                                                                   "plot"))
    return "".join(parts)


# --------------------------------------------------------------------------- overlays

_PALETTE = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colour_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: the image with each labelled pixel tinted by its VOC palette colour.

    Background (0) stays the plain image; ignore (255) is tinted with its
    palette colour too so the unlabelled band of seeds is visible.
    """
    if mask.shape != image.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize((image.shape[1], image.shape[0]), Image.NEAREST))
    colours = _PALETTE[mask].astype(np.float32)
    blended = image.astype(np.float32)
    tinted = mask != 0
    blended[tinted] = (1 - alpha) * blended[tinted] + alpha * colours[tinted]
    return blended.clip(0, 255).astype(np.uint8)


def _tile(array: np.ndarray) -> np.ndarray:
    """Resize to TILE_HEIGHT rows, keeping the aspect ratio."""
    height, width = array.shape[:2]
    new_width = max(1, round(width * TILE_HEIGHT / height))
    return np.asarray(Image.fromarray(array).resize((new_width, TILE_HEIGHT), Image.BILINEAR))


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


SEGMENTER_LABELS = {"pseudo": "retrained on pseudo masks", "gt": "trained on GT"}


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


def overlay_table(dataset: PreparedDataset, image_ids: list[str], columns: list[MaskColumn]) -> str:
    """Rows: images; columns: image, GT, then each mask column, every tile an inlined PNG."""
    header = "<tr><th>id</th><th>image</th><th>GT</th>" + "".join(
        f"<th>{_escape(column.label)}</th>" for column in columns) + "</tr>"
    rows = []
    for image_id in image_ids:
        image = dataset.image(image_id)
        cells = [_img(_array_png(_tile(image)), f"{image_id} image", "tile")]
        cells.append(_img(_array_png(_tile(colour_overlay(image, dataset.mask(image_id)))), f"{image_id} GT", "tile")
                     if dataset.has_mask(image_id) else "<span class=na>no GT</span>")
        for column in columns:
            mask = column.masks.get(image_id)
            cells.append(_img(_array_png(_tile(colour_overlay(image, mask))), f"{image_id} {column.label}", "tile")
                         if mask is not None else f"<span class=na>{_escape(column.absent_note)}</span>")
        rows.append(f"<tr><td>{_escape(image_id)}</td>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return f"<table class=overlays>{header}{''.join(rows)}</table>"


def _legend(class_names: list[str]) -> str:
    swatches = []
    for index, name in [*enumerate(class_names[:IGNORE_INDEX]), (IGNORE_INDEX, "ignore")]:
        red, green, blue = (int(v) for v in _PALETTE[index])
        swatches.append(f'<span class=swatch><span class=chip style="background:rgb({red},{green},{blue})"></span>'
                        f"{index} {_escape(name)}</span>")
    return "<p class=legend>" + " ".join(swatches) + "</p>"


def section_overlays(inputs: ReportInputs) -> str:
    """A fixed sample of train images (image, GT, CAM seeds, WeakCLIP prediction, pseudo mask, retrained
    predictions) and of val images (image, GT, WeakCLIP and segmenter predictions)."""
    parts = ["<h2>Overlays</h2>"]
    prepared = inputs.resolve(inputs.prepared_dir) if inputs.prepared_dir else None
    if prepared is None or not prepared.is_dir():
        return "".join(parts) + _missing(f"{prepared}: prepared dataset not found (run the prepare stage)")
    try:
        dataset = PreparedDataset.open(prepared)
        train_ids = evenly_spaced(dataset.split(inputs.train_split), inputs.n_samples)
        val_ids = evenly_spaced(dataset.split(inputs.val_split), inputs.n_samples)
    except (DatasetError, OSError, ValueError) as error:
        return "".join(parts) + _missing(f"{prepared}: unreadable prepared dataset ({error})")
    parts.append(_legend(dataset.class_names))
    device = resolve_device(inputs.device)
    models = TrainedModels.load(inputs, dataset.class_names)
    parts += [_missing(note) for note in models.notes]
    parts.append("<p class=note>Predictions are single-scale, no CRF (the pseudo masks are the stage's "
                 "multi-scale + CRF output); on the train split WeakCLIP is restricted to the image's labels, "
                 "as the pseudo_masks stage runs it.</p>")
    for split, image_ids, is_train in ((inputs.train_split, train_ids, True), (inputs.val_split, val_ids, False)):
        parts.append(f"<h3>{_escape(split)} split</h3>")
        columns: list[MaskColumn] = []
        if is_train:
            for column, problem in (seed_column(inputs, image_ids),
                                    mask_dir_column("pseudo mask", inputs.resolve(inputs.pseudo_dir), image_ids)):
                if column is not None:
                    columns.append(column)
                else:
                    parts.append(_missing(problem or ""))
        try:
            columns += model_columns(models, dataset, image_ids, is_train, inputs.weakclip_crop, device)
        except (RuntimeError, ValueError) as error:
            parts.append(_missing(f"predicting the {split} sample failed: {error}"))
        parts.append(overlay_table(dataset, image_ids, columns))
    return "".join(parts)


def section_extra_images(inputs: ReportInputs) -> str:
    parts = []
    for path in (inputs.resolve(p) for p in inputs.extra_images):
        if path.is_file():
            try:
                with Image.open(path) as opened:
                    png = _array_png(np.asarray(opened.convert("RGB")))
            except OSError as error:
                parts.append(_missing(f"{path}: unreadable ({error})"))
                continue
            parts.append(f"<h3>{_escape(path.name)}</h3>" + _img(png, path.name, "plot"))
    return ("<h2>Dataset preview</h2>" + "".join(parts)) if parts else ""


# --------------------------------------------------------------------------- the page

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; max-width: 1240px; }
h1 { font-size: 24px; } h2 { font-size: 19px; border-bottom: 1px solid #ccc; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #eef2f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.details { font-size: 11px; color: #555; max-width: 520px; }
.missing { color: #a40000; background: #fff3f3; border-left: 4px solid #d33; padding: 4px 8px; }
.note { color: #555; font-size: 12px; } .na { color: #999; font-size: 11px; }
img.plot { max-width: 100%; } img.tile { height: 144px; display: block; }
.swatch { display: inline-block; margin-right: 10px; font-size: 12px; }
.chip { display: inline-block; width: 12px; height: 12px; margin-right: 3px; border: 1px solid #888; }
"""


def build_report(inputs: ReportInputs) -> str:
    """The whole page as one HTML string (no external reference of any kind)."""
    stages_html, read = section_stages(inputs)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>weakclip-pipeline report — {_escape(inputs.dataset_name)}</h1>",
        f"<p class=note>Generated {generated} from {_escape(inputs.root)}.</p>",
        section_headline(inputs), stages_html, section_per_class(read), section_cam_curve(inputs),
        section_training(inputs), section_overlays(inputs), section_extra_images(inputs),
    ]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>weakclip-pipeline report — {_escape(inputs.dataset_name)}</title>"
            f"<style>{STYLE}</style></head><body>" + "".join(body) + "</body></html>\n")


def write_report(inputs: ReportInputs, output: Path) -> Path:
    """Build and write the page atomically; returns ``output``."""
    page = build_report(inputs)
    with atomic_path(output, suffix=".html") as temporary:
        temporary.write_text(page, encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder holding metrics/, plots/, ...")
    parser.add_argument("--output", type=Path, default=Path("reports/index.html"))
    parser.add_argument("--samples", type=int, default=6, help="images per split in the overlay grid")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    params_path = args.params if args.params.is_absolute() else root / args.params
    inputs = ReportInputs.from_params(load_params(params_path), root, n_samples=args.samples)
    output = args.output if args.output.is_absolute() else root / args.output
    write_report(inputs, output)
    print(f"report: {output} ({output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
