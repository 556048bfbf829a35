"""Seeds made elsewhere: MCTformer CAM dumps (``cam.source: npy_folder``) and pseudo-mask PNGs
(``weakclip.seeds.source: mask_folder``), read and checked image by image.

**CAM dump** (xulianuwa/MCTformer ``engine.py``, ``--cam-npy-dir``): one ``<id>.npy`` per image, written by
``np.save`` of a dict ``{foreground class index (0-based, class c = key + 1): (H, W) float map}`` holding the
image's labelled classes only, each map min-max normalised to [0, 1] at the image's size. Read by
``weakclip_core.artifacts.safe_npy.load_pickled_npy``: the pickle inside may name numpy's array reconstruction
and nothing else, so a tampered dump cannot run code.

**Pseudo masks**: one ``<id>.png`` per train image, palette or greyscale, class indices 0..K-1 (0 background),
255 unlabelled, at the image's size (the reference trains WeakCLIP on such masks, e.g. MCTformer's
``SegmentationClassAugPseudoMaskMCT``).

A file that is missing, unreadable, of the wrong shape or with the wrong keys raises ``ImportedSeedError``
naming it; nothing is written under a final name before every file has been read.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from weakclip_core.artifacts.safe_npy import load_pickled_npy
from weakclip_core.data.layout import IGNORE_INDEX, DatasetError, check_mask, read_mask


CAM_RANGE_SLACK = 1e-3
"""How far outside [0, 1] an imported CAM may stray (float error of a min-max normalisation) before it is
refused: clipping more would silently flatten a CAM that was never normalised."""


class ImportedSeedError(DatasetError):
    """An imported CAM dump or pseudo mask is missing or does not fit its image; the message names the file."""


def read_mctformer_cam(path: Path, classes: list[int], image_shape: tuple[int, int]) -> np.ndarray:
    """The ``(len(classes), H, W)`` float32 CAMs in [0, 1] of one dump, in the order of ``classes`` (the image's
    foreground labels, 1-based). The dump's keys must be exactly the labels' 0-based indices."""
    if not path.is_file():
        raise ImportedSeedError(f"{path}: CAM dump not found (cam.npy_folder needs <id>.npy for every train image)")
    try:
        data = load_pickled_npy(path)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as error:  # a refused pickle included
        raise ImportedSeedError(f"{path}: unreadable CAM dump ({error})") from None
    if not isinstance(data, dict):
        raise ImportedSeedError(f"{path}: expected MCTformer's CAM dump (a dict 0-based class index -> (H, W) "
                                f"map), got {type(data).__name__} of shape {getattr(data, 'shape', '?')}")
    not_indices = [key for key in data if not isinstance(key, (int, np.integer))]
    if not_indices:
        raise ImportedSeedError(f"{path}: key {not_indices[0]!r} is not a 0-based class index (MCTformer's dump "
                                "holds one map per labelled class, keyed by its index)")
    keys = sorted(int(key) for key in data)
    expected = [c - 1 for c in classes]
    if keys != expected:
        raise ImportedSeedError(f"{path}: keys {keys} but the image's labels are the 0-based classes {expected}")
    maps = []
    for class_index in classes:
        try:
            cam = np.asarray(data[class_index - 1], dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ImportedSeedError(f"{path}: class {class_index - 1} map is not an array of numbers "
                                    f"({type(data[class_index - 1]).__name__}: {error})") from None
        if cam.shape != tuple(image_shape):
            raise ImportedSeedError(f"{path}: class {class_index - 1} map is {cam.shape}, the image is "
                                    f"{tuple(image_shape)} (H, W)")
        if not np.isfinite(cam).all():
            raise ImportedSeedError(f"{path}: class {class_index - 1} map holds NaN or infinity")
        low, high = float(cam.min()), float(cam.max())
        if low < -CAM_RANGE_SLACK or high > 1.0 + CAM_RANGE_SLACK:
            raise ImportedSeedError(f"{path}: class {class_index - 1} map spans [{low:.4g}, {high:.4g}], not [0, 1]: "
                                    "MCTformer's dumps are min-max normalised per class (a uint8 or raw CAM "
                                    "clipped to [0, 1] would lose its shape): normalise yours the same way")
        maps.append(np.clip(cam, 0.0, 1.0))  # float error around 0 and 1 only
    return np.stack(maps) if maps else np.zeros((0, *image_shape), dtype=np.float32)


def read_pseudo_mask(path: Path, image_shape: tuple[int, int], n_classes: int,
                     classes: list[int]) -> tuple[np.ndarray, list[int]]:
    """One imported pseudo mask, checked for size and class range; pixels of a class the image is not
    labelled with become 255 (unlabelled), as the seeds never name an absent class. Returns the mask and the
    foreground classes the file shows (before that), so the caller can tell masks whose class indices do not
    follow the dataset's."""
    if not path.is_file():
        raise ImportedSeedError(f"{path}: pseudo mask not found (weakclip.seeds.mask_folder needs <id>.png for "
                                "every train image)")
    mask = read_mask(path)
    try:
        check_mask(mask, path, image_shape, n_classes)
    except DatasetError as error:
        raise ImportedSeedError(str(error)) from None
    allowed = np.zeros(256, dtype=bool)
    allowed[[0, IGNORE_INDEX, *classes]] = True
    counts = np.bincount(mask.ravel(), minlength=256)  # one pass; np.unique sorts the whole mask
    shown = [int(value) for value in np.flatnonzero(counts) if value not in (0, IGNORE_INDEX)]
    return np.where(allowed[mask], mask, IGNORE_INDEX).astype(np.uint8), shown


def masks_off_their_labels(shown_by_image: dict[str, list[int]],
                           labels_by_image: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """``(with_foreground, strays)``: the images whose mask shows a foreground class, and those of them whose mask
    shows a class their image is not labelled with (in image order)."""
    with_foreground = [image_id for image_id, shown in shown_by_image.items() if shown]
    strays = [image_id for image_id in with_foreground
              if not set(shown_by_image[image_id]) <= set(labels_by_image[image_id])]
    return with_foreground, strays


def check_mask_classes_follow_labels(shown_by_image: dict[str, list[int]], labels_by_image: dict[str, list[int]],
                                     folder: Path) -> str | None:
    """Masks showing a class their image is not labelled with. WSSS pseudo masks are made within the image's
    labels, so such classes say the masks' indices are not the dataset's (another class order, an off-by-one,
    another dataset's masks); their pixels become unlabelled in the seeds. More than half of the masks with
    foreground so: ``ImportedSeedError`` (an off-by-one shows a foreign class on nearly every mask, even where a
    shifted class happens to land on a real label). Some: the warning line to show, else ``None``."""
    with_foreground, strays = masks_off_their_labels(shown_by_image, labels_by_image)
    if not strays:
        return None
    first = strays[0]
    example = (f"first: {first}.png shows classes {shown_by_image[first]}, its image is labelled "
               f"{labels_by_image[first]}")
    if 2 * len(strays) > len(with_foreground):
        raise ImportedSeedError(
            f"weakclip.seeds.mask_folder: {folder}: {len(strays)} of the {len(with_foreground)} masks with "
            f"foreground show classes their image is not labelled with ({example}): the masks' class indices must "
            "be the dataset's (0 background, i = the dataset's class i, 255 unlabelled)")
    return (f"{len(strays)} of {len(with_foreground)} masks in {folder} show classes their image is not labelled "
            f"with ({example}); those pixels are left unlabelled")
