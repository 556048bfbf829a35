"""Multi-scale / flip / sliding-window inference against models whose output numpy can compute by hand."""

import numpy as np
import pytest
import torch

from weakclip_core.method.inference import (InferenceAugmentation, allowed_class_mask, normalise_images,
                                     predict_image_batch, predict_label_batch, predict_probabilities,
                                     sliding_window_logits, window_starts)


def numpy_softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


class PointwiseLinear(torch.nn.Module):
    """A fixed 1x1 convolution: logits[k] = sum_c W[k, c] x[c] + b[k] at every pixel (numpy-checkable)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(weight).view(*weight.shape, 1, 1))
            self.conv.bias.copy_(torch.from_numpy(bias))
        self.windows_seen: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.windows_seen.append(tuple(images.shape[-2:]))
        return self.conv(images)


def make_linear(n_classes: int = 5, seed: int = 0) -> tuple[PointwiseLinear, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(n_classes, 3)).astype(np.float32)
    bias = rng.normal(size=n_classes).astype(np.float32)
    return PointwiseLinear(weight, bias), weight, bias


def numpy_pointwise(image: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(3, H, W) → (K, H, W) logits."""
    return np.einsum("kc,chw->khw", weight, image) + bias[:, None, None]


def up_down_by_two(image: np.ndarray) -> np.ndarray:
    """Bilinear (half-pixel) upsampling x2 then downsampling /2, worked by hand per axis:
    y_i = 0.75 x_i + 0.125 (x_{i-1} + x_{i+1}) with edge replication."""
    def along(values: np.ndarray, axis: int) -> np.ndarray:
        padded = np.concatenate([np.take(values, [0], axis=axis), values, np.take(values, [-1], axis=axis)], axis=axis)
        n = values.shape[axis]
        previous = np.take(padded, range(0, n), axis=axis)
        following = np.take(padded, range(2, n + 2), axis=axis)
        return 0.75 * values + 0.125 * (previous + following)
    return along(along(image, 1), 2)


def test_window_starts_cover_every_pixel_and_end_flush():
    assert window_starts(224, 128, 85) == [0, 85, 96]
    assert window_starts(128, 128, 85) == [0]
    assert window_starts(100, 128, 85) == [0]
    for length, crop, stride in [(300, 64, 50), (65, 64, 1), (512, 128, 128)]:
        covered = np.zeros(length, dtype=bool)
        for start in window_starts(length, crop, stride):
            assert 0 <= start <= length - crop
            covered[start:start + crop] = True
        assert covered.all()


def test_sliding_window_of_pointwise_model_matches_numpy_with_padding():
    model, weight, bias = make_linear()
    rng = np.random.default_rng(1)
    for height, width in [(37, 50), (10, 12), (16, 40)]:
        image = rng.normal(size=(2, 3, height, width)).astype(np.float32)
        logits = sliding_window_logits(model, torch.from_numpy(image), crop=16, stride=11).numpy()
        expected = np.stack([numpy_pointwise(one, weight, bias) for one in image])
        assert logits.shape == (2, 5, height, width)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        one_window_at_a_time = sliding_window_logits(model, torch.from_numpy(image), crop=16, stride=11,
                                                     max_forward_batch=1).numpy()
        np.testing.assert_allclose(one_window_at_a_time, expected, rtol=1e-5, atol=1e-5)
    assert set(model.windows_seen) == {(16, 16)}  # small images were padded up to the crop


def test_a_view_thinner_than_the_models_minimum_is_padded_to_it_without_pad_to_crop():
    """``pad_to_crop`` off runs a small view as is (mmseg's slide inference), but not below ``min_window``: a
    WeakCLIP needs two patches a side, and a thin image at a small scale (17 px wide at 0.75: 13 px) used to stop
    ``pseudo_masks`` inside the model. Below the minimum the view is zero-padded to it and the padding cropped
    off, so a pointwise model's logits are still numpy's, and no window below the minimum reaches the model."""
    model, weight, bias = make_linear()
    image = np.random.default_rng(2).normal(size=(1, 3, 13, 40)).astype(np.float32)
    logits = sliding_window_logits(model, torch.from_numpy(image), crop=32, stride=21, pad_to_crop=False,
                                   min_window=16).numpy()
    np.testing.assert_allclose(logits[0], numpy_pointwise(image[0], weight, bias), rtol=1e-5, atol=1e-5)
    assert set(model.windows_seen) == {(16, 32)}  # height padded 13 -> 16; width 40 covered by 32-px windows
    model.windows_seen.clear()
    sliding_window_logits(model, torch.from_numpy(image), crop=32, stride=21, pad_to_crop=False)
    assert set(model.windows_seen) == {(13, 32)}  # without a minimum: as is, as before
    with pytest.raises(ValueError, match="min_window must be in 1..crop"):
        InferenceAugmentation(crop=16, stride=8, min_window=32)


def test_multiscale_average_matches_hand_worked_bilinear():
    model, weight, bias = make_linear(seed=3)
    image = np.random.default_rng(2).normal(size=(1, 3, 12, 10)).astype(np.float32)
    tta = InferenceAugmentation(scales=(1.0, 2.0), flip=True, crop=16, stride=8)
    probabilities = predict_probabilities(model, torch.from_numpy(image), tta).numpy()[0]
    at_one = numpy_softmax(numpy_pointwise(image[0], weight, bias))
    at_two = numpy_softmax(numpy_pointwise(up_down_by_two(image[0]), weight, bias))
    np.testing.assert_allclose(probabilities, 0.5 * (at_one + at_two), rtol=1e-5, atol=1e-6)


class AveragePooledLinear(torch.nn.Module):
    """Output stride 4: average-pool 4x4 then a 1x1 conv (a stand-in for WeakCLIP's H/4 logits)."""

    def __init__(self, inner: PointwiseLinear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.nn.functional.avg_pool2d(images, 4))


def test_low_resolution_output_is_resized_to_the_image():
    inner, weight, bias = make_linear(seed=4)
    colour = np.array([0.3, -1.2, 0.8], dtype=np.float32)
    image = np.broadcast_to(colour[:, None, None], (3, 40, 24)).copy()[None]
    tta = InferenceAugmentation(scales=(0.5, 1.0, 1.5), flip=True, crop=16, stride=12)
    probabilities = predict_probabilities(AveragePooledLinear(inner), torch.from_numpy(image), tta).numpy()[0]
    assert probabilities.shape == (5, 40, 24)
    expected = numpy_softmax(weight @ colour + bias)
    # A constant image: every pixel away from the zero padding of the 0.5 scale (its last 2 columns,
    # i.e. 4 image columns on either side once flipped back) sees the constant colour.
    np.testing.assert_allclose(probabilities[:, :, 6:18], np.broadcast_to(expected[:, None, None], (5, 40, 12)),
                               rtol=1e-5, atol=1e-6)


def random_conv(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 6, 5, padding=2)).eval()


def test_flip_makes_prediction_flip_equivariant():
    model = random_conv(0)
    image = torch.randn(2, 3, 30, 42)
    tta = InferenceAugmentation(scales=(0.75, 1.0, 1.5), flip=True, crop=24, stride=16)
    direct = predict_probabilities(model, image, tta)
    mirrored = predict_probabilities(model, image.flip(-1), tta).flip(-1)
    torch.testing.assert_close(direct, mirrored, rtol=1e-5, atol=1e-6)
    # The asymmetric model is not equivariant by itself: the property above comes from the flip.
    no_flip = InferenceAugmentation(scales=(0.75, 1.0, 1.5), flip=False, crop=24, stride=16)
    assert (predict_probabilities(model, image, no_flip)
            - predict_probabilities(model, image.flip(-1), no_flip).flip(-1)).abs().max() > 1e-3


def test_label_restriction_never_emits_an_absent_class():
    model = random_conv(1)
    with torch.no_grad():
        model[2].bias[3] += 50.0  # class 3 would win everywhere if it were allowed
    image = torch.randn(2, 3, 20, 20)
    labels = [[2], [1, 4]]
    allowed = allowed_class_mask(labels, 6)
    tta = InferenceAugmentation(scales=(1.0, 0.5), flip=True, crop=16, stride=8)
    probabilities = predict_probabilities(model, image, tta, allowed).numpy()
    for row, classes in enumerate(labels):
        absent = [k for k in range(6) if k not in [0, *classes]]
        assert (probabilities[row, absent] == 0.0).all()
        assert set(np.unique(probabilities[row].argmax(0))) <= {0, *classes}
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    unrestricted = predict_probabilities(model, image, tta).numpy()
    assert (unrestricted.argmax(1) == 3).all()


def test_mixed_sizes_batch_like_single_images():
    model = random_conv(2)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(20, 24, 3), (16, 16, 3), (20, 24, 3)]]
    labels = [[1], [2, 5], [3]]
    tta = InferenceAugmentation(scales=(1.0,), flip=True, crop=16, stride=8)
    batched = predict_image_batch(model, images, labels, 6, tta)
    assert [p.shape for p in batched] == [(6, 20, 24), (6, 16, 16), (6, 20, 24)]
    for image, classes, probabilities in zip(images, labels, batched):
        single = predict_image_batch(model, [image], [classes], 6, tta)[0]
        np.testing.assert_allclose(probabilities, single, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="predicts 6 classes"):
        predict_image_batch(model, images[:1], None, 7, tta)


def test_the_device_argmax_is_numpys_argmax_of_the_probabilities_ties_included():
    """``predict_label_batch`` takes the argmax where the probabilities are, not on the host: the same class map
    as numpy's argmax of ``predict_image_batch`` (first class of a tie), mixed sizes and labels, uint8."""
    model = random_conv(4)
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(20, 24, 3), (16, 16, 3), (20, 24, 3)]]
    tta = InferenceAugmentation(scales=(1.0, 0.75), flip=True, crop=16, stride=8)
    for labels in ([[1], [2, 5], [3]], None):
        probabilities = predict_image_batch(model, images, labels, 6, tta)
        maps = predict_label_batch(model, images, labels, 6, tta)
        for probability, class_map in zip(probabilities, maps, strict=True):
            assert class_map.dtype == np.uint8 and class_map.shape == probability.shape[1:]
            np.testing.assert_array_equal(class_map, probability.argmax(axis=0))
    constant = torch.nn.Conv2d(3, 6, 1)  # every class the same logit: a tie everywhere, class 0 wins
    torch.nn.init.zeros_(constant.weight), torch.nn.init.zeros_(constant.bias)
    assert (predict_label_batch(constant.eval(), images[:1], None, 6, tta)[0] == 0).all()
    with pytest.raises(ValueError, match="256 classes do not fit a uint8 class map"):
        predict_label_batch(model, images[:1], None, 256, tta)


def test_benchmark_reports_positive_rates_for_each_worker_count():
    from bench.pseudo_bench import bench_dense_model
    from weakclip_core.config.weakclip import CrfConfig

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8) for _ in range(3)]
    result = bench_dense_model(random_conv(3), images, [[1], [2], [1, 5]], 6,
                               InferenceAugmentation(scales=(1.0, 0.5), flip=True, crop=16, stride=8),
                               CrfConfig(iterations=2), batch_size=2, device=torch.device("cpu"), worker_counts=(0,))
    assert result["n_images"] == 3 and result["inference_images_per_s"] > 0
    assert set(result["crf_images_per_s"]) == {"0"} and result["crf_images_per_s"]["0"] > 0


def test_normalise_images_is_clips_mean_and_std_on_0_1_pixels() -> None:
    """What every stage's model sees (seg_eval, pseudo_masks, the closing scores, cam_infer): uint8 (H, W, 3)
    images → (B, 3, H, W) of (x / 255 - mean) / std per channel, worked out in numpy; the mean and std given
    replace CLIP's (ImageNet's for the segmenters)."""
    from weakclip_core.data.transforms import CLIP_MEAN, CLIP_STD

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8) for _ in range(2)]
    expected = np.stack([((image / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
                         for image in images])
    np.testing.assert_allclose(normalise_images(images).numpy(), expected, rtol=1e-5, atol=1e-6)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = ((images[0] / 255.0 - np.array(imagenet[0])) / np.array(imagenet[1])).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(normalise_images(images[:1], *imagenet).numpy(), expected, rtol=1e-5, atol=1e-6)
