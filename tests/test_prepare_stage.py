"""The prepare stage end to end through ``main()`` on a tiny synthetic config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.prepare import main
from weakclip_core.data.layout import PreparedDataset


def test_main_writes_the_layout_and_preview(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    prepared_dir = tmp_path / "data" / "prepared" / "tiny"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"dataset": {
        "name": "synthetic", "seed": 3, "prepared_dir": str(prepared_dir),
        "synthetic": {"image_size": 48, "n_train": 6, "n_val": 3, "n_classes": 12, "workers": 1}}}))
    monkeypatch.chdir(tmp_path)
    main(["--params", str(params_file), "--no-progress"])
    main(["--params", str(params_file), "--no-progress"])  # a rerun replaces the folder whole

    assert sorted(p.name for p in prepared_dir.iterdir()) == ["ImageSets", "JPEGImages", "SegmentationClass",
                                                             "captions.txt", "labels.json"]
    assert sorted(p.name for p in prepared_dir.parent.iterdir()) == ["tiny"]  # no temporary folder left behind
    train_ids = (prepared_dir / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val_ids = (prepared_dir / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert (len(train_ids), len(val_ids)) == (6, 3)
    labels_file = json.loads((prepared_dir / "labels.json").read_text())
    assert labels_file["dataset"] == "synthetic" and len(labels_file["class_names"]) == 13
    assert set(labels_file["labels"]) == set(train_ids + val_ids)
    assert len((prepared_dir / "captions.txt").read_text().splitlines()) == 9
    dataset = PreparedDataset.open(prepared_dir)
    for image_id in train_ids + val_ids:
        assert dataset.image(image_id).shape == (48, 48, 3)
        assert dataset.mask(image_id).shape == (48, 48)

    preview = tmp_path / "reports" / "dataset_preview.png"
    with Image.open(preview) as picture:
        pixels = np.array(picture.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # images and masks, not a blank page
    assert np.all(pixels == (224, 224, 192), axis=-1).any()  # VOC's ignore colour: masks drawn in the palette

    printed = capsys.readouterr().out
    assert "train: 6, val: 3" in printed and "12 classes + background" in printed
