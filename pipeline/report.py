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
- overlays for a fixed sample of train images (image, GT, CAM seeds, WeakCLIP
  prediction, pseudo mask) and val images (image, GT, retrained predictions).
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

from weakclip_core.atomic import atomic_path  # noqa: E402
from weakclip_core.config import Params, SeedConfig, load_params  # noqa: E402
from weakclip_core.data.layout import read_image, read_mask, read_split, voc_palette  # noqa: E402

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


@dataclass(frozen=True)
class OverlaySource:
    """One column of the overlay grid: masks named ``<image_id>.png`` in ``directory``."""

    label: str
    directory: Path


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
    train_sources: list[OverlaySource] = field(default_factory=list)
    val_sources: list[OverlaySource] = field(default_factory=list)
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
            train_sources=[OverlaySource("WeakCLIP prediction", Path("reports/pseudo/predictions")),
                           OverlaySource("pseudo mask", Path(params.pseudo.output_dir))],
            val_sources=[OverlaySource("retrained on pseudo", Path("reports/seg_pseudo/predictions")),
                         OverlaySource("trained on GT", Path("reports/seg_gt/predictions"))],
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


def fixed_sample(image_ids: list[str], count: int) -> list[str]:
    """``count`` ids evenly spaced over the split (first and last included): the same every run."""
    if count <= 0 or not image_ids:
        return []
    if count >= len(image_ids):
        return list(image_ids)
    if count == 1:
        return [image_ids[0]]
    return [image_ids[round(i * (len(image_ids) - 1) / (count - 1))] for i in range(count)]


def _seed_masks(inputs: ReportInputs, image_ids: list[str]) -> tuple[dict[str, np.ndarray], str | None]:
    """Seed masks of ``image_ids`` from the CAM store (what weakclip_train trains on)."""
    path = inputs.resolve(inputs.cam_store)
    if not path.is_file():
        return {}, f"{path}: not found (run the cam_infer stage); no seed column"
    from weakclip_core.cam_store import CamStoreError, CamStoreReader
    from weakclip_core.seeds import seeds_from_cams
    try:
        reader = CamStoreReader(path)
        seeds = {}
        for image_id in image_ids:
            if image_id in reader:
                classes, cams = reader.read(image_id)
                seeds[image_id] = seeds_from_cams(cams, classes, inputs.seed_config)
        reader.close()
    except (CamStoreError, OSError, ValueError) as error:
        return {}, f"{path}: unreadable CAM store ({error}); no seed column"
    return seeds, None


def _overlay_table(inputs: ReportInputs, split: str, sources: list[OverlaySource], with_seeds: bool) -> str:
    """Rows: a fixed sample of ``split``; columns: image, GT, (seeds), each source that has the image."""
    prepared = inputs.resolve(inputs.prepared_dir) if inputs.prepared_dir else None
    title = f"<h3>{_escape(split)} split</h3>"
    if prepared is None or not prepared.is_dir():
        return title + _missing(f"{prepared}: prepared dataset not found (run the prepare stage)")
    try:
        image_ids = fixed_sample(read_split(prepared, split), inputs.n_samples)
    except ValueError as error:
        return title + _missing(str(error))
    notes: list[str] = []
    seeds: dict[str, np.ndarray] = {}
    if with_seeds:
        seeds, problem = _seed_masks(inputs, image_ids)
        if problem:
            notes.append(_missing(problem))
    present_sources = []
    for source in sources:
        directory = inputs.resolve(source.directory)
        if directory.is_dir():
            present_sources.append((source.label, directory))
        else:
            notes.append(_missing(f"{directory}: not found; no '{source.label}' column"))
    columns = ["image", "GT"] + (["CAM seeds"] if with_seeds and seeds else []) + [l for l, _ in present_sources]
    header = "<tr><th>id</th>" + "".join(f"<th>{_escape(c)}</th>" for c in columns) + "</tr>"
    rows = []
    for image_id in image_ids:
        image_path = prepared / "JPEGImages" / f"{image_id}.jpg"
        try:
            image = read_image(image_path)
        except (OSError, ValueError) as error:
            notes.append(_missing(f"{image_path}: unreadable ({error})"))
            continue
        cells = [_img(_array_png(_tile(image)), f"{image_id} image", "tile")]
        mask_path = prepared / "SegmentationClass" / f"{image_id}.png"
        cells.append(_img(_array_png(_tile(colour_overlay(image, read_mask(mask_path)))), f"{image_id} GT", "tile")
                     if mask_path.is_file() else "<span class=na>no GT</span>")
        if "CAM seeds" in columns:
            cells.append(_img(_array_png(_tile(colour_overlay(image, seeds[image_id]))), f"{image_id} seeds", "tile")
                         if image_id in seeds else "<span class=na>not in store</span>")
        for label, directory in present_sources:
            predicted = directory / f"{image_id}.png"
            cells.append(_img(_array_png(_tile(colour_overlay(image, read_mask(predicted)))), f"{image_id} {label}",
                              "tile") if predicted.is_file() else "<span class=na>not written</span>")
        rows.append(f"<tr><td>{_escape(image_id)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = f"<table class=overlays>{header}{''.join(rows)}</table>" if rows else ""
    return title + "".join(notes) + table


def _legend(inputs: ReportInputs) -> str:
    prepared = inputs.resolve(inputs.prepared_dir) if inputs.prepared_dir else None
    labels_path = prepared / "labels.json" if prepared else None
    data, _ = read_json_file(labels_path) if labels_path else (None, None)
    if not data or not isinstance(data.get("class_names"), list):
        return ""
    swatches = []
    for index, name in enumerate(data["class_names"][:IGNORE_INDEX]):
        red, green, blue = (int(v) for v in _PALETTE[index])
        swatches.append(f'<span class=swatch><span class=chip style="background:rgb({red},{green},{blue})"></span>'
                        f"{index} {_escape(name)}</span>")
    red, green, blue = (int(v) for v in _PALETTE[IGNORE_INDEX])
    swatches.append(f'<span class=swatch><span class=chip style="background:rgb({red},{green},{blue})"></span>'
                    "255 ignore</span>")
    return "<p class=legend>" + " ".join(swatches) + "</p>"


def section_overlays(inputs: ReportInputs) -> str:
    parts = ["<h2>Overlays</h2>", _legend(inputs)]
    parts.append(_overlay_table(inputs, inputs.train_split, inputs.train_sources, with_seeds=True))
    parts.append(_overlay_table(inputs, inputs.val_split, inputs.val_sources, with_seeds=False))
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
