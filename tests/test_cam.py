"""CAM fusion, affinity refinement, multi-scale inference and the threshold sweep, against independent references.

The fusion test recomputes a tiny MCTformer's forward pass in numpy straight
from its weights (patch embedding, LayerNorm, attention, MLP, PatchCAM conv),
so the attention maps it fuses never come from the model under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakclip_core.method.cam import (CAM_VARIANTS, ThresholdSweep, cam_variants, multiscale_cams, normalise_per_class,
                               threshold_values)
from weakclip_core.evaluation.metrics import ConfusionAccumulator
from weakclip_core.models.mctformer import MCTformerV2

N_CLASSES, PATCH, WIDTH, DEPTH, HEADS, IMAGE = 3, 8, 16, 3, 2, 32


def tiny_model(seed: int = 0) -> MCTformerV2:
    """A tiny model whose every weight (LayerNorm and biases included) is a fixed non-trivial value."""
    torch.manual_seed(seed)
    model = MCTformerV2(n_classes=N_CLASSES, image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                        heads=HEADS, drop_path=0.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.5 if ("qkv" in name or "cls_token" in name or "pos_embed" in name) else 0.2
            parameter.copy_(torch.randn_like(parameter) * scale + (1.0 if name.endswith("norm1.weight")
                                                                   or name.endswith("norm2.weight") else 0.0))
    return model.eval()


def layer_norm(tokens: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = tokens.mean(-1, keepdims=True)
    variance = tokens.var(-1, keepdims=True)
    return (tokens - mean) / np.sqrt(variance + 1e-6) * weight + bias


def gelu(values: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * values * (1.0 + erf(values / math.sqrt(2.0)))


def numpy_forward(state: dict[str, np.ndarray], image: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(attention per layer (heads, N, N), PatchCAMs (C, h, w)) of one (3, H, W) image, in float64 numpy."""
    grid = IMAGE // PATCH
    patches = image.reshape(3, grid, PATCH, grid, PATCH).transpose(1, 3, 0, 2, 4).reshape(grid * grid, -1)
    embed_weight = state["patch_embed.proj.weight"].reshape(WIDTH, -1)
    tokens = patches @ embed_weight.T + state["patch_embed.proj.bias"]
    tokens = np.concatenate([state["cls_token"][0], tokens]) + state["pos_embed"][0]
    head_width = WIDTH // HEADS
    attentions = []
    for layer in range(DEPTH):
        prefix = f"blocks.{layer}."
        normed = layer_norm(tokens, state[prefix + "norm1.weight"], state[prefix + "norm1.bias"])
        qkv = normed @ state[prefix + "attn.qkv.weight"].T + state[prefix + "attn.qkv.bias"]
        query, key, value = np.split(qkv, 3, axis=-1)
        heads_out, layer_attention = [], []
        for head in range(HEADS):
            columns = slice(head * head_width, (head + 1) * head_width)
            logits = query[:, columns] @ key[:, columns].T / math.sqrt(head_width)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            layer_attention.append(weights)
            heads_out.append(weights @ value[:, columns])
        attentions.append(np.stack(layer_attention))
        tokens = tokens + np.concatenate(heads_out, -1) @ state[prefix + "attn.proj.weight"].T \
            + state[prefix + "attn.proj.bias"]
        normed = layer_norm(tokens, state[prefix + "norm2.weight"], state[prefix + "norm2.bias"])
        hidden = gelu(normed @ state[prefix + "mlp.fc1.weight"].T + state[prefix + "mlp.fc1.bias"])
        tokens = tokens + hidden @ state[prefix + "mlp.fc2.weight"].T + state[prefix + "mlp.fc2.bias"]
    feature_map = np.pad(tokens[N_CLASSES:].T.reshape(WIDTH, grid, grid), ((0, 0), (1, 1), (1, 1)))
    conv_weight, conv_bias = state["patch_head.weight"], state["patch_head.bias"]
    patch_cams = np.zeros((N_CLASSES, grid, grid))
    for row in range(grid):
        for column in range(grid):
            window = feature_map[:, row:row + 3, column:column + 3]
            patch_cams[:, row, column] = np.tensordot(conv_weight, window, axes=([1, 2, 3], [0, 1, 2])) + conv_bias
    return attentions, patch_cams


def test_fusion_and_affinity_match_an_independent_numpy_forward():
    model = tiny_model()
    state = {name: value.double().numpy() for name, value in model.state_dict().items()}
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(images, return_attention=True)
        variants = cam_variants(output.attentions, output.patch_cams, attention_layers=2)
    grid = IMAGE // PATCH
    for index in range(2):
        attentions, patch_cams = numpy_forward(state, images[index].double().numpy())
        head_mean = [layer.mean(0) for layer in attentions]
        class_token = sum(head_mean[-2:])[:N_CLASSES, N_CLASSES:].reshape(N_CLASSES, grid, grid)
        relu_patch_cam = np.maximum(patch_cams, 0.0)
        fused = class_token * relu_patch_cam
        affinity = sum(head_mean)[N_CLASSES:, N_CLASSES:]
        refined = np.stack([affinity @ fused[c].ravel() for c in range(N_CLASSES)]).reshape(fused.shape)
        expected = {"class_token": class_token, "patch_cam": relu_patch_cam, "fused": fused,
                    "fused_affinity": refined}
        # The maps must be informative: a non-trivial fraction of PatchCAM is clipped by the ReLU.
        assert 0.1 < (patch_cams < 0).mean() < 0.9
        for variant in CAM_VARIANTS:
            np.testing.assert_allclose(variants[variant][index].numpy(), expected[variant], rtol=1e-4, atol=1e-5,
                                       err_msg=variant)


def test_cam_variants_rejects_more_layers_than_the_model_has():
    model = tiny_model()
    with torch.no_grad():
        output = model(torch.zeros(1, 3, IMAGE, IMAGE), return_attention=True)
    with pytest.raises(ValueError, match="attention_layers"):
        cam_variants(output.attentions, output.patch_cams, attention_layers=DEPTH + 1)


def test_multiscale_cams_are_normalised_label_masked_and_flip_equivariant():
    model = tiny_model()
    half = torch.randn(2, 3, 40, 20, generator=torch.Generator().manual_seed(2))
    mirrored = torch.cat([half, half.flip(-1)], dim=-1)  # (2, 3, 40, 40), each image its own mirror
    image_classes = [[1, 3], [2]]  # 1-based classes: image 0 holds classes 1 and 3, image 1 class 2
    cams = multiscale_cams(model, mirrored, image_classes, scales=[1.0, 0.6, 1.3], flip=True, attention_layers=2)
    assert set(cams) == set(CAM_VARIANTS)
    for variant, maps in cams.items():
        assert maps.shape == (2, 2, 40, 40)  # each image's labels, padded to the most labels of any image
        assert torch.isfinite(maps).all()
        assert maps.min() >= 0.0 and maps.max() <= 1.0
        assert torch.all(maps[1, 1] == 0), variant  # image 1's padding
        present = torch.stack([maps[0, 0], maps[0, 1], maps[1, 0]]).flatten(1)
        assert torch.allclose(present.max(dim=1).values, torch.ones(3), atol=1e-5), variant
        assert torch.allclose(present.min(dim=1).values, torch.zeros(3), atol=1e-6), variant
        # Averaging each view with its flipped twin makes the map of a mirror-symmetric image symmetric.
        assert torch.allclose(maps, maps.flip(-1), atol=1e-4), variant


def test_multiscale_cams_of_the_labels_are_the_all_class_maps_by_hand():
    """Each image's maps are those of its classes' tokens: by hand, every class's variant map at each view,
    bilinearly resized to the image, the flipped view un-flipped, averaged, min-max normalised. A view is the
    image at ``round(side * scale)`` pixels, as the reference sizes it (0.7: 28 x 34, not multiples of the
    8-px patch: the model's patch embedding drops the rest and the 3 x 4 grid is stretched over the image)."""
    model = tiny_model()
    images = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(5))
    image_classes = [[2], [1, 2, 3], [3, 1]]
    scales = [1.0, 0.7]
    cams = multiscale_cams(model, images, image_classes, scales=scales, flip=True, attention_layers=2)
    expected: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for scale in scales:
            size = {1.0: (40, 48), 0.7: (28, 34)}[scale]
            for flipped in (False, True):
                view = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
                view = view.flip(-1) if flipped else view
                output = model(view, return_attention=True)
                for variant, maps in cam_variants(output.attentions, output.patch_cams, 2).items():
                    maps = F.interpolate(maps, size=(40, 48), mode="bilinear", align_corners=False)
                    expected[variant] = expected.get(variant, 0) + (maps.flip(-1) if flipped else maps)
    for variant in CAM_VARIANTS:
        everything = expected[variant] / 4
        for index, classes in enumerate(image_classes):
            for position, class_index in enumerate(classes):
                single = everything[index, class_index - 1]
                by_hand = (single - single.min()) / (single.max() - single.min())
                torch.testing.assert_close(cams[variant][index, position], by_hand, rtol=1e-5, atol=1e-6)
            assert torch.all(cams[variant][index, len(classes):] == 0)


def test_normalise_per_class_maps_each_map_to_unit_range_and_constant_maps_to_zero():
    cams = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    expected = np.array([[[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    np.testing.assert_allclose(normalise_per_class(cams).numpy(), expected)


def test_threshold_values_cover_the_whole_inclusive_range():
    values = threshold_values(0.0, 0.59, 0.01)
    assert len(values) == 60 and values[0] == 0.0 and values[-1] == 0.59
    np.testing.assert_allclose(np.diff(values), 0.01)


def test_threshold_sweep_matches_a_hand_worked_example():
    """Two images, classes {0: bg, 1, 2}, thresholds 0, .25, .5, .75, 1 (exact in binary).

    Image A (1x4): GT [0, 1, 1, 255]; labels {1}; CAM_1 = [.25, .5, .875, 1].
    Image B (1x3): GT [0, 2, 0]; labels {1, 2}; CAM_1 = [0, .125, .625], CAM_2 = [.375, .75, .25].
    Best scores (class): A .25(1) .5(1) .875(1); B .375(2) .75(2) .625(1). A score equal to t is background.
    t=0   : preds A 1 1 1, B 2 2 1  -> IoU bg 0,   c1 2/4, c2 1/2 -> 1/3
    t=.25 : A 0 1 1, B 2 2 1        -> IoU bg 1/3, c1 2/3, c2 1/2 -> 1/2
    t=.5  : A 0 0 1, B 0 2 1        -> IoU bg 2/4, c1 1/3, c2 1   -> 11/18
    t=.75 : A 0 0 1, B 0 0 0        -> IoU bg 3/5, c1 1/2, c2 0   -> 11/30
    t=1   : all background          -> IoU bg 3/6, c1 0,   c2 0   -> 1/6
    """
    sweep = ThresholdSweep(3, threshold_values(0.0, 1.0, 0.25))
    sweep.add(np.array([[0, 1, 1, 255]], dtype=np.uint8), np.array([[[0.25, 0.5, 0.875, 1.0]]], dtype=np.float32),
              [1])
    sweep.add(np.array([[0, 2, 0]], dtype=np.uint8),
              np.array([[[0.0, 0.125, 0.625]], [[0.375, 0.75, 0.25]]], dtype=np.float32), [1, 2])
    np.testing.assert_allclose(sweep.curve(), [1 / 3, 1 / 2, 11 / 18, 11 / 30, 1 / 6])
    best_threshold, report = sweep.best()
    assert best_threshold == 0.5
    assert report.miou == pytest.approx(11 / 18)
    np.testing.assert_allclose(report.per_class, [0.5, 1 / 3, 1.0])


def test_threshold_sweep_equals_brute_force_argmax_at_every_threshold():
    rng = np.random.default_rng(3)
    thresholds = threshold_values(0.0, 0.59, 0.01)
    sweep = ThresholdSweep(5, thresholds)
    brute = [ConfusionAccumulator(5) for _ in thresholds]
    for _ in range(3):
        classes = sorted(rng.choice(np.arange(1, 5), size=int(rng.integers(1, 4)), replace=False).tolist())
        cams = rng.random((len(classes), 9, 7)).astype(np.float32) * 0.7
        ground_truth = rng.integers(0, 5, size=(9, 7)).astype(np.uint8)
        ground_truth[0, :3] = 255
        sweep.add(ground_truth, cams, classes)
        for accumulator, threshold in zip(brute, thresholds):
            scores = np.concatenate([np.full((1, 9, 7), threshold), cams.astype(np.float64)])
            labels = np.array([0, *classes])[scores.argmax(axis=0)]
            accumulator.add(ground_truth, labels)
    for index, accumulator in enumerate(brute):
        np.testing.assert_array_equal(sweep.accumulators[index].confusion, accumulator.confusion)
    assert len(set(np.round(sweep.curve(), 9))) > 5  # a real curve, not a constant


def test_first_max_over_rows_is_numpys_max_and_argmax_ties_to_the_first_row():
    from weakclip_core.method.cam import first_max_over_rows

    scores = np.array([[0.5, 0.2, 0.7, 0.1], [0.5, 0.9, 0.7, 0.1], [0.1, 0.9, 0.8, 0.1]], dtype=np.float16)
    best, row = first_max_over_rows(scores)
    np.testing.assert_array_equal(best, np.array([0.5, 0.9, 0.8, 0.1], dtype=np.float16))
    np.testing.assert_array_equal(row, [0, 1, 2, 0])  # ties go to the first row, as argmax
    random = np.random.default_rng(0).integers(0, 4, size=(5, 200)).astype(np.float32)  # many ties
    best, row = first_max_over_rows(random)
    np.testing.assert_array_equal(best, random.max(axis=0))
    np.testing.assert_array_equal(row, random.argmax(axis=0))


def test_threshold_sweep_over_many_classes_counts_only_where_an_image_touches():
    """K = 81 (COCO) with an image's few classes: the sweep's histogram is taken over the classes the image
    can touch; every (GT, prediction) count of all 81 x 81 cells equals the brute-force argmax's."""
    rng = np.random.default_rng(4)
    thresholds = threshold_values(0.0, 0.59, 0.01)
    sweep = ThresholdSweep(81, thresholds)
    brute = [ConfusionAccumulator(81) for _ in thresholds]
    for classes, gt_classes in (([3, 40], [0, 3, 77]), ([80], [0, 80, 12]), ([], [0, 5])):
        cams = rng.random((len(classes), 6, 8)).astype(np.float32) * 0.6
        ground_truth = rng.choice(gt_classes, size=(6, 8)).astype(np.uint8)
        ground_truth[0, 0] = 255
        sweep.add(ground_truth, cams, classes)
        for accumulator, threshold in zip(brute, thresholds):
            scores = np.concatenate([np.full((1, 6, 8), threshold), cams.astype(np.float64)])
            accumulator.add(ground_truth, np.array([0, *classes])[scores.argmax(axis=0)])
    for index, accumulator in enumerate(brute):
        np.testing.assert_array_equal(sweep.accumulators[index].confusion, accumulator.confusion)
