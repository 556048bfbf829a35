"""The MaskCLIP-style dense probe against independent computations: the value path of one patch by hand from
the last block's raw weights, label maps and mIoU on constructed embeddings (hand-worked and against a numpy
bilinear), and the probe's keys in the clip stage's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import weakclip_core.evaluation.dense_probe as dense_probe_module
from pipeline.clip import run as run_clip_stage
from tiny_voc import TINY_CLIP_ARCH, TINY_WEAKCLIP_TAPS, write_tiny_voc
from weakclip_core.config import params_from_dict
from weakclip_core.config.clip import ClipArchConfig, ClipConfig
from weakclip_core.data.layout import PreparedDataset, write_image, write_labels, write_mask, write_split
from weakclip_core.evaluation.dense_probe import (LAST_LAYER_PROBE_RULE, PROBE_RULE, dense_probe, dense_probes_of,
                                                  last_layer_patch_embeddings, probe_label_map, value_path_embeddings)
from weakclip_core.models.clip import build_clip, dense_visual_features

TINY_ARCH = ClipArchConfig(**TINY_CLIP_ARCH)


def numpy_layer_norm(x: np.ndarray, norm: torch.nn.LayerNorm) -> np.ndarray:
    weight, bias = norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy()
    return (x - x.mean()) / np.sqrt(x.var() + norm.eps) * weight + bias


def test_value_path_of_one_patch_matches_the_blocks_raw_weights():
    torch.manual_seed(0)
    model = build_clip(ClipConfig(source="random", arch=TINY_ARCH)).eval()
    visual = model.visual
    last = visual.transformer.resblocks[-1]
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or misplaced bias shows
        for parameter in (*last.ln_1.parameters(), last.attn.in_proj_bias, last.attn.out_proj.bias,
                          *visual.ln_post.parameters()):
            parameter.add_(0.3 * torch.randn_like(parameter))
    images = torch.randn(2, 3, 64, 64)
    captured: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach()))
    with torch.no_grad():
        visual(images)  # open_clip's own forward: the last block's input, independently of the probe's code
        embeddings = value_path_embeddings(visual, images)
    hook.remove()
    block_input = captured[0] if visual.transformer.batch_first else captured[0].transpose(0, 1)
    grid = 64 // TINY_ARCH.patch_size
    image, row, col = 1, 2, 1
    x = block_input[image, 1 + row * grid + col].double().numpy()  # token 0 is the class token
    width = TINY_ARCH.vision_width
    in_weight = last.attn.in_proj_weight.detach().double().numpy()
    in_bias = last.attn.in_proj_bias.detach().double().numpy()
    value = in_weight[2 * width:3 * width] @ numpy_layer_norm(x, last.ln_1) + in_bias[2 * width:3 * width]
    out = last.attn.out_proj.weight.detach().double().numpy() @ value + last.attn.out_proj.bias.detach().double().numpy()
    expected = numpy_layer_norm(out, visual.ln_post) @ visual.proj.detach().double().numpy()
    assert embeddings.shape == (2, TINY_ARCH.embed_dim, grid, grid)
    np.testing.assert_allclose(embeddings[image, :, row, col].double().numpy(), expected, rtol=1e-4, atol=1e-5)
    # The value path is not the plain last-layer patch tokens (which went through the query-key attention).
    plain = dense_visual_features(visual, images, []).patch_embeddings
    assert not torch.allclose(plain[image, :, row, col], embeddings[image, :, row, col], atol=1e-3)


def test_last_layer_reading_is_open_clips_own_output_tokens_projected():
    """The probe's second reading, WeakCLIP's tokens, against open_clip's own forward (``output_tokens``: the
    patch tokens after ``ln_post``), projected by hand in float64."""
    torch.manual_seed(1)
    model = build_clip(ClipConfig(source="random", arch=TINY_ARCH)).eval()
    visual = model.visual
    images = torch.randn(2, 3, 64, 64)
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(images)
            embeddings = last_layer_patch_embeddings(visual, images)
    finally:
        visual.output_tokens = False
    grid = 64 // TINY_ARCH.patch_size
    expected = tokens.double().numpy() @ visual.proj.detach().double().numpy()  # (B, grid * grid, D)
    assert embeddings.shape == (2, TINY_ARCH.embed_dim, grid, grid)
    np.testing.assert_allclose(embeddings.flatten(2).transpose(1, 2).double().numpy(), expected,
                               rtol=1e-4, atol=1e-5)


def numpy_bilinear(scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) → (C, height, width), half-pixel centres, edges clamped (torch's align_corners=False)."""

    def axis(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, source - low

    y0, y1, fy = axis(height, scores.shape[1])
    x0, x1, fx = axis(width, scores.shape[2])
    rows = scores[:, y0] * (1 - fy)[None, :, None] + scores[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


def test_label_map_matches_a_numpy_bilinear_argmax_over_labels_and_background():
    generator = np.random.default_rng(4)
    texts = generator.normal(size=(5, 6))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    patches = generator.normal(size=(6, 3, 4))
    labels = [3, 1]
    label_map = probe_label_map(torch.tensor(patches), torch.tensor(texts), labels, (10, 13))
    cosines = np.einsum("dhw,kd->khw", patches / np.linalg.norm(patches, axis=0, keepdims=True), texts)
    candidates = np.array([0, 1, 3])
    expected = candidates[numpy_bilinear(cosines[candidates], 10, 13).argmax(axis=0)]
    assert label_map.shape == (10, 13)
    np.testing.assert_array_equal(label_map, expected)
    assert set(np.unique(label_map)) <= {0, 1, 3}


class PromptClip(torch.nn.Module):
    """A stand-in CLIP: prompt k embeds as text row k; the visual tower is replaced by chosen patch embeddings."""

    def __init__(self, texts: torch.Tensor, image_size: int) -> None:
        super().__init__()
        self.texts = texts
        self.visual = torch.nn.Module()
        self.visual.image_size = (image_size, image_size)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.texts[tokens]


def test_probe_label_maps_and_miou_on_known_patch_embeddings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class_names = ["background", "apple", "boat", "cat"]
    texts = torch.eye(4)  # orthonormal prompts: a patch's cosine to class k is its k-th component
    # image "left": patches (1 x 2) = [apple, background]; bilinear to 4 x 8 puts apple on columns 0..3.
    # image "mixed": both patches 0.6 boat + 0.8 cat, labelled boat only: cat is not a candidate, so boat
    # (cosine 0.6) beats background (0) everywhere although cat scores higher.
    left = torch.stack([texts[1], texts[0]], dim=1).reshape(4, 1, 2)
    mixed = (0.6 * texts[2] + 0.8 * texts[3]).reshape(4, 1, 1).expand(4, 1, 2)
    monkeypatch.setattr(dense_probe_module, "value_path_embeddings", lambda visual, images: torch.stack([left, mixed]))
    left_gt = np.zeros((4, 8), dtype=np.uint8)
    left_gt[:, :3] = 1
    left_gt[0, 7] = 255  # ignored
    mixed_gt = np.full((4, 8), 2, dtype=np.uint8)
    for image_id, mask in (("left", left_gt), ("mixed", mixed_gt)):
        write_image(tmp_path / "JPEGImages" / f"{image_id}.jpg", np.full((4, 8, 3), 128, dtype=np.uint8))
        write_mask(tmp_path / "SegmentationClass" / f"{image_id}.png", mask)
    write_split(tmp_path, "train", ["left", "mixed"])
    write_labels(tmp_path, "hand", class_names, {"left": [1], "mixed": [2]})
    dataset = PreparedDataset.open(tmp_path)

    def tokenizer(prompts):
        assert prompts == [f"a photo of a {name}" for name in class_names]
        return torch.arange(len(prompts))

    expected_left = np.zeros((4, 8), dtype=np.int64)
    expected_left[:, :4] = 1
    np.testing.assert_array_equal(probe_label_map(left, texts, [1], (4, 8)), expected_left)
    np.testing.assert_array_equal(probe_label_map(mixed, texts, [2], (4, 8)), np.full((4, 8), 2))
    result = dense_probe(PromptClip(texts, 32), tokenizer, dataset, dataset.split("train"), torch.device("cpu"))
    # background: TP 15 (column 3 is lost to apple, (0, 7) ignored), FN 4 → 15/19; apple: TP 12, FP 4 → 12/16;
    # boat: all 32 pixels → 1; cat: never in GT nor predicted → undefined, left out of the mean.
    assert result.n_images == 2
    assert result.report.per_class == [pytest.approx(15 / 19), pytest.approx(12 / 16), pytest.approx(1.0), None]
    assert result.report.miou == pytest.approx((15 / 19 + 12 / 16 + 1.0) / 3)
    # The last-layer reading runs the same label maps on other embeddings: given the same ones, the same report.
    monkeypatch.setattr(dense_probe_module, "last_layer_patch_embeddings",
                        lambda visual, images: torch.stack([left, mixed]))
    monkeypatch.setattr(dense_probe_module, "value_path_embeddings", lambda visual, images: 1 / 0)
    last_layer = dense_probe(PromptClip(texts, 32), tokenizer, dataset, dataset.split("train"), torch.device("cpu"),
                             tokens="last_layer")
    assert last_layer.report.per_class == result.report.per_class


def test_several_models_are_probed_in_one_pass_over_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The clip stage probes its CLIP and the random reference together: each image is read once for both, and
    each model's report is the one its own pass gives (the hand-worked one above for the first)."""
    class_names = ["background", "apple", "boat", "cat"]
    texts = torch.eye(4)
    swapped = texts[[0, 2, 1, 3]]  # a second model whose apple and boat prompts are exchanged
    left = torch.stack([texts[1], texts[0]], dim=1).reshape(4, 1, 2)
    mixed = (0.6 * texts[2] + 0.8 * texts[3]).reshape(4, 1, 1).expand(4, 1, 2)
    monkeypatch.setattr(dense_probe_module, "value_path_embeddings", lambda visual, images: torch.stack([left, mixed]))
    left_gt = np.zeros((4, 8), dtype=np.uint8)
    left_gt[:, :3] = 1
    left_gt[0, 7] = 255
    for image_id, mask in (("left", left_gt), ("mixed", np.full((4, 8), 2, dtype=np.uint8))):
        write_image(tmp_path / "JPEGImages" / f"{image_id}.jpg", np.full((4, 8, 3), 128, dtype=np.uint8))
        write_mask(tmp_path / "SegmentationClass" / f"{image_id}.png", mask)
    write_split(tmp_path, "train", ["left", "mixed"])
    write_labels(tmp_path, "hand", class_names, {"left": [1], "mixed": [2]})
    dataset = PreparedDataset.open(tmp_path)
    reads: list[str] = []
    read_image = PreparedDataset.image
    monkeypatch.setattr(PreparedDataset, "image",
                        lambda self, image_id: reads.append(image_id) or read_image(self, image_id))
    tokenizer = lambda prompts: torch.arange(len(prompts))  # noqa: E731 — prompt k is class k's text

    both = dense_probes_of([PromptClip(texts, 32), PromptClip(swapped, 32)], tokenizer, dataset, ["left", "mixed"],
                           torch.device("cpu"), ("value_path",))
    assert reads == ["left", "mixed"]  # once each, for both models
    assert both[0]["value_path"].report.per_class == [pytest.approx(15 / 19), pytest.approx(12 / 16),
                                                      pytest.approx(1.0), None]
    alone = dense_probe(PromptClip(swapped, 32), tokenizer, dataset, ["left", "mixed"], torch.device("cpu"))
    assert both[1]["value_path"].report.per_class == alone.report.per_class != both[0]["value_path"].report.per_class


def test_images_without_a_gt_mask_are_not_scored(tmp_path: Path):
    write_image(tmp_path / "JPEGImages" / "a.jpg", np.full((32, 32, 3), 128, dtype=np.uint8))
    write_split(tmp_path, "train", ["a"])
    write_labels(tmp_path, "hand", ["background", "apple"], {"a": [1]})
    result = dense_probe(PromptClip(torch.eye(2), 32), lambda prompts: torch.arange(len(prompts)),
                         PreparedDataset.open(tmp_path), ["a"], torch.device("cpu"))
    assert result.report is None and result.n_images == 0


def test_clip_stage_writes_the_dense_probe_of_both_clips(tmp_path: Path):
    data_root = tmp_path / "data"
    write_tiny_voc(data_root, n_train=8, n_val=4)
    params = params_from_dict({"runtime": {"device": "cpu", "seed": 3},
                               "dataset": {"name": "synthetic", "prepared_dir": str(data_root)},
                               "clip": {"source": "random", "arch": dict(TINY_CLIP_ARCH)},
                               "weakclip": {"taps": TINY_WEAKCLIP_TAPS}})
    metrics = run_clip_stage(params, tmp_path / "clip", tmp_path / "clip.json", checkpoint_root=tmp_path / "ckpt")
    assert json.loads((tmp_path / "clip.json").read_text()) == metrics
    assert metrics["dense_probe_split"] == "train" and metrics["dense_probe_n_images"] == 8
    assert metrics["dense_probe_rule"] == PROBE_RULE and metrics["dense_probe_threshold_chosen_with_gt"] is False
    assert metrics["last_layer_probe_rule"] == LAST_LAYER_PROBE_RULE
    for key in ("dense_probe_miou", "random_init_dense_probe_miou", "last_layer_probe_miou",
                "random_init_last_layer_probe_miou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "dense_probe_not_scored" not in metrics
