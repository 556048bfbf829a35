"""Label-only datasets: image-level labels without a GT mask per image (README "Your own data").

Two sources:

- **VOC + MCTformer's ``cls_labels.npy``** (``dataset.voc_cls_labels``): a NumPy file holding a pickled
  0-d object array whose ``.item()`` is a dict ``image id -> float vector of 20``, a multi-hot over VOC's
  foreground classes in index order (entry ``c - 1`` for class ``c``; background is not in it).
  ``read_cls_labels_npy`` reads and checks it; ``voc.prepare_voc`` uses it.
- **Your own folder** (``dataset.name: custom``; ``prepare_custom``)::

      <source>/images/<id>.jpg|.jpeg|.png    the images (suffix in any case: .JPG from a camera is fine)
      <source>/classes.txt                   foreground class names, one a line, in class-index order (1..K-1)
      <source>/labels.csv | labels.json      image id -> class names (exactly one of the two)
      <source>/splits/<split>.txt            image ids, one a line (train_split and val_split at least)
      <source>/masks/<id>.png                optional GT masks: palette or greyscale PNG of class indices
                                             (0 background, i = line i of classes.txt, 255 ignore)

  ``labels.csv``: one row per image, ``<id>,<name>;<name>...`` (an optional header ``image_id,classes``;
  an empty second column = no foreground class). ``labels.json``: ``{"<id>": ["<name>", ...], ...}``.

Every image listed in a split needs a labels entry; a class name not in the class list, an id that is not a
plain file name or a malformed row stops ``prepare`` with ``DatasetError`` naming the file (and line). So do
inputs that would otherwise be read silently wrong: a blank line inside ``classes.txt`` (skipping it would shift
every later class's index against the masks' "i = line i"), two images or two masks for one id (``a.jpg`` and
``a.png``: which one is meant?) and a mask that is not a PNG (JPEG masks are lossy: their class indices blur).
A ``classes.txt`` whose first line is background in another spelling (``Background``, ``__background__``,
labelme's ``_background_``) has it read as class 0, not as class 1. A photo whose EXIF orientation says it is
stored turned (a phone's portrait shot) is prepared upright, as viewers and annotation tools show it, so its
mask is the one drawn on it; ``pipeline/prepare.py`` then checks that the masks show only classes their images
are labelled with (an off-by-one between the masks and ``classes.txt`` stops it).
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from weakclip_core.artifacts.safe_npy import load_pickled_npy
from weakclip_core.data.layout import (DatasetError, check_image_id, check_mask, read_image, read_mask,
                                       read_text_file, write_image, write_labelled_splits, write_labels,
                                       write_mask)
from weakclip_core.data.voc import link_or_copy

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASS_LIST = "classes.txt"
LABEL_FILES = ("labels.csv", "labels.json")


def voc_id_of_key(key: object, path: Path) -> str:
    """A ``cls_labels.npy`` key as a VOC image id. MCTformer's keys are the ids (``"2007_000032"``); IRN's (and its
    descendants') are integers with the underscore dropped (``2007000032``, its ``decode_int_filename``)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        digits = str(int(key))
        if len(digits) != 10:
            raise DatasetError(f"{path}: integer key {digits} is not IRN's encoding of a VOC id (10 digits, "
                               "2007000032 for 2007_000032)")
        return check_image_id(f"{digits[:4]}_{digits[4:]}", path)
    return check_image_id(key, path)  # type: ignore[arg-type]


def read_cls_labels_npy(path: str | Path, n_foreground: int) -> dict[str, list[int]]:
    """MCTformer's ``cls_labels.npy`` (or IRN's, integer keys) as ``id -> sorted class indices (1..n_foreground)``;
    ``DatasetError`` names the file (and the image) when it is not a dict of ``n_foreground``-long 0/1 vectors."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: cls_labels file not found (dataset.voc_cls_labels)")
    try:
        data = load_pickled_npy(path)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as error:  # a refused pickle included
        raise DatasetError(f"{path}: unreadable cls_labels file ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a pickled dict image id -> {n_foreground} floats "
                           f"(MCTformer's cls_labels.npy), got {type(data).__name__}")
    labels: dict[str, list[int]] = {}
    for key, vector in data.items():
        image_id = voc_id_of_key(key, path)
        values = np.asarray(vector)
        if values.shape != (n_foreground,) or not np.isin(values, (0, 1)).all():
            raise DatasetError(f"{path}: image {image_id} has labels of shape {values.shape} "
                               f"{values.tolist()[:4]}..., expected {n_foreground} values of 0 or 1")
        labels[image_id] = [int(index) + 1 for index in np.flatnonzero(values)]
    return labels


def is_background_name(name: str) -> bool:
    """``background`` as annotation tools write it: ``Background``, ``__background__`` (Detectron), labelme's
    ``_background_``. Read as a class of its own, the first line would shift every class by one against the
    masks, which draw background as 0."""
    return name.strip("_").lower() == "background"


def read_class_list(path: Path) -> list[str]:
    """``["background", *names]`` from ``classes.txt`` (a leading background line is accepted, in any of the
    spellings of :func:`is_background_name`)."""
    if not path.is_file():
        raise DatasetError(f"{path}: class list not found (one foreground class name a line)")
    lines = [line.strip() for line in read_text_file(path, "class list").splitlines()]
    while lines and not lines[-1]:
        lines.pop()  # trailing blank lines carry no index
    if "" in lines:
        raise DatasetError(f"{path}:{lines.index('') + 1}: blank line inside the class list; line i is class i, "
                           "so a blank line would shift every class after it: remove it")
    names = lines
    if names and is_background_name(names[0]):
        names = names[1:]
    if not names:
        raise DatasetError(f"{path}: class list is empty")
    backgrounds = [index for index, name in enumerate(names) if is_background_name(name)]
    if backgrounds:
        line = len(lines) - len(names) + backgrounds[0] + 1  # names: lines without a leading background
        raise DatasetError(f"{path}:{line}: {names[backgrounds[0]]!r} is class 0: it may only be the "
                           "first line (or left out); line i after it is class i")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise DatasetError(f"{path}: class {duplicated[0]!r} is listed twice")
    return ["background", *names]


def _class_indices(names: list[str], class_names: list[str], where: str, image_id: str) -> list[int]:
    indices = []
    for name in names:
        if name not in class_names[1:]:
            raise DatasetError(f"{where}: image {image_id} has unknown class {name!r} (classes.txt lists: "
                               f"{', '.join(class_names[1:11])}{' ...' if len(class_names) > 11 else ''})")
        indices.append(class_names.index(name))
    return sorted(set(indices))


def _object_without_repeated_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads``'s object hook: a key given twice is an error (plain JSON keeps the last silently, so an
    image listed twice in ``labels.json`` lost its first labels, where ``labels.csv`` refuses it)."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"image {key!r} is listed twice")
        seen[key] = value
    return seen


def read_labels_file(path: Path, class_names: list[str]) -> dict[str, list[int]]:
    """``labels.csv`` or ``labels.json`` (module docstring) as ``id -> class indices``, checked."""
    labels: dict[str, list[int]] = {}
    text = read_text_file(path, "labels file")
    if path.suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_object_without_repeated_keys)
        except ValueError as error:
            raise DatasetError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a JSON object image id -> list of class names")
        for image_id, names in data.items():
            check_image_id(image_id, path)
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise DatasetError(f"{path}: image {image_id}: expected a list of class names, got "
                                   f"{json.dumps(names)[:40]}")
            labels[image_id] = _class_indices(names, class_names, str(path), image_id)
        return labels
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if line_number == 1 and [cell.strip() for cell in row] == ["image_id", "classes"]:
            continue
        if len(row) != 2:
            raise DatasetError(f"{path}:{line_number}: expected 2 columns '<id>,<name>;<name>', got {len(row)}")
        image_id = check_image_id(row[0].strip(), f"{path}:{line_number}")
        if image_id in labels:
            raise DatasetError(f"{path}:{line_number}: image {image_id} is listed twice")
        names = [name.strip() for name in row[1].split(";") if name.strip()]
        labels[image_id] = _class_indices(names, class_names, f"{path}:{line_number}", image_id)
    return labels


def labels_file_of(source: Path) -> Path:
    """Your own data's one labels file (``labels.csv`` or ``labels.json``) under ``source``."""
    present = [source / name for name in LABEL_FILES if (source / name).is_file()]
    if len(present) != 1:
        raise DatasetError(f"{source / LABEL_FILES[0]}: {'both' if present else 'neither'} of "
                           f"{' and '.join(LABEL_FILES)} found; give exactly one labels file")
    return present[0]


def files_by_id(folder: Path) -> dict[str, list[Path]]:
    """``id -> files`` of ``folder``'s plain files, keyed by name without suffix (one listing for the whole
    dataset, and the suffix's case does not matter: ``IMG_1.JPG`` is image ``IMG_1``)."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix:
                found.setdefault(path.stem, []).append(path)
    return found


def _image_file(images: dict[str, list[Path]], folder: Path, image_id: str, listed_in: Path) -> Path:
    candidates = [path for path in images.get(image_id, []) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not candidates:
        raise DatasetError(f"{folder / (image_id + IMAGE_SUFFIXES[0])}: image listed in {listed_in} is absent "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)}, in any case)")
    if len(candidates) > 1:
        raise DatasetError(f"{candidates[0]}: image {image_id} has {len(candidates)} files "
                           f"({', '.join(path.name for path in candidates)}); keep one")
    return candidates[0]


def _mask_file(masks: dict[str, list[Path]], image_id: str) -> Path | None:
    """The image's GT mask (``<id>.png``, suffix in any case), or None when it has none."""
    candidates = masks.get(image_id, [])
    if not candidates:
        return None
    if len(candidates) > 1 or candidates[0].suffix.lower() != ".png":
        raise DatasetError(f"{candidates[0]}: the mask of image {image_id} must be one PNG of class indices "
                           f"(found {', '.join(path.name for path in candidates)}; a lossy JPEG blurs the indices)")
    return candidates[0]


EXIF_ORIENTATION = 0x0112  # the EXIF tag: 1 = as stored; 2..8 = mirrored and / or turned


def upright_view(path: Path) -> np.ndarray | None:
    """The image as viewers and annotation tools (labelme, CVAT, Label Studio) show it, when its EXIF orientation
    says the stored pixels are turned or mirrored (a phone's portrait photo is stored landscape with
    orientation 6); ``None`` when they are already upright. Your own data only: VOC's and COCO's annotations
    are drawn on the stored pixels."""
    try:
        with Image.open(path) as image:
            if image.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
                return None
            return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    except Exception as error:  # read_image read it already: only the EXIF block can be broken here
        raise DatasetError(f"{path}: unreadable EXIF orientation ({error})") from None


def prepare_custom(source: str | Path, root: str | Path, splits: list[str],
                   drop_unlabelled_from: tuple[str, ...] = (), progress: bool = True) -> dict[str, list[str]]:
    """Write the custom dataset at ``source`` into the prepared folder ``root``; returns split -> ids.

    Images whose labels list no class are left out of the splits in ``drop_unlabelled_from`` (as VOC's)."""
    source, root = Path(source), Path(root)
    images = source / "images"
    if not images.is_dir():
        raise DatasetError(f"{images}: images folder not found (dataset.source; README 'Your own data')")
    class_names = read_class_list(source / CLASS_LIST)
    labels_path = labels_file_of(source)
    all_labels = read_labels_file(labels_path, class_names)
    ids_by_split: dict[str, list[str]] = {}
    for split in splits:
        split_path = source / "splits" / f"{split}.txt"
        if not split_path.is_file():
            raise DatasetError(f"{split_path}: split list for {split!r} not found")
        first_line: dict[str, int] = {}
        for number, line in enumerate(read_text_file(split_path, "split list").splitlines(), start=1):
            if not line.strip():
                continue
            image_id = check_image_id(line.strip(), split_path)
            if image_id in first_line:
                raise DatasetError(f"{split_path}:{number}: image {image_id} is listed twice (first on line "
                                   f"{first_line[image_id]}); it would count twice in training and scoring")
            first_line[image_id] = number
        ids = list(first_line)
        if not ids:
            raise DatasetError(f"{split_path}: split is empty")
        for image_id in ids:
            if image_id not in all_labels:
                raise DatasetError(f"{labels_path}: no labels for image {image_id} (listed in {split_path})")
        ids_by_split[split] = ids
    image_files, mask_files = files_by_id(images), files_by_id(source / "masks")
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[int]] = {}
    first_split: dict[str, str] = {}  # each id's first listing split (an id may be in several): one dict lookup
    for split, ids in ids_by_split.items():  # per image, not a scan of every list (quadratic at 100k images)
        for image_id in ids:
            first_split.setdefault(image_id, split)
    for image_id, split in tqdm(first_split.items(), desc="custom", unit="img", disable=not progress):
        image_path = _image_file(image_files, images, image_id, source / "splits" / f"{split}.txt")
        image = read_image(image_path)
        upright = upright_view(image_path)
        if upright is not None:  # a camera's portrait photo: stored sideways, shown (and annotated) upright
            image = upright
            write_image(root / "JPEGImages" / f"{image_id}.jpg", image)
        elif image_path.suffix.lower() in (".jpg", ".jpeg"):
            link_or_copy(image_path, root / "JPEGImages" / f"{image_id}.jpg")
        else:
            write_image(root / "JPEGImages" / f"{image_id}.jpg", image)
        mask_path = _mask_file(mask_files, image_id)
        if mask_path is not None:
            mask = read_mask(mask_path)
            check_mask(mask, mask_path, image.shape[:2], len(class_names))
            write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
        labels[image_id] = all_labels[image_id]
    kept_by_split = write_labelled_splits(root, ids_by_split, labels, drop_unlabelled_from,
                                          lambda split: source / "splits" / f"{split}.txt")
    write_labels(root, "custom", class_names, labels)
    return kept_by_split
