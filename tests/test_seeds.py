"""Seeds from CAMs against hand-worked masks (both modes, no-class image, all-ignore image)."""

import numpy as np
import pytest

from weakclip_core.config.weakclip import SeedConfig
from weakclip_core.method.seeds import confident_seeds, dense_seeds, seeds_from_cams

# Two present classes (3 and 7) on a 2 x 3 image.
CAMS = np.array([
    [[0.90, 0.50, 0.10],
     [0.30, 0.45, 0.05]],   # class 3
    [[0.20, 0.60, 0.12],
     [0.30, 0.20, 0.70]],   # class 7
], dtype=np.float32)
CLASSES = [3, 7]


def test_confident_seeds_hand_worked():
    # fg 0.4, bg 0.15: (0,0) 3 wins 0.9; (0,1) 7 wins 0.6; (0,2) max 0.12 -> bg;
    # (1,0) tie 0.3 in the band -> ignore; (1,1) 3 wins 0.45; (1,2) 7 wins 0.7.
    expected = np.array([[3, 7, 0],
                         [255, 3, 7]], dtype=np.uint8)
    result = confident_seeds(CAMS, CLASSES, fg_threshold=0.4, bg_threshold=0.15)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)


def test_confident_seeds_foreground_needs_the_argmax():
    # Both CAMs above fg: the larger one wins, never the other one.
    cams = np.array([[[0.8]], [[0.9]]], dtype=np.float32)
    np.testing.assert_array_equal(confident_seeds(cams, [1, 2], 0.5, 0.1), [[2]])


def test_confident_seeds_tie_goes_to_the_first_class():
    # Equal CAMs above fg: the first class of ``classes`` wins, in either order of the list.
    cams = np.array([[[0.8]], [[0.8]]], dtype=np.float32)
    np.testing.assert_array_equal(confident_seeds(cams, [1, 2], 0.5, 0.1), [[1]])
    np.testing.assert_array_equal(confident_seeds(cams, [2, 1], 0.5, 0.1), [[2]])


def test_confident_seeds_higher_thresholds_leave_more_ignore():
    expected = np.array([[3, 255, 0],
                         [255, 255, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(confident_seeds(CAMS, CLASSES, fg_threshold=0.65, bg_threshold=0.15), expected)


def test_no_class_image_is_all_background():
    empty = np.zeros((0, 2, 3), dtype=np.float32)
    np.testing.assert_array_equal(confident_seeds(empty, [], 0.4, 0.15), np.zeros((2, 3), np.uint8))
    np.testing.assert_array_equal(dense_seeds(empty, [], 0.15), np.zeros((2, 3), np.uint8))


def test_all_ignore_when_every_pixel_is_in_the_band():
    cams = np.full((1, 3, 4), 0.3, dtype=np.float32)
    np.testing.assert_array_equal(confident_seeds(cams, [5], 0.4, 0.15), np.full((3, 4), 255, np.uint8))
    # Dense seeds label every pixel: 0.3 beats the background score 0.15.
    np.testing.assert_array_equal(dense_seeds(cams, [5], 0.15), np.full((3, 4), 5, np.uint8))


def test_dense_seeds_hand_worked():
    # Background score 0.35: (0,0) 3; (0,1) 7; (0,2) bg; (1,0) 0.3 < 0.35 -> bg; (1,1) 3 (0.45); (1,2) 7.
    expected = np.array([[3, 7, 0],
                         [0, 3, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(dense_seeds(CAMS, CLASSES, bg_threshold=0.35), expected)


def test_dense_seeds_tie_goes_to_background():
    cams = np.array([[[0.2, 0.21]]], dtype=np.float32)
    np.testing.assert_array_equal(dense_seeds(cams, [4], 0.2), [[0, 4]])


def test_seeds_from_cams_follows_the_mode():
    confident = SeedConfig(mode="confident", fg_threshold=0.4, bg_threshold=0.15)
    dense = SeedConfig(mode="dense", fg_threshold=0.4, bg_threshold=0.35)
    np.testing.assert_array_equal(seeds_from_cams(CAMS, CLASSES, confident), [[3, 7, 0], [255, 3, 7]])
    np.testing.assert_array_equal(seeds_from_cams(CAMS, CLASSES, dense), [[3, 7, 0], [0, 3, 7]])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="n_present=1"):
        confident_seeds(CAMS, [3], 0.4, 0.15)
