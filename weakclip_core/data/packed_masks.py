"""Many label masks held in memory compressed: WeakCLIP's seed masks of a whole train split.

``weakclip_train`` makes every train image's seed mask before its first step and reads one per sample. Held as
arrays, COCO's 82,081 masks at about 640x480 take about 25 GB, in every DDP rank: four ranks on one machine
needed 100 GB of RAM before training began. A seed mask is a few large flat regions (background, a class or
two, 255), which zlib packs about thirty-fold, and unpacks in well under a millisecond, beside the image decode
of the same sample. ``PackedMasks`` is a mapping from image id to the exact (H, W) uint8 array.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np

PACK_LEVEL = 1
"""zlib's fastest level: the masks are runs of a few values, which level 1 already packs well."""


class PackedMasks(Mapping[str, np.ndarray]):
    """``{image id: (H, W) uint8 mask}``, each stored zlib-compressed; a read returns a new writable array equal
    to the one stored."""

    def __init__(self) -> None:
        self._packed: dict[str, tuple[tuple[int, int], bytes]] = {}

    def __setitem__(self, image_id: str, mask: np.ndarray) -> None:
        if mask.dtype != np.uint8 or mask.ndim != 2:
            raise ValueError(f"{image_id}: a packed mask is a (H, W) uint8 array, got {mask.dtype} {mask.shape}")
        self._packed[image_id] = ((int(mask.shape[0]), int(mask.shape[1])),
                                  zlib.compress(np.ascontiguousarray(mask).tobytes(), PACK_LEVEL))

    def __getitem__(self, image_id: str) -> np.ndarray:
        shape, packed = self._packed[image_id]
        return np.frombuffer(bytearray(zlib.decompress(packed)), dtype=np.uint8).reshape(shape)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._packed  # Mapping's own would unpack the mask to answer

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed_bytes(self) -> int:
        """The compressed size of every mask together (what the masks cost in memory, less per-entry overhead)."""
        return sum(len(packed) for _, packed in self._packed.values())
