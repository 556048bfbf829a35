"""Where the report looks, and the readers of its inputs (metrics JSON, CSV/TSV curves, dvclive logs).

Readers report a missing or broken file as a value or a message, never by crashing the page.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weakclip_core.config import Params, SeedConfig


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
