"""The VOC-layout dataset contract shared by every stage (docs/ARCHITECTURE.md, "Dataset").

A prepared dataset folder holds::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette PNG: 0 background, 1..K classes, 255 ignore
    ImageSets/Segmentation/<split>.txt  one image id per line
    labels.json                         {"dataset": ..., "class_names": [...], "labels": {id: [class indices]}}
    captions.txt                        (synthetic only) "<id>\t<caption>" per line

``labels`` holds foreground class indices 1..K-1 (background 0 is implicit and
never listed), as JSON integers. An image id is a plain file name (one path component:
no ``/`` or ``\\``, not ``..``), checked wherever ids are read (``check_image_id``), so no
path built from an id leaves its folder. Readers raise ``DatasetError`` naming the offending file.
"""

from __future__ import annotations

from weakclip_core.errors import InputError
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from weakclip_core.artifacts.atomic import atomic_path, write_json

IGNORE_INDEX = 255
LABELS_FILE = "labels.json"
CAPTIONS_FILE = "captions.txt"


class DatasetError(InputError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened), index 255 = (224, 224, 192)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.extend([red, green, blue])
    return palette


_PALETTE = voc_palette()


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a (H, W) uint8 class-index mask as a VOC palette PNG, atomically."""
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask must be (H, W), got shape {mask.shape}")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(_PALETTE)
    with atomic_path(path, suffix=".png") as temporary_path:
        image.save(temporary_path, format="PNG", optimize=False)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a palette (or greyscale) PNG mask as (H, W) uint8 class indices."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: mask file not found")
    with opened_image(path, "mask") as image:
        image.load()
        if image.mode in ("P", "L"):
            return np.array(image, dtype=np.uint8)
        if image.mode in MASK_WIDE_MODES:
            return narrowed_mask(np.array(image), path, image.mode)
        raise DatasetError(f"{path}: mask must be a single-channel PNG of class indices (palette, 8- or "
                           f"16-bit greyscale, or 1-bit), got mode {image.mode}")


MASK_WIDE_MODES = ("1", "I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes a mask of class indices is also saved in: 1-bit (a boolean array saved as is: 0/1) and 16- or 32-bit
greyscale (what some annotation tools and ``cv2.imwrite`` of a uint16 array write). Their values are the class
indices as they are; one above 255 cannot be one."""


def narrowed_mask(values: np.ndarray, path: Path, mode: str) -> np.ndarray:
    """A wide-mode mask's values as uint8 class indices, or a ``DatasetError`` naming the file if any value
    (a class index or 255 for ignore) does not fit in 8 bits."""
    if values.size and (int(values.min()) < 0 or int(values.max()) > IGNORE_INDEX):
        raise DatasetError(f"{path}: a {mode} mask holding {int(values.max())}, above {IGNORE_INDEX}: class "
                           f"indices run 0..K-1 with {IGNORE_INDEX} for ignore; re-save it with those values")
    return values.astype(np.uint8)


@contextmanager
def opened_image(path: Path, what: str) -> Iterator[Image.Image]:
    """``Image.open(path)`` for the readers below, turning whatever PIL raises while the file is open (it raises
    many types for a corrupt file) into a ``DatasetError`` naming the file as an unreadable ``what`` ("image",
    "mask"), or as too large; a ``DatasetError`` the reader raises itself passes through unchanged."""
    try:
        with Image.open(path) as image:
            yield image
    except DatasetError:
        raise
    except Image.DecompressionBombError as error:
        raise DatasetError(too_large_message(path, what, error)) from None
    except Exception as error:
        raise DatasetError(f"{path}: unreadable {what} ({error})") from None


def too_large_message(path: Path, what: str, error: Exception) -> str:
    """The refusal of a file above PIL's decompression-bomb guard (2 x ``Image.MAX_IMAGE_PIXELS``, ~179 MP): a
    real photo this large is not corrupt, so say what to do instead of calling it unreadable."""
    return (f"{path}: {what} too large to open ({error}); the chain trains and predicts on images of a few "
            "hundred pixels a side: downscale it (or tile it into several images) before prepare")


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> None:
    """Write a (H, W, 3) uint8 RGB image as JPEG, atomically."""
    with atomic_path(path, suffix=".jpg") as temporary_path:
        Image.fromarray(image.astype(np.uint8), mode="RGB").save(temporary_path, format="JPEG", quality=quality)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image from its header (no decoding); a missing or unreadable file names itself."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    with opened_image(path, "image") as image:
        width, height = image.size
    return height, width


def check_mask(mask: np.ndarray, mask_path: str | Path, image_shape: tuple[int, int], n_classes: int) -> None:
    """Raise ``DatasetError`` naming ``mask_path`` if the (H, W) ``mask`` differs in size from its image
    (``image_shape`` = (H, W)) or holds a class id outside 0..n_classes-1 other than 255 (ignore)."""
    if mask.shape != tuple(image_shape):
        raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                           f"{image_shape[1]}x{image_shape[0]} (width x height)")
    bad = [int(v) for v in np.unique(mask) if v >= n_classes and v != IGNORE_INDEX]
    if bad:
        raise DatasetError(f"{mask_path}: class id {bad[0]} out of range (expected 0..{n_classes - 1} "
                           f"or {IGNORE_INDEX} ignore)")


def read_checked_mask(path: str | Path, image_shape: tuple[int, int], n_classes: int) -> np.ndarray:
    """``read_mask`` + ``check_mask``: the (H, W) uint8 mask of an image of ``image_shape`` over
    ``n_classes`` classes (K, background included). Every stage that scores or trains on a mask reads it
    through here, so a broken mask is reported with its file name, never deep inside a metric or a loss."""
    mask = read_mask(path)
    check_mask(mask, path, image_shape, n_classes)
    return mask


WIDE_IMAGE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
"""PIL modes of 16-bit, 32-bit and float images: ``convert("RGB")`` clips them at 255 (a 16-bit gradient turns
almost all white), and no scaling to 8 bits is right for every sensor, so they are refused."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB; a missing, corrupt or more-than-8-bit file names itself."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    with opened_image(path, "image") as image:
        image.load()
        if image.mode in WIDE_IMAGE_MODES:
            raise DatasetError(f"{path}: a {image.mode} image (more than 8 bits a channel); the chain reads "
                               "8-bit RGB and would clip it at 255: convert it to 8 bits with the scaling "
                               "your data needs")
        return np.array(image.convert("RGB"), dtype=np.uint8)


def read_text_file(path: Path, what: str) -> str:
    """A user's text file (``what``: "class list", "split list", ...) as text: UTF-8, with a leading byte-order
    mark dropped (editors on Windows save one; kept, it would glue itself to the first name, so a
    ``classes.txt`` starting ``\\ufeffbackground`` shifted every class index by one). Anything else that is not
    UTF-8 is a ``DatasetError`` naming the file and line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: unreadable {what} ({error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: the {what} is not UTF-8 (byte {data[error.start]:#04x}); save it as "
                           "UTF-8") from None


def is_plain_image_id(image_id: object) -> bool:
    """Whether ``image_id`` can name files: a non-empty string of one path component (no ``/`` or ``\\``,
    not ``.`` or ``..``, no NUL or line break), so ``JPEGImages/<id>.jpg`` and every output named after it stay
    inside their folders."""
    return (isinstance(image_id, str) and image_id not in ("", ".", "..")
            and not any(character in image_id for character in "/\\\0\n\r"))


def check_image_id(image_id: object, source: str | Path) -> str:
    """``image_id`` if it is a plain file name (``is_plain_image_id``), else ``DatasetError`` naming ``source``
    (the split list or labels file it was read from) and the id. Every reader of ids calls it."""
    if not is_plain_image_id(image_id):
        raise DatasetError(f"{source}: image id {image_id!r} is not a plain file name "
                           f"(one path component: no '/', '\\', '..')")
    return image_id  # type: ignore[return-value]


def write_split(root: str | Path, split: str, image_ids: list[str]) -> None:
    with atomic_path(Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt") as temporary_path:
        temporary_path.write_text("".join(f"{image_id}\n" for image_id in image_ids))


def write_labelled_splits(root: str | Path, ids_by_split: dict[str, list[str]], labels: dict[str, list[int]],
                          drop_unlabelled_from: tuple[str, ...], split_source: Callable[[str], Path]) -> dict[str, list[str]]:
    """Write each split list, leaving out of the splits in ``drop_unlabelled_from`` the images with no class
    label (a WSSS training image needs one); returns the kept ids per split. A split left empty is a
    ``DatasetError`` naming the list it came from (``split_source(split)``)."""
    kept_by_split = {}
    for split, ids in ids_by_split.items():
        kept = [i for i in ids if labels[i]] if split in drop_unlabelled_from else ids
        if not kept:
            raise DatasetError(f"{split_source(split)}: no image of split {split!r} has a class label")
        write_split(root, split, kept)
        kept_by_split[split] = kept
    return kept_by_split


def read_split(root: str | Path, split: str) -> list[str]:
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found")
    image_ids = [check_image_id(line.strip(), path) for line in path.read_text().splitlines() if line.strip()]
    if not image_ids:
        raise DatasetError(f"{path}: split {split!r} is empty")
    return image_ids


def write_labels(root: str | Path, dataset_name: str, class_names: list[str],
                 labels: dict[str, list[int]], extra: dict[str, object] | None = None) -> None:
    """``extra``: further top-level keys (e.g. COCO's ``coco_category_ids``); readers ignore them."""
    write_json(Path(root) / LABELS_FILE, {"dataset": dataset_name, "class_names": class_names,
                                          "labels": {k: sorted(v) for k, v in labels.items()}, **(extra or {})})


def labels_from_mask(mask: np.ndarray) -> list[int]:
    """The foreground classes present in a mask (0 and 255 excluded), sorted."""
    return [int(c) for c in np.unique(mask) if c not in (0, IGNORE_INDEX)]


def _json_text(value: object) -> str:
    """A value as it is written in the JSON file (``true``, ``1.9``, ``"3"``), for messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def read_labels_data(data: object, labels_path: str | Path) -> tuple[list[str], dict[str, list[int]]]:
    """``(class_names, labels)`` of a parsed ``labels.json``, checked: ``class_names`` a list of at least two
    strings (background first), ``labels`` a mapping of plain image ids (``check_image_id``) to lists of int
    class ids (a bool or a float such as ``1.9`` is refused, never rounded) in 1..K-1. ``DatasetError`` names
    the file, the key and the image."""
    if not isinstance(data, dict):
        raise DatasetError(f"{labels_path}: malformed labels file (expected a JSON object, "
                           f"got {_json_text(data)[:40]})")
    for key in ("class_names", "labels"):
        if key not in data:
            raise DatasetError(f"{labels_path}: malformed labels file (no {key!r} key)")
    class_names = data["class_names"]
    if (not isinstance(class_names, list) or len(class_names) < 2
            or not all(isinstance(name, str) for name in class_names)):
        raise DatasetError(f"{labels_path}: 'class_names' must be a list of at least two class names (strings, "
                           f"background first), got {_json_text(class_names)[:60]}")
    raw_labels = data["labels"]
    if not isinstance(raw_labels, dict):
        raise DatasetError(f"{labels_path}: 'labels' must be a mapping of image id to a list of class ids, "
                           f"got a {type(raw_labels).__name__}")
    labels: dict[str, list[int]] = {}
    for image_id, classes in raw_labels.items():
        check_image_id(image_id, labels_path)
        if not isinstance(classes, list):
            raise DatasetError(f"{labels_path}: image {image_id} has labels {_json_text(classes)[:40]}, "
                               f"expected a list of class ids")
        for class_id in classes:
            if isinstance(class_id, bool) or not isinstance(class_id, int):
                raise DatasetError(f"{labels_path}: image {image_id} has class id {_json_text(class_id)}, "
                                   f"not an integer")
            if not 1 <= class_id < len(class_names):
                raise DatasetError(f"{labels_path}: image {image_id} has class id {class_id} outside "
                                   f"1..{len(class_names) - 1}")
        labels[image_id] = list(classes)
    return list(class_names), labels


def check_score_split_inside(train_ids: list[str], score_ids: list[str], train_split: str, score_split: str,
                             lists_in: str | Path) -> None:
    """Every id of the score split must be in the train split (the stages that score train-split outputs
    against GT score that subset). The error names the keys and ``lists_in``, the folder whose lists the user
    edits: the prepared dataset's for a stage, the source tree for ``prepare`` (its staging copy is about to
    be deleted)."""
    in_train = set(train_ids)
    outside = [image_id for image_id in score_ids if image_id not in in_train]
    if outside:
        raise DatasetError(f"dataset.score_split {score_split!r} must lie inside dataset.train_split {train_split!r} "
                           f"(their lists in {lists_in}): {len(outside)} image(s) of score split {score_split!r} "
                           f"are not in train split {train_split!r}, e.g. {outside[0]}")


@dataclass(frozen=True)
class PreparedDataset:
    """Read access to a prepared VOC-layout folder. ``class_names[0]`` is ``background``."""

    root: Path
    name: str
    class_names: list[str]
    labels: dict[str, list[int]]

    @property
    def n_classes(self) -> int:
        """K including background."""
        return len(self.class_names)

    @classmethod
    def open(cls, root: str | Path) -> "PreparedDataset":
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: prepared dataset folder not found (run the prepare stage)")
        labels_path = root / LABELS_FILE
        if not labels_path.is_file():
            raise DatasetError(f"{labels_path}: labels file not found")
        try:
            data = json.loads(labels_path.read_text())
        except ValueError as error:
            raise DatasetError(f"{labels_path}: malformed labels file ({error})") from None
        class_names, labels = read_labels_data(data, labels_path)
        return cls(root=root, name=str(data.get("dataset", root.name)), class_names=class_names, labels=labels)

    def split(self, split: str) -> list[str]:
        return read_split(self.root, split)

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def image(self, image_id: str) -> np.ndarray:
        return read_image(self.image_path(image_id))

    def mask(self, image_id: str) -> np.ndarray:
        mask = read_mask(self.mask_path(image_id))
        return mask

    def checked_mask(self, image_id: str, image_shape: tuple[int, int] | None = None) -> np.ndarray:
        """The GT mask of ``image_id``, checked against its image's size (``image_shape`` (H, W) when the
        caller already has the image, else read from the JPEG header) and the class range 0..K-1 / 255."""
        if image_shape is None:
            image_shape = read_image_size(self.image_path(image_id))
        return read_checked_mask(self.mask_path(image_id), image_shape, self.n_classes)

    def scored_ids(self, train_split: str, score_split: str) -> list[str]:
        """Ids of ``score_split`` (in its order), each of which must be in ``train_split``: the subset a
        stage that runs over the train split scores against GT (e.g. VOC ``train`` inside ``train_aug``)."""
        if score_split == train_split:
            return self.split(train_split)
        image_ids = self.split(score_split)
        check_score_split_inside(self.split(train_split), image_ids, train_split, score_split,
                                 lists_in=self.root / "ImageSets" / "Segmentation")
        return image_ids

    def has_mask(self, image_id: str) -> bool:
        return self.mask_path(image_id).is_file()

    def image_labels(self, image_id: str, allow_empty: bool = False) -> list[int]:
        """Foreground class indices of ``image_id``. An image with no class is an error unless ``allow_empty``:
        training and the train-split stages have nothing to learn from it (prepare leaves such images out of
        train), while a val split keeps them (COCO val's unannotated images, a custom set's empty label rows)
        and the val readers count them as negatives for every class."""
        if image_id not in self.labels:
            raise DatasetError(f"{self.root / LABELS_FILE}: no labels for image {image_id}")
        classes = self.labels[image_id]
        if not classes and not allow_empty:
            raise DatasetError(f"{self.root / LABELS_FILE}: image {image_id} has no class labels")
        return classes

    def label_vector(self, image_id: str, allow_empty: bool = False) -> np.ndarray:
        """(K-1,) float32 multi-hot over foreground classes (index c-1 for class c); all zeros for an image with
        no class when ``allow_empty`` (see ``image_labels``)."""
        vector = np.zeros(self.n_classes - 1, dtype=np.float32)
        for class_index in self.image_labels(image_id, allow_empty):
            vector[class_index - 1] = 1.0
        return vector

    def captions(self) -> dict[str, str]:
        path = self.root / CAPTIONS_FILE
        if not path.is_file():
            raise DatasetError(f"{path}: captions file not found (only the synthetic dataset ships captions)")
        captions = {}
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise DatasetError(f"{path}:{line_number}: expected '<id>\\t<caption>'")
            image_id, caption = line.split("\t", 1)
            captions[check_image_id(image_id, path)] = caption
        return captions
