"""MS COCO 2014 into the prepared VOC layout, with semantic masks decoded by pycocotools.

``source`` holds ``annotations/instances_{train,val}2014.json`` and the image folders
``train2014/``, ``val2014/`` (or ``images/train2014/``, ``images/val2014/``: hustvl/WeakCLIP's ``COCO14``
layout); split ``train`` reads the first pair, ``val`` the second. ``dataset.coco_masks`` takes the masks
from a folder of pre-rendered PNGs instead, in the encoding ``dataset.coco_mask_encoding`` states.
Image ids are the file stems (``COCO_train2014_000000000009``).

Class mapping: COCO's 80 category ids (1..90 with gaps) sorted ascending become the
contiguous classes 1..80 (``person`` = 1, ..., ``toothbrush`` = 80); ``labels.json``
records it as ``coco_category_ids`` (aligned with ``class_names``: entry ``c`` is the
COCO id of class ``c``, entry 0 is ``null`` for background).

Mask rule: crowd regions are painted 255 (ignore) first; non-crowd instances are then
painted largest first, so a small object on a large one stays visible (and covers
any crowd pixels under it). Image-level labels are derived from the finished mask.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from weakclip_core.data.layout import DatasetError, IGNORE_INDEX, check_image_id, check_mask, labels_from_mask, \
    read_image, read_mask, write_labels, write_mask, write_split
from weakclip_core.data.voc import link_or_copy

COCO_SPLIT_FOLDERS = {"train": "train2014", "val": "val2014"}


def _load_annotations(path: Path) -> Any:
    """A pycocotools ``COCO`` index of ``path``; missing or malformed files name themselves."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotations file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as error:
        raise DatasetError(f"{path}: malformed COCO annotations ({type(error).__name__}: {error})") from None


def category_mapping(categories: list[dict[str, Any]], path: Path) -> tuple[list[int], list[str]]:
    """COCO categories -> (category ids sorted ascending, their names); class c is entry c - 1."""
    try:
        ordered = sorted(categories, key=lambda category: int(category["id"]))
        return [int(c["id"]) for c in ordered], [str(c["name"]) for c in ordered]
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: malformed categories ({error})") from None


def semantic_mask(coco: Any, image_info: dict[str, Any], class_of_category: dict[int, int],
                  annotations_path: Path) -> np.ndarray:
    """(H, W) uint8 semantic mask of one image: crowd -> 255, instances largest first -> class ids."""
    height, width = int(image_info["height"]), int(image_info["width"])
    mask = np.zeros((height, width), dtype=np.uint8)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_info["id"]], iscrowd=None))
    for annotation in annotations:
        if annotation.get("category_id") not in class_of_category:
            raise DatasetError(f"{annotations_path}: annotation {annotation.get('id')} of image "
                               f"{image_info['file_name']} has category_id {annotation.get('category_id')} "
                               f"not among the file's categories (class id out of range)")
    crowd = [a for a in annotations if a.get("iscrowd", 0)]
    instances = sorted((a for a in annotations if not a.get("iscrowd", 0)),
                       key=lambda a: float(a.get("area", 0.0)), reverse=True)
    try:
        for annotation in crowd:
            mask[coco.annToMask(annotation).astype(bool)] = IGNORE_INDEX
        for annotation in instances:
            mask[coco.annToMask(annotation).astype(bool)] = class_of_category[annotation["category_id"]]
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise DatasetError(f"{annotations_path}: undecodable segmentation in image {image_info['file_name']} "
                           f"({type(error).__name__}: {error})") from None
    return mask


def image_folder_of(source: Path, folder_name: str) -> Path:
    """``<source>/train2014`` (the COCO zips' layout), else ``<source>/images/train2014`` (hustvl/WeakCLIP's
    ``data/COCO14`` layout, its download script unzipping into ``images/``)."""
    for candidate in (source / folder_name, source / "images" / folder_name):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"{source / folder_name}: COCO image folder not found (also looked for "
                       f"{source / 'images' / folder_name})")


def pre_rendered_mask(masks_dir: Path, image_id: str, encoding: str, class_of_category: dict[int, int],
                      image_shape: tuple[int, int]) -> np.ndarray:
    """The mask of ``image_id`` from a folder of pre-rendered PNGs, as contiguous classes 0..80 / 255.

    The file is ``<id>.png`` or, as hustvl/WeakCLIP's ``parse_coco.py`` names them, the 12-digit number
    after the last ``_`` (``000000000009.png``). ``encoding``: ``contiguous`` (0 background, 1..80 in
    category-id order: ``parse_coco.py``'s ``voc_format/class_labels``), or ``category_id`` (the raw COCO
    ids 1..90 with gaps: the 91-class masks the reference's ``COCODataset`` trains on)."""
    candidates = [masks_dir / f"{image_id}.png", masks_dir / f"{image_id.split('_')[-1]}.png"]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise DatasetError(f"{candidates[0]}: mask not found in dataset.coco_masks (also looked for {candidates[1].name})")
    mask = read_mask(path)
    if mask.shape != tuple(image_shape):
        raise DatasetError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                           f"{image_shape[1]}x{image_shape[0]} (width x height)")
    if encoding == "contiguous":
        check_mask(mask, path, image_shape, len(class_of_category) + 1)
        return mask
    lookup = np.full(256, -1, dtype=np.int16)
    lookup[0], lookup[IGNORE_INDEX] = 0, IGNORE_INDEX
    for category_id, class_index in class_of_category.items():
        lookup[category_id] = class_index
    mapped = lookup[mask]
    if (mapped < 0).any():
        bad = int(mask[mapped < 0][0])
        raise DatasetError(f"{path}: value {bad} is not a COCO category id (dataset.coco_mask_encoding: "
                           f"category_id expects 0, the category ids or 255)")
    return mapped.astype(np.uint8)


def prepare_coco(source: str | Path, root: str | Path, splits: list[str],
                 drop_unlabelled_from: tuple[str, ...] = (), progress: bool = True,
                 masks_dir: str | Path | None = None, mask_encoding: str = "contiguous") -> dict[str, list[str]]:
    """Write the COCO 2014 tree at ``source`` into the prepared folder ``root``; returns split -> image ids.

    ``splits`` are ``train`` and/or ``val``. Images with no foreground class are left out of
    the splits in ``drop_unlabelled_from``. ``masks_dir``: take each image's mask from this folder of
    pre-rendered PNGs in ``mask_encoding`` (``pre_rendered_mask``) instead of rendering the annotations.
    """
    source, root = Path(source), Path(root)
    if not source.is_dir():
        raise DatasetError(f"{source}: COCO folder not found (dataset.source)")
    category_ids: list[int] | None = None
    class_names: list[str] = []
    labels: dict[str, list[int]] = {}
    kept_by_split: dict[str, list[str]] = {}
    for split in splits:
        if split not in COCO_SPLIT_FOLDERS:
            raise DatasetError(f"{source}: COCO split {split!r} unknown (dataset.train_split/val_split must be "
                               f"one of {sorted(COCO_SPLIT_FOLDERS)})")
        folder_name = COCO_SPLIT_FOLDERS[split]
        image_folder = image_folder_of(source, folder_name)
        annotations_path = source / "annotations" / f"instances_{folder_name}.json"
        coco = _load_annotations(annotations_path)
        split_category_ids, split_names = category_mapping(list(coco.dataset.get("categories", [])),
                                                           annotations_path)
        if not split_category_ids:
            raise DatasetError(f"{annotations_path}: no categories")
        if category_ids is None:
            category_ids, class_names = split_category_ids, ["background", *split_names]
        elif split_category_ids != category_ids:
            raise DatasetError(f"{annotations_path}: categories differ from the other split's")
        class_of_category = {category_id: index for index, category_id in enumerate(category_ids, start=1)}
        image_infos = sorted(coco.dataset.get("images", []), key=lambda info: int(info["id"]))
        if not image_infos:
            raise DatasetError(f"{annotations_path}: split {split!r} is empty (no images)")

        split_ids = []
        for image_info in tqdm(image_infos, desc=f"coco {split}", unit="img", disable=not progress):
            image_path = image_folder / check_image_id(str(image_info.get("file_name", "")), annotations_path)
            if not image_path.is_file():
                raise DatasetError(f"{image_path}: image listed in {annotations_path.name} is absent")
            image = read_image(image_path)
            expected = (int(image_info["height"]), int(image_info["width"]))
            if image.shape[:2] != expected:
                raise DatasetError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but "
                                   f"{annotations_path.name} says {expected[1]}x{expected[0]} (width x height)")
            image_id = image_path.stem
            mask = (pre_rendered_mask(Path(masks_dir), image_id, mask_encoding, class_of_category, expected)
                    if masks_dir else semantic_mask(coco, image_info, class_of_category, annotations_path))
            link_or_copy(image_path, root / "JPEGImages" / f"{image_id}.jpg")
            write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
            labels[image_id] = labels_from_mask(mask)
            split_ids.append(image_id)
        kept = [i for i in split_ids if labels[i]] if split in drop_unlabelled_from else split_ids
        if not kept:
            raise DatasetError(f"{annotations_path}: no image of split {split!r} has a labelled class")
        write_split(root, split, kept)
        kept_by_split[split] = kept
    write_labels(root, "coco", class_names, labels,
                 extra={"coco_category_ids": [None, *(category_ids or [])]})
    return kept_by_split


def read_category_ids(labels_path: Path) -> list[int | None]:
    """The ``coco_category_ids`` list of a prepared COCO ``labels.json`` (entry c: COCO id of class c)."""
    try:
        return list(json.loads(labels_path.read_text())["coco_category_ids"])
    except (OSError, ValueError, KeyError) as error:
        raise DatasetError(f"{labels_path}: no coco_category_ids ({error})") from None
