"""Resumable, deterministic data order for step-based trainers.

Step ``s`` of a run always sees the same samples: epoch ``s // steps_per_epoch``
is a permutation of the items drawn from (seed, epoch), cut into full batches
(the last partial batch of an epoch is dropped, so one batch never holds the
same item twice). The sampler yields ``(epoch, index)`` keys, which a dataset
turns into an augmented sample seeded by (seed, epoch, index). A resumed run
starts the sampler at its next step and sees exactly what an uninterrupted
run would, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from weakclip_core.errors import InputError

# Separates the data-order stream from the per-sample augmentation streams of the same seed.
_ORDER_STREAM = 0x5EED


class BatchSizeError(InputError):
    """A batch size larger than the items to sample: not one full batch, so not one step. A stage names its
    params key (``pipeline._stage.params_key``)."""


def epoch_permutation(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The item order of ``epoch``: a permutation of range(n_items) drawn from (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, _ORDER_STREAM])).permutation(n_items)


class StepSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for steps ``start_step`` .. ``total_steps - 1`` (``batch_size`` keys a step)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, total_steps: int, start_step: int = 0) -> None:
        if n_items < batch_size:
            raise BatchSizeError(f"{batch_size} is larger than the {n_items} training samples "
                                 f"(a step needs one full batch)")
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step
        self.steps_per_epoch = n_items // batch_size

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size

    def keys_of_step(self, step: int) -> list[tuple[int, int]]:
        """The ``batch_size`` (epoch, index) keys of one step."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(self.n_items, self.seed, epoch)
        start = position * self.batch_size
        return [(epoch, int(index)) for index in order[start:start + self.batch_size]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cached_epoch, order = -1, np.empty(0, dtype=np.int64)
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, epoch_permutation(self.n_items, self.seed, epoch)
            start = position * self.batch_size
            for index in order[start:start + self.batch_size]:
                yield epoch, int(index)
