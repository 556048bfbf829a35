"""The offline HTML report: built from hand-made inputs, parsed for external references, rendered in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.report import write_report
from pipeline.report.figures import mask_overlay
from pipeline.report.inputs import ReportInputs, training_curves
from pipeline.report.overlay_grid import TrainedModels, legend, model_columns
from weakclip_core.artifacts.cam_store import CamStoreWriter
from weakclip_core.models.clip import build_clip, load_clip_artifact, save_clip_artifact
from weakclip_core.config import ClipArchConfig, ClipConfig, SeedConfig, SegConfig, SegTrainConfig, WeakClipConfig
from weakclip_core.data.layout import PreparedDataset, write_image, write_labels, write_mask, write_split
from weakclip_core.evaluation.palette import blend
from weakclip_core.models.weakclip import WeakCLIP
from weakclip_core.models.segmenter import build_segmenter, segmenter_record
from weakclip_core.artifacts.model_file import save_final_model
from weakclip_core.artifacts.weakclip import save_weakclip_model

CLASS_NAMES = ["background", "cat", "dog"]


class ReferenceCollector(HTMLParser):
    """Every src/href attribute, every tag name, and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data") and value is not None:
                self.references.append((tag, name, value))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _square_mask(size: int, label: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top:top + side, left:left + side] = label
    return mask


def make_project(root: Path) -> ReportInputs:
    """A tiny project: 4 train + 2 val images, metrics, a CAM curve, dvclive logs, a CAM store, pseudo masks."""
    prepared = root / "data" / "prepared" / "toy"
    rng = np.random.default_rng(0)
    train_ids, val_ids = [f"t{i}" for i in range(4)], [f"v{i}" for i in range(2)]
    labels = {}
    masks = {}
    for index, image_id in enumerate(train_ids + val_ids):
        label = 1 + index % 2
        mask = _square_mask(48, label, 8 + index, 10, 24)
        image = (rng.uniform(0, 60, (48, 48, 3)) + 150 * (mask[..., None] > 0)).astype(np.uint8)
        write_image(prepared / "JPEGImages" / f"{image_id}.jpg", image)
        write_mask(prepared / "SegmentationClass" / f"{image_id}.png", mask)
        labels[image_id] = [label]
        masks[image_id] = mask
    write_split(prepared, "train", train_ids)
    write_split(prepared, "val", val_ids)
    write_labels(prepared, "toy", CLASS_NAMES, labels)

    metrics = root / "metrics"
    metrics.mkdir()
    (metrics / "cam.json").write_text(json.dumps(
        {"miou": 0.5123, "split": "train", "variant": "fused_affinity", "threshold": 0.31,
         "threshold_picked_with_gt": True, "per_class": {"background": 0.8, "cat": 0.41, "dog": 0.3269}}))
    (metrics / "pseudo.json").write_text(json.dumps(
        {"miou": 0.6789, "split": "train", "per_class": {"background": 0.9, "cat": 0.6, "dog": None}}))
    (metrics / "seg_pseudo.json").write_text("{ this is not json")
    (metrics / "summary.json").write_text(json.dumps(
        {"cam_miou": 0.5123, "weakclip_miou": 0.6, "pseudo_miou": 0.6789, "seg_pseudo_miou": 0.55,
         "seg_gt_miou": 0.7, "wsss_fsss_ratio": 0.55 / 0.7}))

    plots = root / "plots"
    plots.mkdir()
    thresholds = np.round(np.arange(0.0, 0.6, 0.01), 2)
    curve = 0.5123 - (thresholds - 0.31) ** 2
    (plots / "cam_threshold.csv").write_text(
        "threshold,miou\n" + "".join(f"{t:.2f},{m:.5f}\n" for t, m in zip(thresholds, curve)))

    for stage, names in (("cam_train", ["train/loss", "lr"]), ("weakclip_train", ["loss"])):
        for name in names:
            tsv = root / "dvclive" / stage / "plots" / "metrics" / f"{name}.tsv"
            tsv.parent.mkdir(parents=True, exist_ok=True)
            leaf = name.split("/")[-1]
            tsv.write_text(f"timestamp\tstep\t{leaf}\n"
                           + "".join(f"{1700000000 + s}\t{s}\t{1.0 / (1 + s)}\n" for s in range(20)))

    with CamStoreWriter(root / "artifacts" / "cams" / "train.h5", "toy", CLASS_NAMES, {}) as writer:
        for image_id in ("t0", "t2", "t3"):  # t1 deliberately absent from the store
            cams = (masks[image_id] > 0).astype(np.float32)[None] * 0.9
            writer.add(image_id, labels[image_id], cams)

    for image_id in train_ids:
        write_mask(root / "data" / "pseudo_masks" / f"{image_id}.png", masks[image_id])
    save_tiny_models(root)
    return ReportInputs(
        root=root, dataset_name="voc", prepared_dir=Path("data/prepared/toy"), train_split="train",
        val_split="val", seed_config=SeedConfig(mode="confident", fg_threshold=0.4, bg_threshold=0.15),
        pseudo_dir=Path("data/pseudo_masks"), weakclip_crop=64, device="cpu", n_samples=3)


def save_tiny_models(root: Path) -> None:
    """Random-init WeakCLIP and segmenter artifacts in the stages' own formats (seg_train@gt left out)."""
    torch.manual_seed(0)
    clip_cfg = ClipConfig(source="random", arch=ClipArchConfig(
        embed_dim=32, image_size=32, patch_size=16, vision_width=32, vision_layers=4, vision_head_width=16,
        text_width=32, text_layers=1, text_heads=2, context_length=16))
    clip_dir = root / "artifacts" / "clip"
    save_clip_artifact(clip_dir, build_clip(clip_cfg), clip_cfg)
    weakclip_cfg = replace(WeakClipConfig(), prompt_len=2, text_context_length=8, taps=[0, 1, 2, 3],
                           co_attention_width=16, co_attention_heads=2, co_attention_layers=1, neck_width=16,
                           head_width=16)
    weakclip = WeakCLIP(load_clip_artifact(clip_dir), CLASS_NAMES, weakclip_cfg.arch())
    save_weakclip_model(root / "artifacts" / "weakclip" / "model.pt", weakclip, weakclip_cfg, clip_dir)
    seg_cfg = SegConfig(encoder="resnet18", train=SegTrainConfig(crop=64))
    save_final_model(root / "artifacts" / "seg" / "pseudo" / "model.pt", build_segmenter(seg_cfg, len(CLASS_NAMES)),
                     config=segmenter_record(seg_cfg, CLASS_NAMES))


@pytest.fixture(scope="module")
def built_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("project")
    inputs = make_project(root)
    output = write_report(inputs, root / "reports" / "index.html")
    return output, output.read_text(encoding="utf-8")


def test_report_references_nothing_outside_the_page(built_report: tuple[Path, str]) -> None:
    _, page = built_report
    collector = ReferenceCollector()
    collector.feed(page)
    assert collector.references, "the report has no images at all"
    for tag, attribute, value in collector.references:
        assert value.startswith("data:image/png;base64,"), f"<{tag} {attribute}> points outside the page: {value[:80]}"
        png = base64.b64decode(value.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as decoded:
            assert decoded.format == "PNG" and decoded.width > 0 and decoded.height > 0
    assert "script" not in collector.tags and "link" not in collector.tags
    assert not re.search(r"https?://", page), "an http(s) URL appears in the page"
    assert "@import" not in page and "url(" not in page


def test_report_tables_hold_the_hand_made_numbers(built_report: tuple[Path, str]) -> None:
    _, page = built_report
    collector = ReferenceCollector()
    collector.feed(page)
    text = " ".join(collector.text)
    # Stage table: 0.5123 -> 51.2 %, 0.6789 -> 67.9 %; per-class dog 0.3269 -> 32.7; undefined IoU shown as a dash.
    assert "51.2" in text and "67.9" in text and "32.7" in text
    assert re.search(r"dog\s+32\.7\s+—", text), "per-class row for dog should read 32.7 (cam) and — (pseudo)"
    # The paper's VOC numbers sit beside ours.
    assert "61.7" in text and "77.2" in text and "74.0" in text
    # wsss/fsss ratio 0.55 / 0.7 = 0.786, printed as a ratio, not a percentage.
    assert "0.786" in text and "0.950 (val vs FSSS" in text


def test_report_names_every_missing_or_broken_input(built_report: tuple[Path, str]) -> None:
    _, page = built_report
    missing = re.findall(r'<p class="missing">(.*?)</p>', page)
    joined = "\n".join(missing)
    assert "weakclip.json: not found" in joined
    assert "seg_gt.json: not found" in joined
    assert "seg_pseudo.json: unreadable JSON" in joined
    assert "artifacts/seg/gt/model.pt: not found" in joined
    assert "cam.json" not in joined and "pseudo.json: not found" not in joined
    assert "weakclip/model.pt" not in joined and "seg/pseudo/model.pt" not in joined


def test_overlay_grid_uses_the_fixed_sample_and_every_available_column(built_report: tuple[Path, str]) -> None:
    _, page = built_report
    # 3 evenly spaced of t0..t3 (steps of 4/3, floored): t0, t1, t2; both val ids.
    for image_id in ("t0", "t1", "t2", "v0", "v1"):
        assert f'alt="{image_id} image"' in page and f'alt="{image_id} GT"' in page
        assert f'alt="{image_id} WeakCLIP prediction"' in page
        assert f'alt="{image_id} retrained on pseudo masks"' in page
    assert 'alt="t3 image"' not in page
    assert 'alt="t0 CAM seeds"' in page and 'alt="t2 CAM seeds"' in page
    assert 'alt="t1 CAM seeds"' not in page and "not in store" in page
    assert 'alt="t1 pseudo mask"' in page and 'alt="v0 pseudo mask"' not in page
    assert 'alt="v0 CAM seeds"' not in page


def test_an_unreadable_sample_image_is_a_line_naming_it_and_imported_cams_are_named(tmp_path: Path) -> None:
    """A sampled image that is missing or not an image used to stop the whole report with a DatasetError;
    now each is one line naming its file and the rest of the grid is drawn. CAMs imported from MCTformer's
    .npy dumps are labelled so in the stage table, not as a MCTformer-V2 run."""
    inputs = make_project(tmp_path)
    images = tmp_path / "data" / "prepared" / "toy" / "JPEGImages"
    (images / "v1.jpg").unlink()
    (images / "t1.jpg").write_bytes(b"not a jpeg")
    cam = json.loads((tmp_path / "metrics" / "cam.json").read_text())
    (tmp_path / "metrics" / "cam.json").write_text(json.dumps({**cam, "variant": "imported", "source": "npy_folder"}))
    page = write_report(inputs, tmp_path / "reports" / "index.html").read_text(encoding="utf-8")
    missing = "\n".join(re.findall(r'<p class="missing">(.*?)</p>', page))
    assert f"{images / 'v1.jpg'}: image file not found: left out of the sample" in missing
    assert f"{images / 't1.jpg'}" in missing and missing.count("left out of the sample") == 2
    for image_id in ("t0", "t2", "v0"):
        assert f'alt="{image_id} image"' in page and f'alt="{image_id} WeakCLIP prediction"' in page
    assert 'alt="t1 image"' not in page and 'alt="v1 image"' not in page
    assert "<td>CAM seeds (imported MCTformer .npy dumps)</td>" in page and "MCTformer-V2" not in page


def test_model_columns_restrict_train_predictions_to_image_labels(built_report: tuple[Path, str]) -> None:
    output, _ = built_report
    root = output.parent.parent
    inputs = ReportInputs(root=root, prepared_dir=Path("data/prepared/toy"), weakclip_crop=64, device="cpu")
    dataset = PreparedDataset.open(root / "data" / "prepared" / "toy")
    models = TrainedModels.load(inputs, dataset.class_names)
    assert models.weakclip is not None and set(models.segmenters) == {"pseudo"}
    image_ids = ["t0", "t1", "t2", "t3"]
    restricted = model_columns(models, dataset, image_ids, True, 64, torch.device("cpu"))
    weakclip_masks = next(c for c in restricted if c.label == "WeakCLIP prediction").masks
    for image_id in image_ids:
        mask = weakclip_masks[image_id]
        assert mask.shape == dataset.image(image_id).shape[:2]
        assert set(np.unique(mask)) <= {0, *dataset.image_labels(image_id)}


def test_colour_overlay_tints_only_labelled_pixels() -> None:
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 255], [0, 0, 2]], dtype=np.uint8)
    blended = blend(image, mask, alpha=0.5)  # the report draws with the stages' blend
    # VOC palette: 1 = (128, 0, 0), 2 = (0, 128, 0), 255 = (224, 224, 192); background untouched.
    assert blended[0, 0].tolist() == [100, 100, 100]
    assert blended[0, 1].tolist() == [114, 50, 50]
    assert blended[1, 2].tolist() == [50, 114, 50]
    assert blended[0, 2].tolist() == [162, 162, 146]


def test_mask_overlay_resizes_a_smaller_mask_to_the_image_nearest() -> None:
    # A (2, 2) mask over a (4, 4) image: each mask pixel covers a 2x2 block, ids never mixed.
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1], [255, 0]], dtype=np.uint8)
    expected_mask = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(mask_overlay(image, mask), blend(image, expected_mask))
    # alpha 0.55 and rounding: 0.45 * 100 + 0.55 * 128 = 115.4 -> 115, 0.45 * 100 = 45.
    assert mask_overlay(image, mask)[0, 0].tolist() == [100, 100, 100]
    assert mask_overlay(image, mask)[1, 3].tolist() == [115, 45, 45]


def test_legend_shows_every_class_and_ignore_in_the_palette_colours() -> None:
    html_text = legend(CLASS_NAMES)
    assert "rgb(0,0,0)" in html_text and "0 background" in html_text
    assert "rgb(128,0,0)" in html_text and "1 cat" in html_text and "rgb(0,128,0)" in html_text
    assert "rgb(224,224,192)" in html_text and "255 ignore" in html_text


def test_training_curves_read_dvclive_tsv(tmp_path: Path) -> None:
    tsv = tmp_path / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("timestamp\tstep\tloss\n1\t0\t2.5\n2\t10\t1.5\n3\t20\tnan\n")
    curves = training_curves(tmp_path)
    steps, values = curves["train/loss"]
    assert steps.tolist() == [0.0, 10.0] and values.tolist() == [2.5, 1.5]


def test_report_renders_in_headless_chromium(built_report: tuple[Path, str], tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, ("Debian `chromium` is not installed: run `apt-get update && apt-get install -y chromium` "
                      "as root (.ci/run installs it in CI)")
    output, _ = built_report
    screenshot = tmp_path / "report.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1280,2000",
               output.resolve().as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), f"chromium wrote no screenshot (rc {completed.returncode}): {completed.stderr[-800:]}"
    with Image.open(screenshot) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2000, 1280)
    non_white = (pixels < 245).any(axis=2).mean()
    assert pixels.std() > 10.0 and non_white > 0.02, f"screenshot looks blank (std {pixels.std():.1f}, "\
        f"{100 * non_white:.2f}% non-white pixels)"
    # The missing-input lines are drawn in their red (#a40000 text on #fff3f3): proof the CSS applied.
    reddish = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert reddish.sum() > 50


def test_a_chain_trained_on_gt_masks_is_flagged_in_the_headline_and_the_stage_table(tmp_path: Path) -> None:
    """weakclip.seeds.source: gt (an upper bound): the headline warns that the pseudo-mask and segmenter figures
    are not WSSS results beside the paper's, and the stage table's GT column names each stage's use of GT (the
    details cut at 12 entries dropped the pseudo row's flag, the last key it writes)."""
    from pipeline.report.sections import section_headline, section_stages

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "summary.json").write_text(json.dumps({"pseudo_miou": 0.9, "seg_pseudo_miou": 0.8}))
    (metrics / "cam.json").write_text(json.dumps({"miou": 0.4, "split": "train", "threshold_chosen_with_gt": True}))
    (metrics / "pseudo.json").write_text(json.dumps(
        {"miou": 0.9, "split": "train", **{f"k{i}": i for i in range(12)}, "gt_used_in_training": True}))
    inputs = ReportInputs(root=tmp_path, dataset_name="voc")
    assert "WeakCLIP trained on GT masks" in section_headline(inputs)
    stages, _ = section_stages(inputs)
    assert "<td>threshold chosen with GT</td>" in stages and "<td>trained on GT masks</td>" in stages
    (metrics / "pseudo.json").write_text(json.dumps({"miou": 0.9, "split": "train", "threshold_chosen_with_gt": False}))
    assert "WeakCLIP trained on GT masks" not in section_headline(inputs)
    assert "<td>no</td>" in section_stages(inputs)[0]
