"""Absent-class repair against hand-worked cases: which pixels an absent class takes, and what stays put;
and the whole refinement of one image (CRF, repair, CRF again) against hand-worked masks and a numpy
reference built from the formula, not from ``boost_absent_classes``."""

import numpy as np
import pytest

from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.method.absent_classes import absent_classes, boost_absent_classes
from weakclip_core.method.crf import dense_crf
from weakclip_core.method.refine import RefinedMasks, refine_probabilities


def row_probabilities(*rows: list[float]) -> np.ndarray:
    """(n, 1, W) probabilities from n rows of W values (one image row)."""
    return np.asarray(rows, dtype=np.float32)[:, None, :]


# Background wins all four pixels; the class's odds against background are 1/9, 1/4, 2/3, 1/19.
BACKGROUND = [0.9, 0.8, 0.6, 0.95]
WEAK_CLASS = [0.1, 0.2, 0.4, 0.05]


def test_absent_classes_lists_labelled_classes_without_a_pixel():
    mask = np.array([[0, 3], [3, 0]], dtype=np.uint8)
    assert absent_classes(mask, [0, 3, 7, 9]) == [7, 9]
    assert absent_classes(mask, [0, 3]) == []
    assert absent_classes(np.zeros((2, 2), np.uint8), [0]) == []  # background is never "absent"


@pytest.mark.parametrize(("odds_ratio", "winners", "class_probability"), [
    # ratio 2: factor 2 / (2/3) = 3; only the pixel with odds 2/3 >= (2/3)/2 flips: 1.2 / (1.2 + 0.6)
    (2.0, [False, False, True, False], [0.3 / 1.2, 0.6 / 1.4, 1.2 / 1.8, 0.15 / 1.1]),
    # ratio 4: factor 6; odds 1/4 >= (2/3)/4 flips too
    (4.0, [False, True, True, False], [0.6 / 1.5, 1.2 / 2.0, 2.4 / 3.0, 0.3 / 1.25]),
])
def test_boost_matches_the_hand_worked_odds(odds_ratio, winners, class_probability):
    probabilities = row_probabilities(BACKGROUND, WEAK_CLASS)
    boosted = boost_absent_classes(probabilities, [0, 3], [3], odds_ratio)
    assert boosted.dtype == np.float32
    np.testing.assert_allclose(boosted[1, 0], class_probability, rtol=1e-6)
    np.testing.assert_allclose(boosted.sum(axis=0), 1.0, rtol=1e-6)
    assert (boosted.argmax(axis=0)[0] == 1).tolist() == winners


def test_best_odds_come_from_background_pixels_only_and_present_classes_keep_their_odds():
    # pixel 0: class 2 wins, class 5 has odds 9 against background there (must not set the scale);
    # pixel 1: background wins, class 5 odds 2/7 (the best among background's pixels); pixel 2: odds 1/8.
    probabilities = row_probabilities([0.01, 0.7, 0.8], [0.9, 0.1, 0.1], [0.09, 0.2, 0.1])
    boosted = boost_absent_classes(probabilities, [0, 2, 5], [5], 2.0)  # factor 2 / (2/7) = 7
    assert boosted.argmax(axis=0)[0].tolist() == [1, 2, 0]
    np.testing.assert_allclose(boosted[2, 0] / boosted[0, 0], 7 * probabilities[2, 0] / probabilities[0, 0],
                               rtol=1e-5)
    np.testing.assert_allclose(boosted[1, 0] / boosted[0, 0], probabilities[1, 0] / probabilities[0, 0],
                               rtol=1e-5)


def test_several_absent_classes_are_each_scaled_by_their_own_best_odds():
    # class 2 odds 3/16, 1/14, 1/6 -> factor 2 / (3/16) = 32/3; class 5 odds 1/16, 5/14, 1/2 -> factor 4.
    probabilities = row_probabilities([0.8, 0.7, 0.6], [0.15, 0.05, 0.1], [0.05, 0.25, 0.3])
    boosted = boost_absent_classes(probabilities, [0, 2, 5], [2, 5, 5], 2.0)  # a repeated class counts once
    unnormalised = np.array([[0.8, 0.7, 0.6], [1.6, 0.05 * 32 / 3, 0.1 * 32 / 3], [0.2, 1.0, 1.2]])
    np.testing.assert_allclose(boosted[:, 0], unnormalised / unnormalised.sum(axis=0), rtol=1e-6)
    assert boosted.argmax(axis=0)[0].tolist() == [1, 2, 2]


def test_the_boost_may_take_pixels_another_labelled_class_won():
    # Documented behaviour: the whole row is scaled (factor 2 / (1/6) = 12), so class 5 takes the pixel
    # class 2 won (0.49 * 12 > 0.5) as well as both of background's.
    probabilities = row_probabilities([0.6, 0.01, 0.5], [0.3, 0.5, 0.45], [0.1, 0.49, 0.05])
    boosted = boost_absent_classes(probabilities, [0, 2, 5], [5], 2.0)
    assert boosted.argmax(axis=0)[0].tolist() == [2, 2, 2]


def test_a_class_with_zero_probability_on_backgrounds_pixels_is_left_alone():
    probabilities = row_probabilities([0.9, 0.3], [0.1, 0.7], [0.0, 0.0])
    np.testing.assert_array_equal(boost_absent_classes(probabilities, [0, 1, 6], [6], 2.0), probabilities)


def test_nothing_absent_or_no_background_pixel_leaves_the_probabilities_alone():
    probabilities = row_probabilities(BACKGROUND, WEAK_CLASS)
    np.testing.assert_array_equal(boost_absent_classes(probabilities, [0, 3], [], 2.0), probabilities)
    foreground_everywhere = row_probabilities([0.2, 0.3], [0.7, 0.6], [0.1, 0.1])
    np.testing.assert_array_equal(boost_absent_classes(foreground_everywhere, [0, 1, 4], [4], 2.0),
                                  foreground_everywhere)


@pytest.mark.parametrize(("classes", "absent", "odds_ratio", "message"), [
    ([0, 3], [3], 0.5, "odds_ratio must be finite and > 1"),
    ([0, 3], [3], 1.0, "odds_ratio must be finite and > 1"),  # at 1 the best pixel only ties with background
    ([0, 3], [3], float("inf"), "odds_ratio must be finite and > 1"),
    ([3, 0], [3], 2.0, "classes must start with background 0"),
    ([0, 3], [4], 2.0, "absent classes [4] are not foreground entries"),
    ([0, 3], [0], 2.0, "absent classes [0] are not foreground entries"),
])
def test_bad_arguments_are_refused(classes, absent, odds_ratio, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        boost_absent_classes(row_probabilities(BACKGROUND, WEAK_CLASS), classes, absent, odds_ratio)


# --------------------------------------------------------------------------- refine_probabilities

NO_IMAGE = np.zeros((1, 4, 3), np.uint8)  # read only by the CRF, which these cases leave out


@pytest.mark.parametrize(("odds_ratio", "expected_final", "absent_after"),
                         [(2.0, [0, 0, 3, 0], ()), (4.0, [0, 3, 3, 0], ()), (0.0, [0, 0, 0, 0], (3,))])
def test_refine_gives_an_absent_labelled_class_the_pixels_of_its_best_odds(odds_ratio, expected_final,
                                                                           absent_after):
    # Background wins every pixel; class 3's odds against it are 1/9, 1/4, 2/3, 1/19, so with ratio 2 it
    # takes the pixels with odds >= (2/3) / 2 (only the third), with ratio 4 those >= (2/3) / 4 (also the
    # second); ratio 0 turns the repair off.
    refined = refine_probabilities(NO_IMAGE, row_probabilities(BACKGROUND, WEAK_CLASS), (0, 3), None, odds_ratio)
    assert isinstance(refined, RefinedMasks)
    assert refined.raw.dtype == refined.final.dtype == np.uint8
    assert refined.raw.tolist() == [[0, 0, 0, 0]]
    assert refined.final.tolist() == [expected_final]
    assert (refined.absent_before_repair, refined.absent_after_repair) == ((3,), absent_after)


def test_refine_maps_rows_back_to_dataset_class_ids_and_leaves_a_complete_mask_alone():
    # Rows are classes (0, 2, 5): the argmax rows 1, 0, 2, 1 are the class ids 2, 0, 5, 2.
    probabilities = row_probabilities([0.2, 0.5, 0.1, 0.3], [0.7, 0.3, 0.2, 0.6], [0.1, 0.2, 0.7, 0.1])
    refined = refine_probabilities(NO_IMAGE, probabilities, (0, 2, 5), None, 2.0)
    assert refined.raw.tolist() == [[2, 0, 5, 2]]
    np.testing.assert_array_equal(refined.final, refined.raw)
    assert refined.absent_before_repair == refined.absent_after_repair == ()


def test_refine_repairs_several_absent_classes_at_once():
    # The hand-worked case of test_several_absent_classes_are_each_scaled_by_their_own_best_odds: rows 1, 2, 2
    # win after the boost, i.e. classes 2, 5, 5; background won everywhere before.
    probabilities = row_probabilities([0.8, 0.7, 0.6], [0.15, 0.05, 0.1], [0.05, 0.25, 0.3])
    refined = refine_probabilities(NO_IMAGE[:, :3], probabilities, (0, 2, 5), None, 2.0)
    assert refined.raw.tolist() == [[0, 0, 0]]
    assert refined.final.tolist() == [[2, 5, 5]]
    assert (refined.absent_before_repair, refined.absent_after_repair) == ((2, 5), ())


def numpy_boost(probabilities: np.ndarray, row: int, odds_ratio: float) -> np.ndarray:
    """The repair's formula written out for one absent row: scale it by ``odds_ratio / best odds`` over the
    pixels background wins, renormalise, float32."""
    values = probabilities.astype(np.float64)
    background_wins = values.argmax(axis=0) == 0
    best_odds = (values[row] / np.maximum(values[0], 1e-8))[background_wins].max()
    values[row] *= odds_ratio / best_odds
    return (values / values.sum(axis=0, keepdims=True)).astype(np.float32)


def test_refine_reruns_the_crf_on_the_boosted_probabilities():
    # A bright square on a dark image; background wins everywhere (class 2: 0.45 in the square, 0.2 outside),
    # so the first CRF leaves class 2 out. Boosted (odds 0.82 in the square, 0.25 outside; ratio 2), the
    # class wins the square, and the colour-aware CRF keeps it there.
    image = np.full((24, 24, 3), 30, np.uint8)
    square = np.zeros((24, 24), bool)
    square[6:18, 6:18] = True
    image[square] = 220
    foreground = np.where(square, 0.45, 0.2).astype(np.float32)
    probabilities = np.stack([1.0 - foreground, foreground])
    crf = CrfConfig(iterations=5, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=20.0, bilateral_srgb=10.0,
                    bilateral_compat=5.0)
    refined = refine_probabilities(image, probabilities, (0, 2), crf, 2.0)
    assert (len(refined.absent_before_repair), len(refined.absent_after_repair)) == (1, 0)
    iou = np.sum((refined.final == 2) & square) / np.sum((refined.final == 2) | square)
    assert iou > 0.9, iou
    # Reference: the CRF alone leaves class 2 out, so the repair must boost it and run the CRF again.
    class_ids = np.array([0, 2], np.uint8)
    assert not np.any(class_ids[dense_crf(image, probabilities, crf).argmax(axis=0)] == 2)
    expected_final = class_ids[dense_crf(image, numpy_boost(probabilities, 1, 2.0), crf).argmax(axis=0)]
    np.testing.assert_array_equal(refined.final, expected_final)
    np.testing.assert_array_equal(refined.raw, np.zeros((24, 24), np.uint8))
    # Without the repair the final mask is the first CRF's.
    unrepaired = refine_probabilities(image, probabilities, (0, 2), crf, 0.0)
    assert not np.any(unrepaired.final == 2) and unrepaired.absent_after_repair == (2,)


@pytest.mark.parametrize(("probabilities", "classes", "message"), [
    (row_probabilities(BACKGROUND, WEAK_CLASS), (0, 3, 4), "probabilities must be (n_classes=3, H, W)"),
    (np.ones((2, 4), np.float32), (0, 3), "probabilities must be (n_classes=2, H, W)"),
    (row_probabilities(BACKGROUND, WEAK_CLASS), (3, 0), "classes must start with background 0"),
    (row_probabilities(BACKGROUND, WEAK_CLASS), (0, 255), "classes must lie in 0..254"),
])
def test_refine_refuses_probabilities_that_do_not_match_the_classes(probabilities, classes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refine_probabilities(NO_IMAGE, probabilities, classes, None, 2.0)
