"""``PackedMasks``: WeakCLIP's seed masks held compressed, read back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from weakclip_core.data.packed_masks import PackedMasks


def seed_like_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A seed mask as CAM thresholds make them: background, a confident blob or two of a class, and an
    unlabelled (255) band between confident foreground and confident background, with ragged edges."""
    rows, cols = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), dtype=np.uint8)
    for cls in rng.choice(np.arange(1, 81), size=2, replace=False):
        centre = rng.uniform([0, 0], [height, width])
        radius = rng.uniform(0.1, 0.3) * min(height, width)
        distance = np.hypot(rows - centre[0], cols - centre[1]) + rng.normal(0, 3, (height, width))
        mask[(distance < radius * 1.4) & (mask == 0)] = 255
        mask[distance < radius] = cls
    return mask


def test_masks_read_back_exactly_and_as_independent_writable_arrays() -> None:
    rng = np.random.default_rng(0)
    plain = {"noise": rng.integers(0, 256, (37, 53), dtype=np.uint8),  # incompressible: still exact
             "seed": seed_like_mask(480, 640, rng), "tiny": np.array([[255]], dtype=np.uint8),
             "empty": np.zeros((0, 7), dtype=np.uint8)}
    packed = PackedMasks()
    for image_id, mask in plain.items():
        packed[image_id] = mask
    assert list(packed) == list(plain) and len(packed) == 4
    assert "seed" in packed and "absent" not in packed and 3 not in packed
    for image_id, mask in plain.items():
        got = packed[image_id]
        assert got.dtype == np.uint8 and got.shape == mask.shape
        np.testing.assert_array_equal(got, mask)
    first = packed["seed"]
    first[:] = 7  # a reader's own copy: the stored mask is untouched
    np.testing.assert_array_equal(packed["seed"], plain["seed"])
    packed["seed"] = plain["noise"]  # replaced, as a dict
    np.testing.assert_array_equal(packed["seed"], plain["noise"])


def test_seed_masks_take_a_small_fraction_of_their_array_size() -> None:
    """COCO's 82,081 seed masks of ~640x480 were ~25 GB as arrays in every DDP rank; packed, seed-like masks
    take under a twentieth of that (the share measured here, 50 masks)."""
    rng = np.random.default_rng(1)
    packed = PackedMasks()
    raw = 0
    for index in range(50):
        mask = seed_like_mask(480, 640, rng)
        packed[str(index)] = mask
        raw += mask.nbytes
    assert packed.packed_bytes() < raw / 20, (packed.packed_bytes(), raw)


@pytest.mark.parametrize("mask", [np.zeros((4, 4), dtype=np.int64), np.zeros((4, 4, 3), dtype=np.uint8)])
def test_only_2d_uint8_masks_are_packed(mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"a packed mask is a \(H, W\) uint8 array"):
        PackedMasks()["a1"] = mask


def test_membership_is_answered_without_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SeededTrainingSet`` checks every id is in the mapping: ``Mapping.__contains__`` unpacked each mask to
    answer (about 30 s a rank on COCO's 82k masks)."""
    import zlib

    packed = PackedMasks()
    packed["a1"] = np.zeros((8, 8), dtype=np.uint8)
    monkeypatch.setattr(zlib, "decompress", lambda *_: pytest.fail("unpacked to answer 'in'"))
    assert "a1" in packed and "a2" not in packed
