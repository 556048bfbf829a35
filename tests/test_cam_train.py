"""cam_train / cam_infer on a tiny dataset the test writes itself (VOC layout writers, no generator).

The central check: a training run stopped after a checkpoint and resumed
reaches bit-identical weights to an uninterrupted run (CPU).
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cam_infer import CamInferPaths, infer_cams
from pipeline.cam_train import CamTrainPaths, CamTrainResult, train_cam_model
from weakclip_core.artifacts.cam_store import CamStoreReader
from weakclip_core.config import params_from_dict
from weakclip_core.data.classification import ClassificationAugment, ClassificationDataset, EpochBatchSampler
from weakclip_core.data.layout import (DatasetError, PreparedDataset, write_image, write_labels, write_mask,
                                        write_split)

CLASS_COLOURS = {1: (220, 40, 40), 2: (40, 60, 220)}


def write_tiny_dataset(root: Path, n_train: int = 12, n_val: int = 4, size: int = 32) -> Path:
    """Squares of two colours on noise; masks and labels follow the drawn squares."""
    rng = np.random.default_rng(0)
    labels: dict[str, list[int]] = {}
    ids = [f"img{index:03d}" for index in range(n_train + n_val)]
    for number, image_id in enumerate(ids):
        image = rng.integers(90, 140, size=(size, size, 3)).astype(np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        present = [1 + number % 2] if number % 3 else [1, 2]
        for class_index in present:
            side = int(rng.integers(8, 14))
            top, left = rng.integers(0, size - side, size=2)
            image[top:top + side, left:left + side] = CLASS_COLOURS[class_index]
            mask[top:top + side, left:left + side] = class_index
        mask[0, 0] = 255
        write_image(root / "JPEGImages" / f"{image_id}.jpg", image)
        write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
        labels[image_id] = sorted({int(c) for c in np.unique(mask)} - {0, 255})
    write_split(root, "train", ids[:n_train])
    write_split(root, "val", ids[n_train:])
    write_labels(root, "tiny", ["background", "red", "blue"], labels)
    return root


def tiny_params(dataset_root: Path, **train_overrides):
    train = dict(epochs=2, batch_size=4, lr=0.05, weight_decay=0.05, warmup_epochs=1, checkpoint_every=2,
                 workers=0, crop_scale_min=0.5, randaugment_ops=2, randaugment_magnitude=9)
    train.update(train_overrides)
    return params_from_dict({
        "runtime": {"device": "cpu", "seed": 0},
        "dataset": {"prepared_dir": str(dataset_root)},
        "cam": {"arch": dict(image_size=32, patch_size=8, width=16, depth=3, heads=2, mlp_ratio=2.0,
                             drop_path=0.2),
                "train": train,
                "infer": dict(scales=[1.0, 0.75], flip=True, attention_layers=2, batch_size=3)},
    })


def paths_in(folder: Path) -> CamTrainPaths:
    return CamTrainPaths(model=folder / "model.pt", live_dir=folder / "dvclive", checkpoint_root=folder / "ckpt")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two when the shared machine is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset"))


@pytest.fixture(scope="module")
def whole_run(dataset_root, tmp_path_factory) -> CamTrainResult:
    """An uninterrupted run: 12 images / batch 4 = 3 steps per epoch, 6 steps in all."""
    result = train_cam_model(tiny_params(dataset_root), paths_in(tmp_path_factory.mktemp("whole")),
                             show_progress=False)
    assert result is not None and result.steps == 6
    return result


def test_killed_and_resumed_run_reaches_bit_identical_weights(dataset_root, whole_run, tmp_path):
    params = tiny_params(dataset_root)

    interrupted = paths_in(tmp_path / "interrupted")
    assert train_cam_model(params, interrupted, stop_after_steps=5, show_progress=False) is None
    assert not interrupted.model.exists()
    # Checkpoints came at steps 2, 3 (epoch end) and 4; step 5's work is lost, as in a kill.
    saved = [torch.load(path, weights_only=True) for path in interrupted.checkpoint_root.glob("cam_train/*/last.pt")]
    assert len(saved) == 1 and saved[0]["step"] == 4
    torch.manual_seed(12345)  # a different global RNG at restart must not matter: the checkpoint restores it
    resumed = train_cam_model(params, interrupted, show_progress=False)
    assert resumed is not None

    whole_weights = torch.load(whole_run.model_path, weights_only=True)["model"]
    resumed_weights = torch.load(resumed.model_path, weights_only=True)["model"]
    assert whole_weights.keys() == resumed_weights.keys()
    for name in whole_weights:
        assert torch.equal(whole_weights[name], resumed_weights[name]), name
    assert not list(interrupted.checkpoint_root.glob("cam_train/*"))  # cleared at the end

    # The comparison is sensitive: another seed (other data order, augmentations, drop path) differs.
    other = train_cam_model(replace(params, runtime=replace(params.runtime, seed=1)), paths_in(tmp_path / "other"),
                            show_progress=False)
    other_weights = torch.load(other.model_path, weights_only=True)["model"]
    assert not torch.equal(other_weights["blocks.0.attn.qkv.weight"], whole_weights["blocks.0.attn.qkv.weight"])

    # dvclive wrote one row per epoch for loss, lr and val mAP, also across the resume.
    metrics = json.loads((interrupted.live_dir / "metrics.json").read_text())
    assert metrics["step"] == 1 and 0.0 <= metrics["val"]["map_class_token"] <= 1.0
    for name in ("train/loss.tsv", "train/lr.tsv", "val/map_class_token.tsv", "val/map_patch_cam.tsv"):
        rows = (interrupted.live_dir / "plots" / "metrics" / name).read_text().splitlines()
        assert [row.split("\t")[0] for row in rows[1:]] == ["0", "1"], name


def test_a_deit_init_replaced_at_the_same_path_is_not_resumed(dataset_root, tmp_path):
    """A run killed after a checkpoint, its DeiT init file replaced at the same path, then run again: the resume
    key held the path only, so the new run continued from weights that came from the old file. Now the file's
    bytes are in the key: the second run starts its own checkpoint (two folders)."""
    import timm

    def deit_file(seed: int) -> None:
        torch.manual_seed(seed)
        deit = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2,
                                             mlp_ratio=2.0, num_classes=10)
        torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")

    base = tiny_params(dataset_root)
    params = replace(base, cam=replace(base.cam, arch=replace(base.cam.arch, pretrained=str(tmp_path / "deit.pth"))))
    paths = paths_in(tmp_path / "run")
    deit_file(1)
    assert train_cam_model(params, paths, stop_after_steps=3, show_progress=False) is None  # checkpoints at 2 and 3
    deit_file(2)  # other weights, same path: a run of its own from step 0 (the same file resumes: the test above)
    assert train_cam_model(params, paths, stop_after_steps=2, show_progress=False) is None
    assert sorted(torch.load(path, weights_only=True)["step"]
                  for path in paths.checkpoint_root.glob("cam_train/*/last.pt")) == [2, 3]


def test_cam_infer_writes_store_metrics_and_the_whole_curve(dataset_root, whole_run, tmp_path):
    params = tiny_params(dataset_root)
    paths = CamInferPaths(model=whole_run.model_path, store=tmp_path / "cams" / "train.h5",
                          metrics=tmp_path / "metrics" / "cam.json", curve=tmp_path / "plots" / "curve.csv")
    metrics = infer_cams(params, paths, show_progress=False)

    written = json.loads(paths.metrics.read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["split"] == "train" and written["variant"] == "fused_affinity"
    assert written["threshold_chosen_with_gt"] is True and written["n_images"] == 12
    assert set(written["per_class"]) == {"background", "red", "blue"}
    assert set(written["variants"]) == {"class_token", "patch_cam", "fused", "fused_affinity"}
    with paths.curve.open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 60 and float(rows[0]["threshold"]) == 0.0 and float(rows[-1]["threshold"]) == 0.59
    curve = [float(row["miou"]) for row in rows]
    assert max(curve) == pytest.approx(written["miou"], abs=1e-6)
    assert float(rows[int(np.argmax(curve))]["threshold"]) == pytest.approx(written["best_threshold"])
    assert curve == [float(row["fused_affinity"]) for row in rows]

    reader = CamStoreReader(paths.store)
    dataset = PreparedDataset.open(dataset_root)
    reader.check_matches(dataset.class_names, dataset.split("train"))
    for image_id in dataset.split("train"):
        classes, cams = reader.read(image_id)
        assert classes == dataset.image_labels(image_id)
        assert cams.shape == (len(classes), 32, 32) and 0.0 <= cams.min() and cams.max() <= 1.0
        assert np.all(cams.max(axis=(1, 2)) > 0.99)


def test_augmented_samples_are_a_function_of_seed_epoch_and_index(dataset_root):
    dataset = PreparedDataset.open(dataset_root)
    augmented = ClassificationDataset(dataset, "train", 32, augment=ClassificationAugment(32, 0.5, 2, 9), seed=0)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    first, labels = augmented[(1, 5)]
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is left untouched
    augmented[(0, 2)]
    again, _ = augmented[(1, 5)]
    assert torch.equal(first, again)
    assert not torch.equal(first, augmented[(2, 5)][0])
    assert first.shape == (3, 32, 32) and labels.tolist() == dataset.label_vector(dataset.split("train")[5]).tolist()
    plain = ClassificationDataset(dataset, "val", 24)
    image, _ = plain[0]
    assert image.shape == (3, 24, 24) and torch.isfinite(image).all()


def test_a_val_image_without_labels_is_a_negative_and_a_train_image_without_labels_is_refused(tmp_path):
    """prepare keeps COCO val's unannotated images in val (only train drops them): cam_train validates on them
    as all-zero label vectors, while a training set still refuses an image it could learn nothing from."""
    root = write_tiny_dataset(tmp_path / "data", n_train=8, n_val=4)
    dataset = PreparedDataset.open(root)
    blank = dataset.split("val")[-1]
    write_labels(root, "tiny", list(dataset.class_names), {**dataset.labels, blank: []})
    write_mask(root / "SegmentationClass" / f"{blank}.png", np.zeros((32, 32), dtype=np.uint8))
    dataset = PreparedDataset.open(root)
    val_set = ClassificationDataset(dataset, "val", 32, allow_unlabelled=True)
    assert val_set[3][1].tolist() == [0.0, 0.0] and val_set[0][1].sum() >= 1
    with pytest.raises(DatasetError, match=f"labels.json: image {blank} has no class labels"):
        ClassificationDataset(dataset, "val", 32)
    result = train_cam_model(tiny_params(root, epochs=1), paths_in(tmp_path / "run"), show_progress=False)
    assert result is not None and result.steps == 2 and 0.0 < result.val_map_class_token <= 1.0
    write_labels(root, "tiny", list(dataset.class_names), {**dataset.labels, dataset.split("train")[0]: []})
    with pytest.raises(DatasetError, match="has no class labels"):
        train_cam_model(tiny_params(root, epochs=1), paths_in(tmp_path / "refused"), show_progress=False)


def test_epoch_batches_cover_each_epoch_once_and_resume_from_any_step():
    sampler = EpochBatchSampler(n_items=10, batch_size=4, seed=3, total_steps=9)
    batches = list(sampler)
    assert [len(batch) for batch in batches] == [4, 4, 2] * 3
    for epoch in range(3):
        keys = [key for batch in batches[3 * epoch:3 * epoch + 3] for key in batch]
        assert sorted(index for _, index in keys) == list(range(10))
        assert {e for e, _ in keys} == {epoch}
    assert batches[0] != batches[3]  # a fresh order per epoch
    assert list(EpochBatchSampler(10, 4, 3, 9, start_step=4)) == batches[4:]


