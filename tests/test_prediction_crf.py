"""The retrained segmenter's test-time CRF (``weakclip_core.method.prediction_crf``) against pydensecrf called by
hand on the same inputs, and against known answers: a class the argmax never shows never appears, one class
shown needs no CRF, and a weak isolated pixel is smoothed into its uniform surroundings."""

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax

from weakclip_core.config import CrfConfig
from weakclip_core.method.prediction_crf import crf_prediction

REFERENCE_VOC_TEST_CRF = CrfConfig(iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=112.0,
                                   bilateral_srgb=2.0, bilateral_compat=3.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def by_hand(image: np.ndarray, logits: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """make_crf's steps written out (tools/make_crf.py, tools/densecrf.py): the argmax's classes, a softmax
    over their logits only, pydensecrf's own ``unary_from_softmax`` (floor 1e-5), the CRF, its argmax mapped
    back to the classes."""
    keys = np.unique(logits.argmax(axis=0))
    probabilities = softmax(logits[keys]).astype(np.float32)
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, len(keys))
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities)))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=np.ascontiguousarray(image),
                             compat=cfg.bilateral_compat)
    q = np.asarray(crf.inference(cfg.iterations)).reshape(len(keys), height, width)
    return keys[q.argmax(axis=0)].astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_crf_runs_on_the_argmax_classes_as_the_reference_does(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    # Spread wide (std 6), so many kept probabilities lie under the 1e-5 floor. The floor cannot move an argmax
    # (checked: 1e-8 gives the same labels): a floored class's unary is at least 11.5, the winner's at most log K,
    # and pydensecrf's normalised kernels bound the pairwise terms by their compat, 3 + 3.
    logits = (6.0 * rng.normal(size=(6, 24, 32))).astype(np.float32)
    logits[4] -= 100.0  # class 4 never wins anywhere: it must not come back through the CRF
    probabilities = softmax(logits)
    assert (probabilities[np.unique(logits.argmax(axis=0))] < 1e-5).mean() > 0.1
    prediction = crf_prediction(image, probabilities, REFERENCE_VOC_TEST_CRF)
    assert prediction.dtype == np.uint8 and prediction.shape == (24, 32)
    np.testing.assert_array_equal(prediction, by_hand(image, logits, REFERENCE_VOC_TEST_CRF))
    assert 4 not in prediction
    assert set(np.unique(prediction)) <= set(np.unique(logits.argmax(axis=0)))


def test_one_class_shown_is_returned_without_a_crf():
    probabilities = np.zeros((3, 5, 7), dtype=np.float32)
    probabilities[2], probabilities[0] = 0.7, 0.3
    image = np.zeros((5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crf_prediction(image, probabilities, REFERENCE_VOC_TEST_CRF), np.full((5, 7), 2))


def test_a_weak_isolated_pixel_joins_its_uniform_surroundings():
    """Known answer: on a flat grey image, class 1 at 0.9 everywhere but one pixel where class 2 leads 0.55 to
    0.45; the argmax shows that pixel as 2, the CRF's smoothness (both kernels agree: same colour, adjacent)
    turns it to 1."""
    probabilities = np.zeros((3, 9, 9), dtype=np.float32)
    probabilities[1], probabilities[0] = 0.9, 0.1
    probabilities[:, 4, 4] = (0.0, 0.45, 0.55)
    image = np.full((9, 9, 3), 128, dtype=np.uint8)
    assert probabilities.argmax(axis=0)[4, 4] == 2
    np.testing.assert_array_equal(crf_prediction(image, probabilities, REFERENCE_VOC_TEST_CRF), np.ones((9, 9)))


def test_mismatched_sizes_and_non_finite_probabilities_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        crf_prediction(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 5), 0.5, np.float32), REFERENCE_VOC_TEST_CRF)
    broken = np.full((2, 4, 4), 0.5, np.float32)
    broken[1, 2, 2] = np.nan  # one NaN would otherwise spread through the CRF to every pixel
    with pytest.raises(ValueError, match="1 non-finite"):
        crf_prediction(np.zeros((4, 4, 3), np.uint8), broken, REFERENCE_VOC_TEST_CRF)


def test_classes_kept_always_stay_even_where_the_argmax_shows_none():
    """``always=(0,)`` (the pseudo masks' background): kept although no pixel's argmax is 0, and the kept rows
    are the originals divided by their sum at each pixel (numpy by hand)."""
    from weakclip_core.method.prediction_crf import shown_classes

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 6, 7)).astype(np.float32)
    logits[0] -= 50.0  # background never wins
    logits[3] -= 50.0  # nor class 3
    probabilities = softmax(logits)
    shown = np.unique(probabilities.argmax(axis=0))
    assert 0 not in shown and 3 not in shown
    classes, kept = shown_classes(probabilities, always=(0,))
    assert classes.tolist() == [0, *shown.tolist()] and classes.dtype == np.uint8
    expected = probabilities[classes] / probabilities[classes].sum(axis=0, keepdims=True)
    np.testing.assert_allclose(kept, expected, rtol=1e-6)
    assert shown_classes(probabilities)[0].tolist() == shown.tolist()


@pytest.mark.parametrize("twin", ["shown_classes_torch", "shown_classes_on_device"])
def test_the_device_twin_keeps_the_same_classes_and_rows_ties_and_always_included(twin: str):
    """seg_eval's CRF path takes the classes on the model's device (only the kept rows leave a GPU): the torch ops
    (``shown_classes_torch``, what a GPU runs, here on CPU tensors) and the dispatch (numpy's on a CPU tensor)
    against numpy by hand: the argmax's classes (a tie to the first class, as numpy's argmax), ``always`` added,
    the kept rows divided by their sum; a non-finite value refused as ``shown_classes`` refuses it."""
    import torch

    from weakclip_core.method import prediction_crf

    shown_classes_of = getattr(prediction_crf, twin)
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 5, 4)).astype(np.float32)
    logits[0] -= 50.0  # background never wins
    logits[4] -= 50.0  # nor class 4
    logits[5] -= 50.0  # class 5 wins nowhere ...
    logits[:, 0, 0] = [0.0, 0.0, 0.0, 5.0, 0.0, 5.0]  # ... but ties class 3 at one pixel, where 3 wins
    probabilities = softmax(logits)
    expected_classes = np.unique(np.concatenate([probabilities.argmax(axis=0).ravel(), [0]]))
    assert 5 not in expected_classes and 4 not in expected_classes and 3 in expected_classes
    classes, kept = shown_classes_of(torch.from_numpy(probabilities), always=(0,))
    assert classes.dtype == np.uint8 and classes.tolist() == expected_classes.tolist()
    expected = probabilities[expected_classes] / probabilities[expected_classes].sum(axis=0, keepdims=True)
    np.testing.assert_allclose(kept, expected, rtol=1e-6)
    assert shown_classes_of(torch.from_numpy(probabilities))[0].tolist() == expected_classes[1:].tolist()
    broken = torch.from_numpy(probabilities.copy())
    broken[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite"):
        shown_classes_of(broken)
