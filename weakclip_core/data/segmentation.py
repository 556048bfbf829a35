"""Image + mask pairs for dense training (seg_train): images from a prepared dataset, masks from any folder.

The mask folder is the prepared ``SegmentationClass`` (GT, the upper bound) or the pseudo masks. A
sample is a pure function of (seed, epoch, index): ``weakclip_core.data.sampling.StepSampler`` hands
``(epoch, index)`` keys to the dataset, which draws its augmentation from ``sample_rng(seed, epoch, index)``. So DataLoader workers
need no shared state, and a run resumed mid-epoch sees exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

from weakclip_core.errors import InputError
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from weakclip_core.data.layout import DatasetError, PreparedDataset, read_mask
from weakclip_core.data.transforms import DenseAugmentation, sample_rng, to_tensor


class MaskedImageDataset(Dataset):
    """``dataset[(epoch, index)]`` → ((3, crop, crop) float32 normalised image, (crop, crop) int64 mask)."""

    def __init__(self, dataset: PreparedDataset, image_ids: Sequence[str], mask_dir: str | Path,
                 augmentation: DenseAugmentation, seed: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.image_ids = list(image_ids)
        self.mask_dir = Path(mask_dir)
        self.augmentation = augmentation
        self.seed = seed
        self.mean = tuple(mean)
        self.std = tuple(std)
        missing = [image_id for image_id in self.image_ids if not self.mask_path(image_id).is_file()]
        if missing:
            raise DatasetError(f"{self.mask_dir}: {len(missing)} of {len(self.image_ids)} masks missing "
                               f"(first: {self.mask_path(missing[0]).name})")

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image_id = self.image_ids[index]
        image = self.dataset.image(image_id)
        mask = read_mask(self.mask_path(image_id))
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"{self.mask_path(image_id)}: mask {mask.shape} does not match image {image.shape[:2]}")
        image, mask = self.augmentation(image, mask, sample_rng(self.seed, epoch, index))
        return to_tensor(image, self.mean, self.std), torch.from_numpy(mask.astype(np.int64))



class GroundTruthMaskError(InputError):
    """A pseudo-mask folder that is (or resolves to) a ground-truth folder: WSSS must never train on GT."""


def refuse_ground_truth_dir(mask_dir: str | Path, ground_truth_dirs: Sequence[str | Path], what: str) -> Path:
    """``mask_dir`` resolved; raises ``GroundTruthMaskError`` when it resolves to (or lies inside) any of
    ``ground_truth_dirs`` (symlinks followed), naming both folders and the key ``what`` that chose it."""
    resolved = Path(mask_dir).resolve()
    for ground_truth in ground_truth_dirs:
        ground_truth_resolved = Path(ground_truth).resolve()
        if resolved == ground_truth_resolved or ground_truth_resolved in resolved.parents:
            raise GroundTruthMaskError(
                f"{what}: {mask_dir} resolves to the ground-truth mask folder {ground_truth_resolved}; "
                "pseudo masks must live elsewhere (weak supervision must never read or overwrite GT masks)")
    return resolved


def ground_truth_dirs(prepared_root: str | Path, source_root: str | Path | None = None,
                      coco_masks: str | Path | None = None) -> list[Path]:
    """Every folder holding GT masks: the prepared ``SegmentationClass``; under the source tree
    (``dataset.source``) VOC's ``SegmentationClass`` and ``SegmentationClassAug``, your own data's ``masks``
    (README "Your own data") and the masks hustvl/WeakCLIP's ``parse_coco.py`` writes into a COCO tree
    (``voc_format/class_labels``); and COCO's pre-rendered masks wherever ``dataset.coco_masks`` puts them."""
    folders = [Path(prepared_root) / "SegmentationClass"]
    if source_root:
        folders += [Path(source_root) / name for name in ("SegmentationClass", "SegmentationClassAug", "masks",
                                                           "voc_format/class_labels")]
    if coco_masks:
        folders.append(Path(coco_masks))
    return folders
