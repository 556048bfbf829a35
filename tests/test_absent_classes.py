"""Absent-class repair against hand-worked cases: which pixels an absent class takes, and what stays put."""

import numpy as np
import pytest

from weakclip_core.method.absent_classes import absent_classes, boost_absent_classes


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
