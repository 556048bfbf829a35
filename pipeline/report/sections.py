"""The report's sections drawn from metrics and logs: headline, stage table, per-class IoU, CAM threshold curve,
training curves and the dataset preview. Each returns HTML; a missing or unreadable input becomes one
line naming the file."""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
from PIL import Image

from pipeline.report.figures import array_png, cam_curve_png, training_curves_png
from pipeline.report.inputs import ReportInputs, read_json_file, read_numeric_table, training_curves
from pipeline.report.markup import escape, format_fraction, format_scalar, img_tag, missing_line
from pipeline.summary import gt_flag, trained_on_gt

# (metrics file stem, label, the summary.json key of the same number)
STAGES: list[tuple[str, str, str]] = [
    ("cam", "CAM seeds (MCTformer-V2)", "cam_miou"),
    ("weakclip", "WeakCLIP prediction", "weakclip_miou"),
    ("pseudo", "Pseudo masks (WeakCLIP + CRF)", "pseudo_miou"),
    ("seg_pseudo", "Segmenter retrained on pseudo masks", "seg_pseudo_miou"),
    ("seg_gt", "Segmenter trained on GT (upper bound)", "seg_gt_miou"),
]
SUMMARY_KEYS = ["cam_miou", "weakclip_miou", "pseudo_miou", "seg_pseudo_miou", "seg_gt_miou", "wsss_fsss_ratio"]

# The paper's numbers (docs/METHOD.md), as fractions, with the split they were measured on.
PAPER_REFERENCE: dict[str, dict[str, tuple[float, str]]] = {
    "voc": {"cam_miou": (0.617, "train (1,464)"), "pseudo_miou": (0.772, "train"),
            "seg_pseudo_miou": (0.740, "val"), "wsss_fsss_ratio": (0.95, "val vs FSSS DeepLabV2 77.7")},
    "coco": {"pseudo_miou": (0.484, "train"), "seg_pseudo_miou": (0.461, "val")},
}


def section_headline(inputs: ReportInputs) -> str:
    """``metrics/summary.json`` beside the paper's numbers for the same dataset."""
    path = inputs.resolve(inputs.metrics_dir) / "summary.json"
    summary, problem = read_json_file(path)
    parts = ["<h2>Headline</h2>"]
    if summary is None:
        return "".join(parts) + missing_line(f"{problem} — run `dvc repro summary`.")
    reference = PAPER_REFERENCE.get(inputs.dataset_name, {})
    rows = []

    def shown(key: str, value: Any) -> str:
        is_ratio = key == "wsss_fsss_ratio" and isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"{value:.3f}" if is_ratio else format_fraction(value)

    for key in SUMMARY_KEYS:
        paper = reference.get(key)
        paper_text = f"{shown(key, paper[0])} ({escape(paper[1])})" if paper else "—"
        value = summary.get(key)
        rows.append(f"<tr><td>{escape(key)}</td><td class=num>{shown(key, value)}</td>"
                    f"<td class=num>{paper_text}</td></tr>")
    pseudo, _ = read_json_file(inputs.resolve(inputs.metrics_dir) / "pseudo.json")
    gt_warning = ("<p class=missing>This chain's WeakCLIP trained on GT masks (<code>weakclip.seeds.source: "
                  "gt</code>): its pseudo-mask and segmenter-on-pseudo figures, and the ratio, are upper bounds that "
                  "use GT, not WSSS results to set beside the paper's.</p>"
                  if pseudo is not None and trained_on_gt(pseudo) else "")
    return "".join(parts) + ("<table><tr><th>key</th><th>ours (mIoU %)</th><th>paper</th></tr>"
                             + "".join(rows) + "</table>" + gt_warning
                             + "<p class=note>mIoU in percent; the ratio is seg_pseudo / seg_gt. "
                               "Paper numbers are from docs/METHOD.md on the real dataset.</p>")


def gt_column(metrics: dict[str, Any]) -> str:
    """The stage table's "GT used" cell: a threshold chosen with GT and / or training on GT masks, else no
    (read as RESULTS.md reads them: ``pipeline.summary``)."""
    uses = []
    if gt_flag(metrics):
        uses.append("threshold chosen with GT")
    if trained_on_gt(metrics):
        uses.append("trained on GT masks")
    return ", ".join(uses) if uses else "no"


def _stage_details(metrics: dict[str, Any]) -> str:
    """The scalar entries of a metrics file other than the mIoU (split, threshold, variant, ...)."""
    items = [f"{escape(key)}={format_scalar(value)}" for key, value in metrics.items()
             if key != "miou" and isinstance(value, (str, int, float, bool)) and not isinstance(value, dict)]
    return ", ".join(items[:12])


def stage_label(stem: str, label: str, metrics: dict[str, Any]) -> str:
    """The stage table's name for a metrics file: the CAM row says where its CAMs came from when they were
    imported (``cam.source: npy_folder``) or absent (``none``) rather than naming a model that never ran."""
    if stem == "cam" and metrics.get("variant") == "imported":
        source = metrics.get("source")
        return ("CAM seeds (imported MCTformer .npy dumps)" if source == "npy_folder"
                else f"CAM seeds (none: cam.source {source})")
    return label


def section_stages(inputs: ReportInputs) -> tuple[str, dict[str, dict[str, Any]]]:
    """The stage-by-stage mIoU table; returns the HTML and the metrics read (for per-class IoU)."""
    metrics_dir = inputs.resolve(inputs.metrics_dir)
    rows, missing_lines, read = [], [], {}
    for stem, label, _ in STAGES:
        metrics, problem = read_json_file(metrics_dir / f"{stem}.json")
        if metrics is None:
            missing_lines.append(missing_line(problem or ""))
            continue
        read[stem] = metrics
        split = metrics.get("split", "?")
        rows.append(f"<tr><td>{escape(stage_label(stem, label, metrics))}</td><td>{escape(split)}</td>"
                    f"<td class=num>{format_fraction(metrics.get('miou'))}</td>"
                    f"<td>{escape(gt_column(metrics))}</td>"
                    f"<td class=details>{_stage_details(metrics)}</td></tr>")
    html_text = "<h2>Stage by stage</h2>"
    if rows:
        html_text += ("<table><tr><th>stage</th><th>split</th><th>mIoU %</th><th>GT used</th><th>details</th></tr>"
                      + "".join(rows) + "</table>")
    return html_text + "".join(missing_lines), read


def section_per_class(read: dict[str, dict[str, Any]]) -> str:
    """Per-class IoU (%) of every stage whose metrics hold ``per_class``."""
    columns = [(stem, label) for stem, label, _ in STAGES
               if isinstance(read.get(stem, {}).get("per_class"), dict)]
    parts = ["<h2>Per-class IoU</h2>"]
    if not columns:
        return "".join(parts) + missing_line("no metrics file with per_class IoU yet (metrics/<stage>.json)")
    class_names: list[str] = []
    for stem, _ in columns:
        for name in read[stem]["per_class"]:
            if name not in class_names:
                class_names.append(name)
    header = "".join(f"<th>{escape(stem)}</th>" for stem, _ in columns)
    body = []
    for name in class_names:
        cells = "".join(f"<td class=num>{format_fraction(read[stem]['per_class'].get(name))}</td>"
                        for stem, _ in columns)
        body.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
    return "".join(parts) + f"<table><tr><th>class</th>{header}</tr>{''.join(body)}</table>"


def section_cam_curve(inputs: ReportInputs) -> str:
    """mIoU of the CAM seeds against the background threshold, best point marked."""
    path = inputs.resolve(inputs.cam_curve_csv)
    parts = ["<h2>CAM background-threshold curve</h2>"]
    if not path.is_file():
        return "".join(parts) + missing_line(f"{path}: not found (run the cam_infer stage)")
    try:
        columns = read_numeric_table(path, ",")
        thresholds, mious = np.asarray(columns["threshold"]), np.asarray(columns["miou"])
    except (OSError, KeyError, csv.Error) as error:
        return "".join(parts) + missing_line(f"{path}: unreadable (needs columns threshold, miou): {error}")
    finite = np.isfinite(thresholds) & np.isfinite(mious)
    if not finite.any():
        return "".join(parts) + missing_line(f"{path}: no numeric rows")
    return ("".join(parts) + img_tag(cam_curve_png(thresholds[finite], mious[finite]), "CAM threshold curve", "plot")
            + "<p class=note>The threshold is chosen with GT: an upper bound for the seeds, as in the paper.</p>")


def section_training(inputs: ReportInputs) -> str:
    """One figure per training stage, one panel per logged metric."""
    root = inputs.resolve(inputs.dvclive_dir)
    parts = ["<h2>Training curves</h2>"]
    stage_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not stage_dirs:
        return "".join(parts) + missing_line(f"{root}: no dvclive logs yet (run the training stages)")
    for stage_dir in stage_dirs:
        try:
            curves = training_curves(stage_dir)
        except (OSError, csv.Error) as error:
            parts.append(missing_line(f"{stage_dir}: unreadable dvclive plots ({error})"))
            continue
        if not curves:
            parts.append(missing_line(f"{stage_dir / 'plots' / 'metrics'}: no metric TSV files"))
            continue
        parts.append(f"<h3>{escape(stage_dir.name)}</h3>" + img_tag(training_curves_png(curves),
                                                                    f"{stage_dir.name} curves", "plot"))
    return "".join(parts)


def section_extra_images(inputs: ReportInputs) -> str:
    """The pictures in ``inputs.extra_images`` (the dataset preview), re-encoded and inlined."""
    parts = []
    for path in (inputs.resolve(p) for p in inputs.extra_images):
        if path.is_file():
            try:
                with Image.open(path) as opened:
                    png = array_png(np.asarray(opened.convert("RGB")))
            except OSError as error:
                parts.append(missing_line(f"{path}: unreadable ({error})"))
                continue
            parts.append(f"<h3>{escape(path.name)}</h3>" + img_tag(png, path.name, "plot"))
    return ("<h2>Dataset preview</h2>" + "".join(parts)) if parts else ""
