"""PASCAL VOC 2012 (optionally with the SBD "aug" masks) into the prepared VOC layout.

``source`` is the folder holding ``JPEGImages/`` and the mask folder named by
``dataset.voc_mask_dir`` (``SegmentationClass`` palette PNGs, or
``SegmentationClassAug`` greyscale PNGs from SBD). A split ``<name>`` is read from
the first of these that exists:

1. ``<source>/ImageSets/Segmentation/<name>.txt`` (VOC's own lists; put ``train_aug.txt`` here), or
2. ``<source>/<name>.txt`` (the SBD-style list shipped beside ``SegmentationClassAug``).

A list line is either an image id (``2007_000032``) or the DeepLab pair form
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``): a first token that is a path
(holds ``/``) or a file name (ends in ``.jpg``/``.jpeg``/``.png``) gives its file stem as the id; any other
first token is the id whole (``frame.0002`` stays ``frame.0002``). Every image is decoded once to prove it is readable;
images are hard-linked into the prepared folder when it is on the same file system
(else copied; a hard link shares the source file, so leave the source read-only),
masks are re-written as palette PNGs, and image-level labels are derived from the masks, or, with
``dataset.voc_cls_labels``, read from MCTformer's ``cls_labels.npy`` (``labels_only.py``); then an image
without a GT mask is kept (it is simply not scored).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqdm import tqdm

from weakclip_core.data.layout import (DatasetError, check_image_id, check_mask, labels_from_mask, read_image,
                                       read_mask, read_text_file, write_labelled_splits, write_labels, write_mask)

VOC_CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor"]
"""VOC's 21 classes in index order (0 background, 1..20 foreground)."""


def link_or_copy(source_file: Path, destination: Path) -> None:
    """Hard-link the file ``source_file`` names to ``destination`` (same file system), else copy it.

    A symlink is followed to its target first: ``os.link`` would hard-link the symlink itself, which keeps
    pointing outside the dataset (absolute) or dangles in the prepared folder (relative). A link whose
    target is not a file raises ``DatasetError`` naming both."""
    target = Path(os.path.realpath(source_file))
    if not target.is_file():
        raise DatasetError(f"{source_file}: a symlink to {target}, which is not a file")
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    try:
        os.link(target, destination)
    except OSError:
        shutil.copyfile(target, destination)


def find_split_list(source: Path, split: str) -> Path:
    """The split list file for ``split`` (see the module docstring for where it is looked for)."""
    candidates = [source / "ImageSets" / "Segmentation" / f"{split}.txt", source / f"{split}.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{candidates[0]}: split list for {split!r} not found (also looked for {candidates[1]})")


IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""File name endings (compared lower-cased) that make a split list token a file name rather than an id."""


def split_list_id(token: str) -> str:
    """The image id the first token of a split list line names.

    Only a path (the DeepLab pair form, ``/JPEGImages/2007_000032.jpg``) or an image file name loses its
    folder and suffix: taking the stem of every token cut an id holding a dot short (``frame.0002`` became
    ``frame``, which read the wrong image or none, and made ``a.1`` and ``a.2`` one id listed twice)."""
    if "/" in token or token.lower().endswith(IMAGE_FILE_SUFFIXES):
        return Path(token).stem
    return token


def read_split_list(path: Path) -> list[str]:
    """Image ids of a VOC split list, in order; either plain ids or DeepLab "image mask" pairs."""
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_text_file(path, "split list").splitlines(), start=1):
        if not line.strip():
            continue
        image_id = check_image_id(split_list_id(line.split()[0]), path)
        if image_id in first_line:
            raise DatasetError(f"{path}:{number}: image {image_id} is listed twice (first on line "
                               f"{first_line[image_id]}); it would count twice in training and scoring")
        first_line[image_id] = number
    if not first_line:
        raise DatasetError(f"{path}: split is empty")
    return list(first_line)


def prepare_voc(source: str | Path, root: str | Path, splits: list[str], mask_dir: str = "SegmentationClass",
                drop_unlabelled_from: tuple[str, ...] = (), progress: bool = True,
                image_labels: dict[str, list[int]] | None = None,
                image_labels_file: str | Path | None = None) -> dict[str, list[str]]:
    """Write the VOC tree at ``source`` into the prepared folder ``root``; returns split -> image ids.

    Images without any foreground class are left out of the splits in ``drop_unlabelled_from``
    (the training split: its classifier needs at least one label per image).
    ``image_labels`` (read from ``image_labels_file``, MCTformer's ``cls_labels.npy``): the image-level
    labels; every listed image needs an entry, and a GT mask becomes optional (copied when present).
    """
    source, root = Path(source), Path(root)
    required = (source, source / "JPEGImages") if image_labels is not None else (
        source, source / "JPEGImages", source / mask_dir)
    for folder in required:
        if not folder.is_dir():
            raise DatasetError(f"{folder}: VOC folder not found (dataset.source / dataset.voc_mask_dir)")
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    ids_by_split = {split: read_split_list(find_split_list(source, split)) for split in splits}

    labels: dict[str, list[int]] = {}
    all_ids = list(dict.fromkeys(image_id for ids in ids_by_split.values() for image_id in ids))

    def listed_in(image_id: str) -> str:
        """The first split whose list names the image (for the error messages)."""
        return next(split for split, ids in ids_by_split.items() if image_id in ids)

    for image_id in tqdm(all_ids, desc="voc", unit="img", disable=not progress):
        image_path = source / "JPEGImages" / f"{image_id}.jpg"
        mask_path = source / mask_dir / f"{image_id}.png"
        if not image_path.is_file():
            raise DatasetError(f"{image_path}: image listed in split {listed_in(image_id)!r} is absent")
        if image_labels is not None and image_id not in image_labels:
            raise DatasetError(f"{image_labels_file}: no labels for image {image_id} (listed in split "
                               f"{listed_in(image_id)!r})")
        image = read_image(image_path)
        link_or_copy(image_path, root / "JPEGImages" / f"{image_id}.jpg")
        if mask_path.is_file():
            mask = read_mask(mask_path)
            check_mask(mask, mask_path, image.shape[:2], len(VOC_CLASS_NAMES))
            write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
        elif image_labels is None:  # without image-level labels the mask is the labels: it must be there
            raise DatasetError(f"{mask_path}: GT mask of image {image_id} (listed in split {listed_in(image_id)!r}) "
                               f"not found in dataset.voc_mask_dir {mask_dir!r}; train_aug's images need SBD's "
                               "SegmentationClassAug, or give dataset.voc_cls_labels to prepare images without masks")
        labels[image_id] = labels_from_mask(mask) if image_labels is None else list(image_labels[image_id])

    kept_by_split = write_labelled_splits(root, ids_by_split, labels, drop_unlabelled_from,
                                          lambda split: find_split_list(source, split))
    write_labels(root, "voc", VOC_CLASS_NAMES, labels)
    return kept_by_split
