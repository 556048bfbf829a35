"""WeakCLIP's training set: each train image with the seed mask made from its CAMs, augmented jointly.

Seeds are made once, up front, from the CAM store (``build_seed_masks``): one
(H, W) uint8 mask per image (0 background, k class, 255 ignore), at the image's
size. A sample is keyed by ``(epoch, index)`` (see ``data.sampling.StepSampler``)
and augmented (``MmsegAugmentation``, the reference's pipeline; or ``DenseAugmentation``) with a
generator seeded from (seed, epoch, index), so a resumed run sees exactly the samples an
uninterrupted one would, with any number of loader workers. A crop smaller than the crop size is
padded after normalisation: image 0 (the mean colour), raw pixels the mean colour, seeds 255.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from weakclip_core.artifacts.cam_store import CamStoreError, CamStoreReader
from weakclip_core.config.weakclip import SeedConfig
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.data.packed_masks import PackedMasks
from weakclip_core.data.transforms import DenseAugmentation, MmsegAugmentation, pad_normalised, sample_rng, to_tensor
from weakclip_core.method.seeds import seeds_from_cams


def build_seed_masks(store: CamStoreReader, dataset: PreparedDataset, image_ids: list[str],
                     config: SeedConfig, progress: bool = True) -> PackedMasks:
    """{image id: (H, W) uint8 seed mask} for ``image_ids``, from the CAMs of each image's classes, held
    compressed (``PackedMasks``: a whole COCO split's masks as arrays took ~25 GB in every DDP rank).

    The store's classes of an image must be the dataset's labels of it, and its
    CAMs must have the image's size: anything else means the store was made
    from another dataset, and the error names the store file.
    """
    store.check_matches(dataset.class_names, image_ids)
    seed_masks = PackedMasks()
    for image_id in tqdm(image_ids, desc="seeds", unit="img", disable=not progress):
        classes, cams = store.read(image_id)
        labels = sorted(dataset.labels.get(image_id, []))
        if sorted(classes) != labels:
            raise CamStoreError(f"{store.path}: image {image_id} has CAMs for classes {classes}, "
                                f"the dataset labels it {labels}")
        seed_masks[image_id] = seeds_from_cams(cams, classes, config)
    return seed_masks


class SeededTrainingSet(Dataset):
    """Train images with their seed masks, keyed by ``(epoch, index)``.

    A sample is a dict:
      ``image``     (3, crop, crop) float32, CLIP-normalised;
      ``raw_image`` (3, crop, crop) uint8, the same pixels unnormalised (for the dense CRF);
      ``seed_mask`` (crop, crop) int64, 0 background, k class, 255 ignore (padding included);
      ``index``     () int64, the image's position in ``image_ids``.
    """

    def __init__(self, dataset: PreparedDataset, image_ids: list[str], seed_masks: Mapping[str, np.ndarray],
                 augmentation: DenseAugmentation | MmsegAugmentation, seed: int) -> None:
        missing = [image_id for image_id in image_ids if image_id not in seed_masks]
        if missing:
            raise ValueError(f"{len(missing)} image(s) have no seed mask, e.g. {missing[0]}")
        self.dataset = dataset
        self.image_ids = list(image_ids)
        self.seed_masks = seed_masks
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        image_id = self.image_ids[index]
        image = self.dataset.image(image_id)
        seed_mask = self.seed_masks[image_id]
        if image.shape[:2] != seed_mask.shape:
            raise ValueError(f"{self.dataset.image_path(image_id)}: image is {image.shape[:2]}, "
                             f"its CAMs/seeds are {seed_mask.shape}")
        image, seed_mask = self.augmentation(image, seed_mask, sample_rng(self.seed, epoch, index))
        raw_image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        normalised, raw_image, seeds = pad_normalised(to_tensor(image), raw_image,
                                                      torch.from_numpy(seed_mask.astype(np.int64)),
                                                      self.augmentation.crop)
        return {"image": normalised, "raw_image": raw_image, "seed_mask": seeds,
                "index": torch.tensor(index, dtype=torch.int64)}
