"""bench.heldout: WeakCLIP scored on the held-out val split, over all classes (the reference's evaluation hook)
and restricted to each image's labels, checked against mIoU worked out independently with numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.heldout import HeldOutScores, resolve_revision, score_revision, score_split, selected_map, split_miou
from test_end_to_end import numpy_miou  # the VOC mIoU by hand
from tiny_voc import CLASS_NAMES, write_tiny_voc
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.method.inference import InferenceAugmentation
from weakclip_core.models.weakclip.model import WeakClipOutput

REPO_ROOT = Path(__file__).resolve().parents[1]
CAT = CLASS_NAMES.index("cat")
TTA = InferenceAugmentation(scales=(1.0,), flip=False, crop=64, stride=42, img_scale=None)


def always_cat(images: torch.Tensor) -> torch.Tensor:
    """Logits at a quarter of the input that favour 'cat' everywhere and tie every other class at 0."""
    logits = torch.zeros(images.shape[0], len(CLASS_NAMES), images.shape[2] // 4, images.shape[3] // 4)
    logits[:, CAT] = 1.0
    return logits


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> PreparedDataset:
    write_tiny_voc(tmp_path / "tiny", n_train=4, n_val=10)
    return PreparedDataset.open(tmp_path / "tiny")


def test_all_classes_against_labels_given_worked_by_hand(tiny_dataset: PreparedDataset) -> None:
    """A model that always says 'cat': over all classes every pixel is cat; with the labels given, an image
    without a cat falls back to background (the first of its allowed classes at equal logits)."""
    val = tiny_dataset.split("val")
    holds_cat = [CAT in tiny_dataset.image_labels(image_id) for image_id in val]
    assert any(holds_cat) and not all(holds_cat), "the tiny val split should mix images with and without a cat"
    masks = [tiny_dataset.mask(image_id) for image_id in val]
    everywhere_cat = numpy_miou([(mask, np.full_like(mask, CAT)) for mask in masks], len(CLASS_NAMES))
    labelled = numpy_miou([(mask, np.full_like(mask, CAT if cat else 0)) for mask, cat in zip(masks, holds_cat)],
                          len(CLASS_NAMES))
    assert labelled != pytest.approx(everywhere_cat)

    scores = score_split(always_cat, tiny_dataset, "val", TTA)
    assert scores == HeldOutScores(split="val", unrestricted_miou=pytest.approx(everywhere_cat),
                                   labelled_miou=pytest.approx(labelled), n_images=10)


def test_a_val_image_without_a_class_is_background_with_the_labels_given(tiny_dataset: PreparedDataset) -> None:
    """COCO val keeps its unannotated images (all-background masks): scored with the labels given, only
    background may win there; by hand, as above."""
    import json

    from weakclip_core.data.layout import write_labels, write_mask

    val = tiny_dataset.split("val")
    labels_file = json.loads((tiny_dataset.root / "labels.json").read_text())
    labels_file["labels"][val[0]] = []
    write_labels(tiny_dataset.root, labels_file["dataset"], labels_file["class_names"], labels_file["labels"])
    write_mask(tiny_dataset.root / "SegmentationClass" / f"{val[0]}.png", np.zeros_like(tiny_dataset.mask(val[0])))
    dataset = PreparedDataset.open(tiny_dataset.root)
    masks = [dataset.mask(image_id) for image_id in val]
    holds_cat = [CAT in dataset.image_labels(image_id, allow_empty=True) for image_id in val]
    labelled = numpy_miou([(mask, np.full_like(mask, CAT if cat else 0)) for mask, cat in zip(masks, holds_cat)],
                          len(CLASS_NAMES))
    assert split_miou(always_cat, dataset, val, TTA, restrict_to_labels=True) == pytest.approx(labelled)


def test_images_without_a_mask_are_not_scored(tiny_dataset: PreparedDataset) -> None:
    val = tiny_dataset.split("val")
    for image_id in val[5:]:
        (tiny_dataset.root / "SegmentationClass" / f"{image_id}.png").unlink()
    masks = [tiny_dataset.mask(image_id) for image_id in val[:5]]
    expected = numpy_miou([(mask, np.full_like(mask, CAT)) for mask in masks], len(CLASS_NAMES))
    assert split_miou(always_cat, tiny_dataset, val, TTA, restrict_to_labels=False) == pytest.approx(expected)
    assert split_miou(always_cat, tiny_dataset, val[5:], TTA, restrict_to_labels=False) is None


def test_the_scored_map_is_the_one_named() -> None:
    """`--map logits` scores the model's output, `--map matching` the text-to-patch map λ' (distinct tensors here,
    the matching one in half precision: both come back as float32); any other name is refused, naming the key."""
    output = WeakClipOutput(logits=torch.full((1, 3, 8, 8), 1.0), matching=torch.full((1, 3, 2, 2), 2.0).half())
    logits, matching = selected_map(output, "logits"), selected_map(output, "matching")
    assert logits.shape == (1, 3, 8, 8) and torch.all(logits == 1.0)
    assert matching.shape == (1, 3, 2, 2) and matching.dtype == torch.float32 and torch.all(matching == 2.0)
    with pytest.raises(ValueError, match="scored_map: expected one of logits, matching, got 'cam'"):
        selected_map(output, "cam")


def git(repo: Path, *arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_an_experiment_name_resolves_to_its_commit(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    head = git(tmp_path, "rev-parse", "HEAD")
    git(tmp_path, "update-ref", "refs/exps/ab/cdef/abl-baseline-s1", head)
    assert resolve_revision(tmp_path, "abl-baseline-s1") == head
    assert resolve_revision(tmp_path, "HEAD") == head
    with pytest.raises(ValueError, match="'abl-random-clip-s1' is neither a git revision nor one DVC experiment"):
        resolve_revision(tmp_path, "abl-random-clip-s1")


def test_a_revision_trained_on_other_data_is_refused(tmp_path: Path) -> None:
    """The images come from the workspace: scoring a model against a dataset it was not trained beside would be
    a wrong number, so a revision whose prepare output differs from the workspace's is refused, both named."""
    git(tmp_path, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    prepared = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["dataset"]["prepared_dir"]

    def write_lock(md5: str) -> None:
        lock = {"schema": "2.0", "stages": {"prepare": {"cmd": "python -m pipeline.prepare",
                                                        "outs": [{"path": prepared, "md5": md5}]}}}
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))

    write_lock("a" * 32 + ".dir")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "trained")
    write_lock("b" * 32 + ".dir")
    with pytest.raises(ValueError, match=f"HEAD: trained on {prepared} a{{32}}.dir, the workspace holds b{{32}}.dir"):
        score_revision(tmp_path, "HEAD")
