"""Image + multi-hot label samples over one split of a ``PreparedDataset`` (MCTformer training).

Training samples are keyed by ``(epoch, index)``: every random choice of the
augmentation (random resized crop, flip, RandAugment, random erasing) is drawn from torch's
generator forked and seeded from (seed, epoch, index) (and Python's ``random`` and numpy's global
generator, which timm's RandAugment and RandomErasing use, seeded alike and restored after), so a sample is a pure
function of those three and of nothing that ran before. A resumed run
therefore sees exactly the batches an uninterrupted one would.
``EpochBatchSampler`` makes the data order a function of (seed, epoch) too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing

from weakclip_core.data.layout import PreparedDataset
from weakclip_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (independent streams via SeedSequence)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class ClassificationAugment:
    """DeiT-style train augmentation on uint8 tensors: random resized crop, horizontal flip, RandAugment.

    ``crop_scale_min``: smallest crop area fraction (DeiT uses 0.08; multi-label
    images lose labelled objects under small crops, so ours is larger).
    ``randaugment_ops`` = 0 turns torchvision's RandAugment off. ``auto_augment``: a timm RandAugment
    string (MCTformer's ``rand-m9-mstd0.5-inc1``, with timm's DeiT hparams: translate 0.45 of the size,
    ImageNet-mean fill, bicubic); ``reprob``: timm ``RandomErasing`` after normalisation (pixel mode, one
    box), as MCTformer's ``--reprob 0.25``.
    """

    image_size: int
    crop_scale_min: float = 0.5
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    auto_augment: str = ""
    reprob: float = 0.0

    def build(self) -> Callable[[Tensor], Tensor]:
        """The uint8 (3, H, W) → uint8 (3, S, S) part, before normalisation."""
        steps: list[Callable[[Tensor], Tensor]] = [
            v2.RandomResizedCrop(self.image_size, scale=(self.crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if self.randaugment_ops > 0:
            steps.append(v2.RandAugment(num_ops=self.randaugment_ops, magnitude=self.randaugment_magnitude))
        if self.auto_augment:
            timm_randaugment = rand_augment_transform(self.auto_augment, {
                "translate_const": int(self.image_size * 0.45),
                "img_mean": tuple(min(255, round(255 * channel)) for channel in IMAGENET_MEAN),
                "interpolation": Image.BICUBIC})

            def on_pil(image: Tensor) -> Tensor:
                return v2.functional.pil_to_tensor(timm_randaugment(v2.functional.to_pil_image(image)))

            steps.append(on_pil)
        return v2.Compose(steps)

    def build_erasing(self) -> Callable[[Tensor], Tensor] | None:
        """The normalised (3, S, S) → (3, S, S) part (timm RandomErasing), or ``None`` when ``reprob`` is 0."""
        if self.reprob <= 0:
            return None
        return RandomErasing(self.reprob, mode="pixel", max_count=1, device="cpu")


class ClassificationDataset(Dataset):
    """(image (3, S, S) float32 normalised, labels (C,) float32 multi-hot) per image of ``split``.

    With ``augment`` the dataset is indexed by ``(epoch, index)`` and the
    sample is augmented deterministically from (seed, epoch, index); without,
    by ``index`` and the image is resized to ``image_size`` x ``image_size``.
    ``mean``/``std`` default to ImageNet (DeiT); pass CLIP's for a CLIP backbone.
    ``allow_unlabelled``: a val set keeps images with no class (COCO val's unannotated ones) as all-zero label
    vectors, negatives for every class; a training set refuses them (they teach a multi-label head nothing).
    """

    def __init__(self, dataset: PreparedDataset, split: str, image_size: int,
                 augment: ClassificationAugment | None = None, seed: int = 0,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD, allow_unlabelled: bool = False) -> None:
        self.dataset = dataset
        self.allow_unlabelled = allow_unlabelled
        self.image_ids = dataset.split(split)
        self.image_size = image_size
        self.seed = seed
        self.augment = augment.build() if augment is not None else None
        self.erasing = augment.build_erasing() if augment is not None else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        for image_id in self.image_ids:  # fail early, naming labels.json, on a missing or (unless allowed) empty entry
            dataset.image_labels(image_id, allow_unlabelled)

    def __len__(self) -> int:
        return len(self.image_ids)

    def normalise(self, image: Tensor) -> Tensor:
        """(3, H, W) uint8 → float32 normalised."""
        return (image.float() / 255.0 - self.mean) / self.std

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        if self.augment is not None:
            if not isinstance(key, tuple):
                raise TypeError("an augmented ClassificationDataset is indexed by (epoch, index)")
            epoch, index = key
        else:
            epoch, index = 0, int(key)  # type: ignore[arg-type]
        image_id = self.image_ids[index]
        image = torch.from_numpy(self.dataset.image(image_id)).permute(2, 0, 1).contiguous()
        if self.augment is not None:
            sample_seed = derived_seed(self.seed, epoch, index)
            python_state, numpy_state = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed % 2**32)
                try:
                    normalised = self.normalise(self.augment(image))
                    if self.erasing is not None:
                        normalised = self.erasing(normalised)
                finally:
                    random.setstate(python_state)
                    np.random.set_state(numpy_state)
            return normalised, torch.from_numpy(self.dataset.label_vector(image_id, self.allow_unlabelled))
        if image.shape[1:] != (self.image_size, self.image_size):
            image = v2.functional.resize(image, [self.image_size, self.image_size], antialias=True)
        labels = torch.from_numpy(self.dataset.label_vector(image_id, self.allow_unlabelled))
        return self.normalise(image), labels


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for steps ``start_step`` .. ``total_steps - 1``.

    Epoch ``e`` visits a permutation drawn from (seed, e); step ``s`` is batch
    ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``. The last batch of
    an epoch may be short. Starting at any step gives the same batches from there on.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, total_steps: int, start_step: int = 0) -> None:
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step
        self.steps_per_epoch = steps_per_epoch(n_items, batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(derived_seed(self.seed, epoch)).permutation(self.n_items)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order_epoch, order = -1, np.empty(0, dtype=np.int64)
        for step in range(self.start_step, self.total_steps):
            epoch, batch_index = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self.epoch_order(epoch)
            chunk = order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]
            yield [(epoch, int(index)) for index in chunk]


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    return max(1, -(-n_items // batch_size))
