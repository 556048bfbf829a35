"""pseudo_masks end to end on a tiny dataset + a tiny WeakCLIP written here: shards merge byte for byte,
a SIGKILLed run resumes without losing or duplicating an image, labels restrict the classes, guards."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.pseudo_masks import (ManifestWriter, ProvenanceError, PseudoPaths, RefineJob, Shard, assemble,
                                   check_gt_claim, done_images, read_manifest_lines, refine_and_write, run_shard,
                                   upstream_seed_provenance, work_config, work_dir_of)
from tiny_voc import CLASS_NAMES, TINY_CLIP_ARCH, write_tiny_voc
from weakclip_core.models.clip import build_clip, load_clip_artifact, save_clip_artifact
from weakclip_core.config import ClipConfig, ConfigError, WeakClipConfig, build_dataclass, params_from_dict
from weakclip_core.data.layout import PreparedDataset, read_mask
from weakclip_core.data.segmentation import GroundTruthMaskError
from weakclip_core.models.weakclip.model import WeakCLIP
from weakclip_core.artifacts.weakclip import load_weakclip_model, save_weakclip_model

REPO = Path(__file__).resolve().parent.parent
N_TRAIN = 12
TINY_WEAKCLIP = {"prompt_len": 2, "text_context_length": 6, "taps": [0, 1, 2, 3], "co_attention_width": 16,
                 "co_attention_heads": 2, "co_attention_layers": 1, "neck_width": 16, "head_width": 16}


def write_chain(root: Path) -> None:
    """root/data (tiny VOC), root/artifacts/{clip,weakclip/model.pt} (random tiny model), root/metrics/weakclip.json."""
    write_tiny_voc(root / "data", n_train=N_TRAIN, n_val=4, size=64)
    clip_cfg = build_dataclass(ClipConfig, {"source": "random", "arch": dict(TINY_CLIP_ARCH)})
    torch.manual_seed(0)
    save_clip_artifact(root / "artifacts" / "clip", build_clip(clip_cfg), clip_cfg)
    cfg = build_dataclass(WeakClipConfig, dict(TINY_WEAKCLIP))
    model = WeakCLIP(load_clip_artifact(root / "artifacts" / "clip"), CLASS_NAMES, cfg.arch())
    save_weakclip_model(root / "artifacts" / "weakclip" / "model.pt", model, cfg, root / "artifacts" / "clip")
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "weakclip.json").write_text(json.dumps({"miou": 0.1, "split": "train",
                                                                "thresholds_chosen_with_gt": False,
                                                                "seed_mode": "confident",
                                                                "cam_variant": "fused_affinity"}))


def params_dict(root: Path, output: str = "data_pseudo", workers: int = 0, odds_ratio: float = 2.0,
                use_crf: bool = True, softmax_classes: str = "labels") -> dict:
    return {"runtime": {"device": "cpu", "seed": 0, "threads": 2},
            "dataset": {"prepared_dir": str(root / "data")},
            "pseudo": {"scales": [0.75, 1.0], "flip": True, "crop": 64, "stride": 32, "batch_size": 3,
                       "workers": workers, "output_dir": str(root / output), "overlay_samples": 3,
                       "absent_class_odds_ratio": odds_ratio, "use_crf": use_crf, "crf": {"iterations": 5},
                       "softmax_classes": softmax_classes}}


def paths_of(root: Path, run: str) -> PseudoPaths:
    return PseudoPaths(model=root / "artifacts" / "weakclip" / "model.pt",
                       weakclip_metrics=root / "metrics" / "weakclip.json",
                       metrics=root / run / "pseudo.json", reports=root / run / "reports",
                       work_root=root / run / "work")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pseudo")
    write_chain(root)
    return root


@pytest.fixture(scope="module")
def straight_run(chain) -> dict:
    """The unsharded run, inline CRF: the reference every other run must reproduce byte for byte."""
    params = params_from_dict(params_dict(chain, "straight_masks"))
    paths = paths_of(chain, "straight")
    assert run_shard(params, paths=paths, show_progress=False) == N_TRAIN
    return assemble(params, paths)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def numpy_miou(pairs: list[tuple[np.ndarray, np.ndarray]], n_classes: int) -> float:
    """Independent mIoU: per-class TP / (TP + FP + FN) summed over images, 255 ignored, undefined skipped."""
    tp, fp, fn = np.zeros(n_classes), np.zeros(n_classes), np.zeros(n_classes)
    for gt, pred in pairs:
        valid = gt != 255
        for k in range(n_classes):
            tp[k] += np.sum((gt == k) & (pred == k) & valid)
            fp[k] += np.sum((gt != k) & (pred == k) & valid)
            fn[k] += np.sum((gt == k) & (pred != k) & valid)
    union = tp + fp + fn
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_unsharded_run_writes_restricted_masks_metrics_and_reports(chain, straight_run):
    dataset = PreparedDataset.open(chain / "data")
    output = chain / "straight_masks"
    train_ids = sorted(dataset.split("train"))
    assert sorted(p.stem for p in output.glob("*.png")) == train_ids
    pairs = []
    absent_in_output = 0
    for image_id in train_ids:
        mask = read_mask(output / f"{image_id}.png")
        assert mask.shape == (64, 64)
        assert set(np.unique(mask).tolist()) <= {0, *dataset.image_labels(image_id)}, image_id
        absent_in_output += sum(not np.any(mask == label) for label in dataset.image_labels(image_id))
        pairs.append((dataset.mask(image_id), mask))
    metrics = straight_run
    repair = metrics["absent_class_repair"]
    assert repair["labelled_pairs"] == sum(len(dataset.image_labels(i)) for i in train_ids)
    assert repair["absent_after_repair"] == absent_in_output
    assert repair["absent_after_repair"] < repair["absent_before_repair"]  # the random tiny model misses classes
    assert metrics["split"] == "train" and metrics["n_images"] == N_TRAIN and metrics["n_scored"] == N_TRAIN
    assert metrics["miou"] == pytest.approx(numpy_miou(pairs, 4), abs=1e-12)
    assert metrics["miou"] == metrics["miou_after_crf"] and metrics["miou_before_crf"] is not None
    assert metrics["threshold_chosen_with_gt"] is False and metrics["cam_variant"] == "fused_affinity"
    assert set(metrics["per_class"]) == set(CLASS_NAMES) and set(metrics["precision"]) == set(CLASS_NAMES)
    assert json.loads((output / "provenance.json").read_text())["threshold_chosen_with_gt"] is False
    reports = sorted(p.name for p in (chain / "straight" / "reports").iterdir())
    assert len([r for r in reports if r.startswith("sample_")]) == 3
    assert len([r for r in reports if r.startswith("worst_")]) == 8
    assert not (chain / "straight" / "work").exists() or not any((chain / "straight" / "work").iterdir())


def absent_pairs(dataset: PreparedDataset, mask_dir: Path) -> dict[str, int]:
    """{image id: how many of its labels have no pixel in ``mask_dir``'s mask}, counted here with numpy."""
    return {image_id: sum(not np.any(read_mask(mask_dir / f"{image_id}.png") == label)
                          for label in dataset.image_labels(image_id))
            for image_id in sorted(dataset.split("train"))}


def test_repair_counts_match_a_run_without_it_and_touch_only_images_with_an_absent_class(chain, straight_run):
    params = params_from_dict(params_dict(chain, "unrepaired_masks", odds_ratio=0.0))
    paths = paths_of(chain, "unrepaired")
    run_shard(params, paths=paths, show_progress=False)
    unrepaired = assemble(params, paths)["absent_class_repair"]
    dataset = PreparedDataset.open(chain / "data")
    absent_without_repair = absent_pairs(dataset, chain / "unrepaired_masks")
    assert unrepaired["absent_before_repair"] == unrepaired["absent_after_repair"] == sum(absent_without_repair.values())
    assert straight_run["absent_class_repair"]["absent_before_repair"] == sum(absent_without_repair.values())
    assert straight_run["absent_class_repair"]["images_with_absent_class"] == sum(
        count > 0 for count in absent_without_repair.values())
    for image_id, count in absent_without_repair.items():
        if count == 0:
            assert ((chain / "straight_masks" / f"{image_id}.png").read_bytes()
                    == (chain / "unrepaired_masks" / f"{image_id}.png").read_bytes()), image_id


def test_without_crf_the_metrics_score_the_repaired_masks_that_were_written(chain):
    params = params_from_dict(params_dict(chain, "no_crf_masks", use_crf=False))
    paths = paths_of(chain, "no_crf")
    run_shard(params, paths=paths, show_progress=False)
    metrics = assemble(params, paths)
    dataset = PreparedDataset.open(chain / "data")
    pairs = [(dataset.mask(image_id), read_mask(chain / "no_crf_masks" / f"{image_id}.png"))
             for image_id in sorted(dataset.split("train"))]
    assert metrics["miou_after_crf"] is None and metrics["absent_class_repair"]["absent_before_repair"] > 0
    assert metrics["miou"] == pytest.approx(numpy_miou(pairs, 4), abs=1e-12)


def test_softmax_over_every_class_keeps_the_argmaxs_classes_and_background(chain):
    """``softmax_classes: all`` (the reference code): no label restriction, so the plain argmax (``raw/``) may
    show a class the image is not labelled with; the CRF then runs over the classes that argmax shows plus
    background, so every final mask holds only those (checked per image against the raw PNG, with numpy)."""
    params = params_from_dict(params_dict(chain, "all_classes_masks", softmax_classes="all"))
    paths = paths_of(chain, "all_classes")
    assert run_shard(params, paths=paths, show_progress=False) == N_TRAIN
    dataset = PreparedDataset.open(chain / "data")
    raw_dir = work_dir_of(paths, work_config(params, dataset, paths.model)) / "raw"  # assemble removes it
    raws = {image_id: set(np.unique(read_mask(raw_dir / f"{image_id}.png")).tolist())
            for image_id in dataset.split("train")}
    assemble(params, paths)
    outside_labels = 0
    for image_id in sorted(dataset.split("train")):
        raw = raws[image_id]
        final = set(np.unique(read_mask(chain / "all_classes_masks" / f"{image_id}.png")).tolist())
        assert final <= raw | {0}, (image_id, final, raw)
        outside_labels += bool(raw - {0, *dataset.image_labels(image_id)})
    assert outside_labels > 0  # the random tiny model shows unlabelled classes: the restriction is really off


def test_masks_of_a_weakclip_trained_on_gt_say_so_in_provenance_and_metrics(chain, straight_run):
    """A WeakCLIP trained on GT masks (``gt_used`` in its metrics) makes pseudo masks whose provenance says
    ``gt_used``, which seg_train and seg_eval carry to the retrained segmenter; CAM-seeded ones say the opposite."""
    on_gt = json.loads((chain / "metrics" / "weakclip.json").read_text()) | {"seeds_source": "gt", "gt_used": True}
    (chain / "metrics" / "weakclip_on_gt.json").write_text(json.dumps(on_gt))
    params = params_from_dict(params_dict(chain, "on_gt_masks", use_crf=False))
    paths = dataclasses.replace(paths_of(chain, "on_gt"), weakclip_metrics=chain / "metrics" / "weakclip_on_gt.json")
    run_shard(params, paths=paths, show_progress=False)
    metrics = assemble(params, paths)
    assert metrics["gt_used_in_training"] is True
    assert json.loads((chain / "on_gt_masks" / "provenance.json").read_text())["gt_used"] is True
    assert "gt_used_in_training" not in straight_run
    assert json.loads((chain / "straight_masks" / "provenance.json").read_text())["gt_used"] is False


@pytest.mark.slow
def test_shards_merged_equal_the_unsharded_run_byte_for_byte(chain, straight_run):
    params = params_from_dict(params_dict(chain, "sharded_masks", workers=1))
    paths = paths_of(chain, "sharded")
    written = [run_shard(params, Shard(index, 2), paths, show_progress=False) for index in (1, 0)]
    assert sum(written) == N_TRAIN and all(written)
    merged = assemble(params, paths)
    assert folder_bytes(chain / "sharded_masks") == folder_bytes(chain / "straight_masks")
    assert "wall_s" not in merged and merged == straight_run  # no wall time in a DVC-tracked file


def test_merge_refuses_while_a_shard_is_missing(chain):
    params = params_from_dict(params_dict(chain, "partial_masks"))
    paths = paths_of(chain, "partial")
    run_shard(params, Shard(0, 2), paths, show_progress=False)
    with pytest.raises(RuntimeError, match="are not done"):
        assemble(params, paths)
    assert not (chain / "partial_masks").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(chain, straight_run, tmp_path):
    for name in ("data", "artifacts", "metrics"):
        (tmp_path / name).symlink_to(chain / name)
    settings = params_dict(chain, workers=1)
    settings["pseudo"]["output_dir"] = "data_pseudo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pipeline.pseudo_masks", "--params", "params.yaml"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    work_root = tmp_path / "checkpoints" / "pseudo_masks"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = sum(len(read_manifest_lines(m)) for m in work_root.glob("*/manifest-*.jsonl"))
        if lines >= 3 or process.poll() is not None:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed: " + process.stdout.read().decode()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    [work_dir] = list(work_root.iterdir())
    for folder in (work_dir / "masks", work_dir / "raw"):
        for png in folder.glob("[!.]*.png"):  # every file under a final name is a whole PNG
            assert read_mask(png).shape == (64, 64)
    survived = done_images(work_dir)
    assert 3 <= len(survived) < N_TRAIN
    assert not (tmp_path / "data_pseudo").exists()

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"wrote {N_TRAIN - len(survived)} masks" in rerun.stdout
    assert folder_bytes(tmp_path / "data_pseudo") == folder_bytes(chain / "straight_masks")
    assert not any(p.name.endswith((".tmp.png", ".tmp")) for p in (tmp_path / "data_pseudo").iterdir())


@pytest.mark.parametrize(("odds_ratio", "expected_mask", "absent_after"),
                         [(2.0, [0, 0, 3, 0], 0), (0.0, [0, 0, 0, 0], 1)])
def test_refine_and_write_writes_both_masks_and_the_absent_counts(tmp_path, odds_ratio, expected_mask,
                                                                  absent_after):
    # The stage's share of the refinement: the PNGs and the manifest entry (the maths itself is tested on
    # weakclip_core.method.refine in test_absent_classes.py). Background wins every pixel; class 3's odds
    # against it are 1/9, 1/4, 2/3, 1/19, so with ratio 2 it takes the pixels with odds >= (2/3) / 2: the third.
    probabilities = np.array([[[0.9, 0.8, 0.6, 0.95]], [[0.1, 0.2, 0.4, 0.05]]], dtype=np.float32)
    job = RefineJob("img", np.zeros((1, 4, 3), np.uint8), probabilities, (0, 3), None, odds_ratio, tmp_path)
    entry = refine_and_write(job)
    assert read_mask(tmp_path / "raw" / "img.png").tolist() == [[0, 0, 0, 0]]
    assert read_mask(tmp_path / "masks" / "img.png").tolist() == [expected_mask]
    assert (entry["absent_before_repair"], entry["absent_after_repair"]) == (1, absent_after)
    assert entry["mask_sha256"] == hashlib.sha256((tmp_path / "masks" / "img.png").read_bytes()).hexdigest()
    assert entry["raw_sha256"] == hashlib.sha256((tmp_path / "raw" / "img.png").read_bytes()).hexdigest()
    assert set(entry) == {"id", "mask_sha256", "raw_sha256", "absent_before_repair", "absent_after_repair"}


def test_manifest_drops_a_torn_line_and_appends_after_it(tmp_path):
    path = tmp_path / "manifest-0-of-1.jsonl"
    counts = '"absent_before_repair": 0, "absent_after_repair": 0'
    path.write_text(f'{{"id": "a", "mask_sha256": "1", "raw_sha256": "2", {counts}}}\n'
                    f'{{"id": "x", "mask_sha256": "1", "raw_sha256": "2"}}\n{{"id": "b", "mask_sha')
    assert [entry["id"] for entry in read_manifest_lines(path)] == ["a"]  # "x" lacks the repair counts
    writer = ManifestWriter(path)
    writer.add({"id": "c", "mask_sha256": "3", "raw_sha256": "4", "absent_before_repair": 1,
                "absent_after_repair": 0})
    writer.close()
    assert [entry["id"] for entry in read_manifest_lines(path)] == ["a", "c"]


def test_an_image_whose_png_does_not_match_the_manifest_is_not_done(chain):
    params = params_from_dict(params_dict(chain, "tamper_masks"))
    paths = paths_of(chain, "tamper")
    run_shard(params, Shard(0, 4), paths, show_progress=False)
    work_dir = work_dir_of(paths, work_config(params, PreparedDataset.open(chain / "data"), paths.model))
    done = done_images(work_dir)
    victim = sorted(done)[0]
    (work_dir / "masks" / f"{victim}.png").write_bytes(b"\x89PNG half")
    assert victim not in done_images(work_dir)
    assert run_shard(params, Shard(0, 4), paths, show_progress=False) == 1


def test_output_folder_that_is_the_gt_folder_is_refused(chain):
    settings = params_dict(chain)
    settings["pseudo"]["output_dir"] = str(chain / "data" / "SegmentationClass")
    params = params_from_dict(settings)
    before = folder_bytes(chain / "data" / "SegmentationClass")
    with pytest.raises(GroundTruthMaskError, match="ground-truth mask folder"):
        run_shard(params, paths=paths_of(chain, "refused"), show_progress=False)
    with pytest.raises(GroundTruthMaskError):
        assemble(params, paths_of(chain, "refused"))
    assert folder_bytes(chain / "data" / "SegmentationClass") == before


def test_unknown_or_gt_thresholded_upstream_is_never_reported_as_no_gt(tmp_path):
    with pytest.raises(ProvenanceError, match="weakclip.json: missing"):
        upstream_seed_provenance(tmp_path / "weakclip.json")
    (tmp_path / "weakclip.json").write_text(json.dumps({"miou": 0.5}))
    with pytest.raises(ProvenanceError, match="thresholds_chosen_with_gt"):
        upstream_seed_provenance(tmp_path / "weakclip.json")
    (tmp_path / "weakclip.json").write_text(json.dumps({"thresholds_chosen_with_gt": True}))
    upstream = upstream_seed_provenance(tmp_path / "weakclip.json")
    assert upstream["gt_used"] is False  # CAM seeds: no GT mask trained WeakCLIP
    with pytest.raises(ProvenanceError, match="thresholded with GT"):
        check_gt_claim({"threshold_chosen_with_gt": False}, upstream)
    check_gt_claim({"threshold_chosen_with_gt": True}, upstream)
    # WeakCLIP trained on the GT masks (weakclip.seeds.source: gt): the pseudo masks carry the flag on.
    (tmp_path / "weakclip.json").write_text(json.dumps({"thresholds_chosen_with_gt": False, "gt_used": True}))
    assert upstream_seed_provenance(tmp_path / "weakclip.json")["gt_used"] is True


def test_shard_argument():
    assert Shard.parse("1/4") == Shard(1, 4)
    for bad in ("4/4", "-1/2", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_a_model_file_records_the_reference_fidelity_keys_only_when_set(tmp_path: Path) -> None:
    """``weakclip.loss.aux_form``, ``train.clip_drop_path_unit``, ``train.lr_schedule`` (2026-12-04) at their
    defaults are left out of the model file, so a default run's file is byte for byte what it was before they
    existed (a review found ``artifacts/weakclip/model.pt`` 128 bytes longer, and pseudo_masks re-run); set, each
    is recorded and reads back. The file's config keys of a default run, by hand: those of before."""
    write_chain(tmp_path)
    default = torch.load(tmp_path / "artifacts" / "weakclip" / "model.pt", weights_only=True)["config"]
    assert "aux_form" not in default["loss"]
    assert not {"clip_drop_path_unit", "lr_schedule", "decoder_init"} & set(default["train"])
    assert {"aux_temperature", "seed_loss_reduction"} <= set(default["loss"]) and "clip_drop_path_rate" in default["train"]
    cfg = build_dataclass(WeakClipConfig, {**TINY_WEAKCLIP, "loss": {"aux_form": "reference"},
                                           "train": {"clip_drop_path_unit": "token", "lr_schedule": "mmcv_cosine",
                                                     "decoder_init": "reference"}})
    model = WeakCLIP(load_clip_artifact(tmp_path / "artifacts" / "clip"), CLASS_NAMES, cfg.arch())
    save_weakclip_model(tmp_path / "set.pt", model, cfg, tmp_path / "artifacts" / "clip")
    recorded = torch.load(tmp_path / "set.pt", weights_only=True)["config"]
    assert (recorded["loss"]["aux_form"], recorded["train"]["clip_drop_path_unit"], recorded["train"]["lr_schedule"],
            recorded["train"]["decoder_init"]) == ("reference", "token", "mmcv_cosine", "reference")
    assert load_weakclip_model(tmp_path / "set.pt").class_names == CLASS_NAMES


def test_an_image_whose_mask_is_all_ignore_is_not_scored_or_ranked_worst(tmp_path):
    """A GT mask of 255 only has no pixel to score: its per-image mIoU is undefined, not 0.0, so it is neither
    counted in ``n_scored`` nor listed among ``worst_images`` (it used to head that list with 0.0)."""
    write_chain(tmp_path)
    dataset = PreparedDataset.open(tmp_path / "data")
    blank_id = sorted(dataset.split("train"))[0]
    mask_path = tmp_path / "data" / "SegmentationClass" / f"{blank_id}.png"
    with Image.open(mask_path) as mask:
        blank = mask.copy()
    blank.paste(255, (0, 0, *blank.size))
    blank.save(mask_path)
    params = params_from_dict(params_dict(tmp_path, "blank_masks", use_crf=False))
    paths = paths_of(tmp_path, "blank")
    assert run_shard(params, paths=paths, show_progress=False) == N_TRAIN
    metrics = assemble(params, paths)
    assert metrics["n_scored"] == N_TRAIN - 1
    assert blank_id not in metrics["worst_images"] and len(metrics["worst_images"]) == 8


def test_a_thin_image_gets_a_pseudo_mask_with_small_windows_run_as_is(tmp_path):
    """``pseudo.pad_small_windows: false`` (the default) runs a view smaller than the crop as is; a 64 x 12 image at
    scale 0.75 is 9 px wide, under one of the tiny CLIP's 16-px patches and the two the pyramid needs, and used to
    stop the stage (``Calculated padded input size per channel: (16 x 0)``) after every training stage. The view is
    padded to the model's minimum instead; the mask has the image's size and only its labels + background."""
    write_chain(tmp_path)
    dataset = PreparedDataset.open(tmp_path / "data")
    thin_id = sorted(dataset.split("train"))[0]
    image = np.asarray(Image.open(tmp_path / "data" / "JPEGImages" / f"{thin_id}.jpg"))[:, 20:32]
    mask = read_mask(tmp_path / "data" / "SegmentationClass" / f"{thin_id}.png")[:, 20:32]
    Image.fromarray(image).save(tmp_path / "data" / "JPEGImages" / f"{thin_id}.jpg", quality=95)
    Image.fromarray(mask).save(tmp_path / "data" / "SegmentationClass" / f"{thin_id}.png")
    params = params_from_dict(params_dict(tmp_path, "thin_masks", use_crf=False))
    assert params.pseudo.pad_small_windows is False and params.pseudo.scales == [0.75, 1.0]
    paths = paths_of(tmp_path, "thin")
    assert run_shard(params, paths=paths, show_progress=False) == N_TRAIN
    assemble(params, paths)
    written = read_mask(tmp_path / "thin_masks" / f"{thin_id}.png")
    assert written.shape == (64, 12)
    assert set(np.unique(written).tolist()) <= {0, *dataset.image_labels(thin_id)}


def test_the_weakclips_minimum_input_is_two_patches():
    """``WeakCLIP.min_input_side`` is the true minimum: two patches a side run, one does not."""
    clip_cfg = build_dataclass(ClipConfig, {"source": "random", "arch": dict(TINY_CLIP_ARCH)})
    torch.manual_seed(0)
    arch = build_dataclass(WeakClipConfig, dict(TINY_WEAKCLIP)).arch()
    model = WeakCLIP(build_clip(clip_cfg), CLASS_NAMES, arch).eval()
    side = model.min_input_side()
    assert side == 2 * TINY_CLIP_ARCH["patch_size"]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, side, 3 * side)).logits.shape[0] == 1
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, side // 2, 3 * side))


def test_a_crop_below_the_weakclips_minimum_is_refused_naming_the_key(tmp_path):
    write_chain(tmp_path)
    settings = params_dict(tmp_path, "small_crop_masks")
    settings["pseudo"].update(crop=16, stride=16)
    with pytest.raises(ConfigError, match=r"^pseudo.crop: 16 is below 32, the smallest window the trained WeakCLIP"):
        run_shard(params_from_dict(settings), paths=paths_of(tmp_path, "small_crop"), show_progress=False)
