"""The dense CRF wrapper against pydensecrf called directly, and its behaviour on hand-made images."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax

from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.method.crf import CrfPool, dense_crf

CFG = CrfConfig(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                bilateral_compat=10.0)


def random_case(seed: int, classes: int = 3, height: int = 12, width: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    logits = rng.normal(size=(classes, height, width))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    probabilities = 0.9 * probabilities + 0.1 / classes  # ≥ 0.033: both unaries clip identically
    return image, probabilities.astype(np.float32)


def two_region_image(height: int = 16, width: int = 16) -> np.ndarray:
    """Left half dark red, right half light blue."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (120, 20, 20)
    image[:, width // 2:] = (170, 200, 250)
    return image


def test_matches_pydensecrf_called_directly() -> None:
    image, probabilities = random_case(0)
    crf = dcrf.DenseCRF2D(10, 12, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    expected = np.array(crf.inference(10)).reshape(3, 12, 10)
    refined = dense_crf(image, probabilities, CFG)
    assert refined.dtype == np.float32 and refined.shape == (3, 12, 10)
    assert np.allclose(refined, expected, atol=1e-6)
    assert np.allclose(refined.sum(axis=0), 1.0, atol=1e-5)


def test_strong_unary_is_preserved() -> None:
    image = two_region_image()
    labels = np.zeros((16, 16), dtype=int)
    labels[:, 8:] = 1
    probabilities = np.where(np.arange(2)[:, None, None] == labels[None], 0.99, 0.01).astype(np.float32)
    refined = dense_crf(image, probabilities, CFG)
    assert np.array_equal(refined.argmax(axis=0), labels)
    assert refined.max(axis=0).min() > 0.9


def test_noisy_labels_are_smoothed_within_a_region() -> None:
    image = two_region_image()
    labels = np.zeros((16, 16), dtype=int)
    labels[:, 8:] = 1
    noisy = labels.copy()
    rng = np.random.default_rng(1)
    flipped = rng.random((16, 16)) < 0.15
    noisy[flipped] = 1 - noisy[flipped]
    assert flipped.sum() >= 10
    probabilities = np.where(np.arange(2)[:, None, None] == noisy[None], 0.65, 0.35).astype(np.float32)
    refined = dense_crf(image, probabilities, CFG)
    assert np.array_equal(refined.argmax(axis=0), labels)


def test_size_mismatch_is_an_error() -> None:
    image, probabilities = random_case(2)
    with pytest.raises(ValueError, match="differ in size"):
        dense_crf(image[:5], probabilities, CFG)


def test_pool_matches_inline() -> None:
    cases = [random_case(seed) for seed in range(3)]
    images = np.stack([image for image, _ in cases])
    probabilities = np.stack([probability for _, probability in cases])
    with CrfPool(CFG, workers=0) as inline:
        expected = inline.map(images, probabilities)
    with CrfPool(CFG, workers=2) as pool:
        first = pool.map(images, probabilities)
        second = pool.map(images[:1], probabilities[:1])  # the same workers serve a second batch
    assert first.shape == (3, 3, 12, 10)
    assert np.array_equal(first, expected)
    assert np.array_equal(second[0], expected[0])
    assert np.allclose(expected[1], dense_crf(images[1], probabilities[1], CFG))
