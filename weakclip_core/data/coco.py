"""MS COCO 2014 into the prepared VOC layout, with semantic masks decoded by pycocotools.

``source`` holds ``annotations/instances_{train,val}2014.json`` and the image folders
``train2014/``, ``val2014/`` (or ``images/train2014/``, ``images/val2014/``: hustvl/WeakCLIP's ``COCO14``
layout); split ``train`` reads the first pair, ``val`` the second. ``dataset.coco_masks`` takes the masks
from a folder of pre-rendered PNGs instead, in the encoding ``dataset.coco_mask_encoding`` states.
Image ids are the file stems (``COCO_train2014_000000000009``), so two image entries with one stem (in a
split or across the two) are refused. The entries are read in ``id`` order: integer ids numerically, then
any other ids (a COCO-format export of one's own data may use strings, which pycocotools accepts) by text.

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


def image_order(image_info: dict[str, Any]) -> tuple[int, int, str]:
    """Sort key of an ``images`` entry: integer ids (or strings of digits) in numeric order, then every other id
    in text order. COCO's ids are integers, but pycocotools indexes any hashable id, and an ``int()`` of
    ``"img7"`` stopped a COCO-format export of one's own data with a bare ``ValueError``."""
    identifier = image_info.get("id")
    if isinstance(identifier, int) and not isinstance(identifier, bool):
        return 0, identifier, ""
    if isinstance(identifier, str) and identifier.isascii() and identifier.isdigit():
        return 0, int(identifier), ""
    return 1, 0, str(identifier)


def claim_image_id(owners: dict[str, tuple[Path, str, object]], image_id: str, annotations_path: Path,
                   file_name: str, coco_id: object) -> None:
    """Record that ``file_name`` (image ``coco_id`` of ``annotations_path``) becomes the prepared image ``image_id``
    (its file stem), refusing a stem an earlier entry already took: ``a.jpg`` and ``a.png``, or ``a.jpg`` in both
    splits' folders, would share one prepared image, mask and labels entry, the later silently replacing the
    earlier (the repeated-``file_name`` check does not see them: the names differ)."""
    if image_id in owners:
        first_path, first_file, first_id = owners[image_id]
        where = "" if first_path == annotations_path else f" in {first_path}"
        raise DatasetError(f"{annotations_path}: images {first_id} ({first_file}{where}) and {coco_id} ({file_name}) "
                           f"share the file stem {image_id}, the prepared image id; the second's image, mask and "
                           "labels would replace the first's (rename one file)")
    owners[image_id] = (annotations_path, file_name, coco_id)


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
    except Exception as error:  # pycocotools raises a bare Exception for an empty polygon ([[]])
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
                      image_shape: tuple[int, int], annotated: set[int] | None = None,
                      annotations_name: str = "") -> np.ndarray:
    """The mask of ``image_id`` from a folder of pre-rendered PNGs, as contiguous classes 0..80 / 255.

    The file is ``<id>.png`` or, as hustvl/WeakCLIP's ``parse_coco.py`` names them, the 12-digit number
    after the last ``_`` (``000000000009.png``). ``encoding``: ``contiguous`` (0 background, 1..80 in
    category-id order: ``parse_coco.py``'s ``voc_format/class_labels``), or ``category_id`` (the raw COCO
    ids 1..90 with gaps: the 91-class masks the reference's ``COCODataset`` trains on).

    ``annotated``: the classes the image's annotations (crowd ones too) name, from ``annotations_name``. A
    mask class outside them is refused: masks in the other encoding mostly stay inside 0..80 (category id 3,
    car, reads as contiguous class 3, motorcycle), and on a subset of COCO nothing else would notice."""
    candidates = [masks_dir / f"{image_id}.png"]
    number = image_id.rsplit("_", 1)[-1]
    if number != image_id and len(number) == 12 and number.isascii() and number.isdigit():
        # only COCO's own 12-digit numbers: a shorter tail (your own ``img_1``, ``shot_1``) names no image alone,
        # and two ids sharing it would both read one file
        candidates.append(masks_dir / f"{number}.png")
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        also = f" (also looked for {candidates[1].name})" if len(candidates) > 1 else ""
        raise DatasetError(f"{candidates[0]}: mask not found in dataset.coco_masks{also}")
    mask = read_mask(path)
    if mask.shape != tuple(image_shape):
        raise DatasetError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                           f"{image_shape[1]}x{image_shape[0]} (width x height)")
    if encoding == "contiguous":
        beyond = mask[(mask > len(class_of_category)) & (mask != IGNORE_INDEX)]
        if beyond.size:
            raise DatasetError(f"{path}: value {int(beyond[0])} is not a class (dataset.coco_mask_encoding: contiguous "
                               f"expects 0..{len(class_of_category)} and 255; masks holding the COCO category ids "
                               "need dataset.coco_mask_encoding: category_id)")
        check_mask(mask, path, image_shape, len(class_of_category) + 1)
        _check_annotated(mask, path, annotated, annotations_name, encoding)
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
    mapped = mapped.astype(np.uint8)
    _check_annotated(mapped, path, annotated, annotations_name, encoding)
    return mapped


def _check_annotated(mask: np.ndarray, path: Path, annotated: set[int] | None, annotations_name: str,
                     encoding: str) -> None:
    """Every class of ``mask`` must be one the image's annotations name (``pre_rendered_mask``)."""
    if annotated is None:
        return
    unannotated = sorted(set(labels_from_mask(mask)) - annotated)
    if unannotated:
        other = "category_id" if encoding == "contiguous" else "contiguous"
        raise DatasetError(f"{path}: holds class {unannotated[0]}, which {annotations_name} does not annotate in this "
                           f"image (it annotates classes {sorted(annotated) or 'none'}); masks in the other encoding? "
                           f"(dataset.coco_mask_encoding is {encoding}; try {other})")


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
    owner_of_image_id: dict[str, tuple[Path, str, object]] = {}  # across the splits: one prepared folder
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
        image_infos = sorted(coco.dataset.get("images", []), key=image_order)
        if not image_infos:
            raise DatasetError(f"{annotations_path}: split {split!r} is empty (no images)")

        split_ids = []
        image_of_file: dict[str, object] = {}
        for image_info in tqdm(image_infos, desc=f"coco {split}", unit="img", disable=not progress):
            file_name = check_image_id(str(image_info.get("file_name", "")), annotations_path)
            if file_name in image_of_file:  # the later entry's mask and labels would replace the first's
                raise DatasetError(f"{annotations_path}: images {image_of_file[file_name]} and {image_info.get('id')} "
                                   f"both name the file {file_name}")
            image_of_file[file_name] = image_info.get("id")
            image_id = Path(file_name).stem
            claim_image_id(owner_of_image_id, image_id, annotations_path, file_name, image_info.get("id"))
            image_path = image_folder / file_name
            if not image_path.is_file():
                raise DatasetError(f"{image_path}: image listed in {annotations_path.name} is absent")
            image = read_image(image_path)
            try:
                expected = (int(image_info["height"]), int(image_info["width"]))
            except (KeyError, TypeError, ValueError):  # COCO-format exports of one's own data may leave them out
                raise DatasetError(f"{annotations_path}: image {image_info.get('id')} ({file_name}) has no valid "
                                   f"height/width (COCO's image entries give both)") from None
            if image.shape[:2] != expected:
                raise DatasetError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but "
                                   f"{annotations_path.name} says {expected[1]}x{expected[0]} (width x height)")
            if masks_dir:
                annotated = {class_of_category.get(annotation.get("category_id"), -1)
                             for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[image_info["id"]], iscrowd=None))}
                mask = pre_rendered_mask(Path(masks_dir), image_id, mask_encoding, class_of_category, expected,
                                         annotated, annotations_path.name)
            else:
                mask = semantic_mask(coco, image_info, class_of_category, annotations_path)
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


def write_coco_subset(source: str | Path, destination: str | Path, images_per_split: int) -> dict[str, int]:
    """A COCO 2014 tree at ``destination`` holding the first ``images_per_split`` images (by id) of each split, for
    a smoke run: COCO has no split lists to shorten, so ``prepare`` reads every image its annotation files list.
    The annotation files are cut to those images (categories kept whole, so the class list is COCO's 80); the
    image folders are symbolic links to the source's. Returns the image count per split."""
    source, destination = Path(source), Path(destination)
    if images_per_split < 1:
        raise DatasetError(f"--images must be at least 1, got {images_per_split}")
    if destination.exists() and any(destination.iterdir()):
        raise DatasetError(f"{destination}: not empty; give a new folder for the subset")
    counts = {}
    for folder_name in COCO_SPLIT_FOLDERS.values():
        annotations_path = source / "annotations" / f"instances_{folder_name}.json"
        if not annotations_path.is_file():
            raise DatasetError(f"{annotations_path}: COCO annotations file not found")
        document = json.loads(annotations_path.read_text())
        images = sorted(document.get("images", []), key=image_order)[:images_per_split]
        kept_ids = {info["id"] for info in images}
        subset = {**document, "images": images,
                  "annotations": [a for a in document.get("annotations", []) if a.get("image_id") in kept_ids]}
        target = destination / "annotations" / annotations_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(subset))
        (destination / folder_name).symlink_to(image_folder_of(source, folder_name).resolve(), target_is_directory=True)
        counts[folder_name] = len(images)
    return counts


def main(argv: list[str] | None = None) -> None:
    """``python -m weakclip_core.data.coco subset SOURCE DESTINATION --images N`` (``write_coco_subset``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m weakclip_core.data.coco",
                                     description="A small COCO 2014 tree for a smoke run (docs/REPRODUCING.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    subset = commands.add_parser("subset", help="the first N images of each split, annotations cut, images linked")
    subset.add_argument("source", type=Path, help="the COCO 2014 folder (dataset.source)")
    subset.add_argument("destination", type=Path, help="a new folder for the subset")
    subset.add_argument("--images", type=int, default=40, help="images per split (default 40)")
    args = parser.parse_args(argv)
    try:
        counts = write_coco_subset(args.source, args.destination, args.images)
    except DatasetError as error:
        parser.exit(1, f"coco subset: error: {error}\n")
    print(f"coco subset -> {args.destination} ({', '.join(f'{name}: {count}' for name, count in counts.items())}); "
          f"set dataset.source: {args.destination.resolve()}")


if __name__ == "__main__":
    main()
