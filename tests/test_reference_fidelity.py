"""The VOC/COCO path against the reference code (hustvl/WeakCLIP on mmseg 0.x, xulianuwa/MCTformer on timm),
one section per point of issue #17, each checked against an independent computation: sizes worked by hand,
a hand-worked loss, a mask whose allowed crops are known, hue measured with ``colorsys``, the truncated
normal's std from its formula."""

from __future__ import annotations

import colorsys
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from weakclip_core.config.cam import CamTrainConfig
from weakclip_core.config.pseudo import PseudoConfig
from weakclip_core.config.schema import ConfigError, build_dataclass
from weakclip_core.config.weakclip import WeakClipTrainConfig
from weakclip_core.data.classification import ClassificationAugment, ClassificationDataset
from weakclip_core.data.seeded import SeededTrainingSet
from weakclip_core.data.transforms import (CLIP_MEAN, CLIP_MEAN_UINT8, CLIP_STD, MmsegAugmentation, crop_box,
                                           hue_shift, keep_ratio_size, mmseg_photometric_distortion,
                                           pad_normalised, ratio_size)
from weakclip_core.method.inference import InferenceAugmentation, predict_probabilities, sliding_window_logits
from weakclip_core.method.losses import seeding_loss
from weakclip_core.models.weakclip.prompt_learner import PromptLearner
from weakclip_core.training.schedules import warmup_cosine_lr

from tests.test_weakclip_parts import CLASS_NAMES, TINY_WEAKCLIP, tiny_clip

REFERENCE_SCALE = (2048, 512)
LANDSCAPE = (375, 500)  # (H, W) of a typical VOC image, 500 wide x 375 high
PORTRAIT = (500, 375)

# ---------------------------------------------------------------------------------------------------- point 1
# mmseg: scale bound = (int(2048 r), int(512 r)); factor = min(long / max(h, w), short / min(h, w));
# side = int(side * factor + 0.5). Worked by hand for 500 x 375 (short side 375 binds at every ratio here):
#   r=0.5 : bound (1024, 256), factor = 256/375  = 0.68267 → 500*0.68267 = 341.33 → 341 ; 375 → 256
#   r=0.75: bound (1536, 384), factor = 384/375  = 1.024   → 512.0  → 512 ; 384
#   r=1.0 : bound (2048, 512), factor = 512/375  = 1.36533 → 682.67 → 683 ; 512
#   r=1.25: bound (2560, 640), factor = 640/375  = 1.70667 → 853.33 → 853 ; 640
#   r=1.5 : bound (3072, 768), factor = 768/375  = 2.048   → 1024.0 → 1024 ; 768
#   r=1.75: bound (3584, 896), factor = 896/375  = 2.38933 → 1194.67 → 1195 ; 896
#   r=2.0 : bound (4096, 1024), factor = 1024/375 = 2.73067 → 1365.33 → 1365 ; 1024
HAND_WORKED = {0.5: (256, 341), 0.75: (384, 512), 1.0: (512, 683), 1.25: (640, 853), 1.5: (768, 1024),
               1.75: (896, 1195), 2.0: (1024, 1365)}  # ratio: (H, W) of the 500 x 375 image
TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the reference's --aug-test img_ratios
TRAIN_RATIOS = (0.5, 1.0, 2.0)  # the ends and middle of Resize's ratio_range (0.5, 2.0)


@pytest.mark.parametrize("ratio", sorted(set(TEST_RATIOS) | set(TRAIN_RATIOS)))
def test_keep_ratio_sizes_match_mmseg_by_hand(ratio: float) -> None:
    height, width = HAND_WORKED[ratio]
    assert ratio_size(*LANDSCAPE, ratio, REFERENCE_SCALE) == (height, width)
    assert ratio_size(*PORTRAIT, ratio, REFERENCE_SCALE) == (width, height)  # the 375 x 500 image: transposed
    # the bound's own order does not matter (mmseg takes its max and min)
    assert keep_ratio_size(*LANDSCAPE, (int(512 * ratio), int(2048 * ratio))) == (height, width)


@pytest.mark.parametrize("ratio", TRAIN_RATIOS)
@pytest.mark.parametrize("shape", [LANDSCAPE, PORTRAIT])
def test_training_resize_uses_the_reference_base(ratio: float, shape: tuple[int, int]) -> None:
    """A crop larger than the image returns the whole resized image: its size is the hand-worked one."""
    height, width = HAND_WORKED[ratio] if shape == LANDSCAPE else HAND_WORKED[ratio][::-1]
    image = np.zeros((*shape, 3), dtype=np.uint8)
    mask = np.zeros(shape, dtype=np.uint8)
    augmentation = MmsegAugmentation(crop=4096, ratio_min=ratio, ratio_max=ratio, img_scale=REFERENCE_SCALE,
                                     cat_max_ratio=1.0, photometric=False)
    out_image, out_mask = augmentation(image, mask, np.random.default_rng(0))
    assert out_image.shape[:2] == out_mask.shape == (height, width)


@pytest.mark.parametrize("shape", [LANDSCAPE, PORTRAIT])
def test_inference_scales_use_the_reference_base_and_run_small_images_as_is(shape: tuple[int, int]) -> None:
    """Every view the model sees, at each aug-test ratio (and flipped), has the hand-worked size; a view
    smaller than the 512 window (ratios 0.5, 0.75 on the short side) is run as is, never padded."""
    seen: list[tuple[int, int]] = []

    def model(windows: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(windows.shape[2:]))
        return torch.zeros((windows.shape[0], 3, windows.shape[2] // 4, windows.shape[3] // 4))

    tta = InferenceAugmentation(scales=TEST_RATIOS, flip=True, crop=4096, stride=4096, img_scale=REFERENCE_SCALE,
                                pad_to_crop=False)
    predict_probabilities(model, torch.zeros((1, 3, *shape)), tta)
    expected = [HAND_WORKED[r] if shape == LANDSCAPE else HAND_WORKED[r][::-1] for r in TEST_RATIOS]
    assert seen == [size for size in expected for _ in range(2)]


def test_about_a_third_of_reference_crops_need_padding() -> None:
    """500 x 375 at a uniform ratio in [0.5, 2]: the short side 512 r is below the 512 crop when r < 1, i.e.
    (1 - 0.5) / (2 - 0.5) = 1/3 of the crops (relative to the image itself it was r < 512/375: 58 %)."""
    rng = np.random.default_rng(0)
    ratios = rng.uniform(0.5, 2.0, size=4000)
    padded = np.mean([min(ratio_size(*LANDSCAPE, r, REFERENCE_SCALE)) < 512 for r in ratios])
    assert abs(padded - 1 / 3) < 0.03
    own_base = np.mean([min(ratio_size(*LANDSCAPE, r, None)) < 512 for r in ratios])
    assert abs(own_base - (512 / 375 - 0.5) / 1.5) < 0.03


# ---------------------------------------------------------------------------------------------------- point 2

def test_seed_loss_on_a_hand_worked_two_image_batch() -> None:
    """Two classes; logits = log p so every pixel's probabilities are chosen by hand (ln 2 = L):
    image 0: bg seeds with p_bg 1/2 and 1/4 (costs L, 2L), one fg seed with p_fg 1/2 (cost L);
    image 1: no bg seed, two fg seeds with p_fg 1/8 (3L each); one ignored pixel.
    Reference (dgcn_cal_seeding_loss): loss_1 = mean(1.5L, 0) = 0.75L, loss_2 = mean(L, 3L) = 2L → 2.75L.
    Pooled mean: bg (L + 2L)/2 = 1.5L, fg (L + 3L + 3L)/3 = 7L/3 → (1.5L + 7L/3)/2 = 23L/12."""
    p_background = np.array([[[0.5, 0.25], [0.5, 0.3]],
                             [[0.875, 0.875], [0.5, 0.5]]])
    probabilities = np.stack([p_background, 1 - p_background], axis=1)  # (2, 2, 2, 2)
    seeds = np.array([[[0, 0], [1, 255]],
                      [[1, 1], [255, 255]]])
    logits = torch.from_numpy(np.log(probabilities)).float()
    length = math.log(2)
    reference = seeding_loss(logits, torch.from_numpy(seeds), "per_image_sum")
    assert float(reference) == pytest.approx(2.75 * length, rel=1e-5)
    pooled = seeding_loss(logits, torch.from_numpy(seeds), "pooled_mean")
    assert float(pooled) == pytest.approx(23 / 12 * length, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- point 3

def test_prompt_context_init_std_is_the_references() -> None:
    """trunc_normal_(std=1.0) with torch's bounds ±2: the std of a standard normal cut at ±2 is
    sqrt(1 - 2·2·φ(2) / (Φ(2) - Φ(-2))) = 0.8796."""
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    expected = math.sqrt(1 - 4 * phi / mass)
    assert expected == pytest.approx(0.8796, abs=1e-4)
    torch.manual_seed(0)
    learner = PromptLearner(["background", "cat"], prompt_len=8, text_context_length=13, token_width=20000,
                            init_std=1.0)
    contexts = learner.contexts.detach()
    assert float(contexts.std()) == pytest.approx(expected, rel=0.01)
    assert float(contexts.abs().max()) <= 2.0
    assert float(PromptLearner(["background"], 8, 13, 20000, init_std=0.02).contexts.detach().std()) == \
        pytest.approx(0.02, rel=0.01)


def test_weakclip_train_section_carries_the_reference_values_by_default() -> None:
    train = build_dataclass(WeakClipTrainConfig, {})
    assert (train.cat_max_ratio, train.hue_delta, train.prompt_init_std, train.clip_drop_path_rate) == \
        (0.75, 18, 1.0, 0.1)
    with pytest.raises(ConfigError, match="img_scale"):
        build_dataclass(WeakClipTrainConfig, {"img_scale": [512]}, "weakclip.train")


# ---------------------------------------------------------------------------------------------------- point 4

class ScriptedRng:
    """Returns the given integers in order from ``integers`` (the crop offsets a test wants drawn)."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)
        self.calls = 0

    def integers(self, low: int, high: int) -> int:
        value = self.values.pop(0)
        assert low <= value < high
        self.calls += 1
        return value


def half_and_half_mask() -> np.ndarray:
    """4 x 8: columns 0-3 class 1, columns 4-7 background; a 4-wide window at left l shows 4-l columns of
    class 1 and l of background, so its largest share is max(4-l, l)/4 = 1, .75, .5, .75, 1 for l = 0..4:
    under cat_max_ratio 0.75 (strict) only l = 2 is allowed."""
    mask = np.zeros((4, 8), dtype=np.uint8)
    mask[:, :4] = 1
    return mask


def test_crop_ratio_rule_takes_the_one_allowed_crop() -> None:
    rng = ScriptedRng([0, 0, 0, 4, 0, 3, 0, 2])  # (top, left) pairs: l = 0, 4, 3 rejected, then 2 accepted
    assert crop_box(half_and_half_mask(), 4, 0.75, rng) == (0, 2)
    assert rng.calls == 8


def test_crop_ratio_rule_gives_up_after_ten_tries_as_mmseg() -> None:
    """Ten rejected windows, then the eleventh drawn is taken unchecked (mmseg's loop)."""
    rng = ScriptedRng([0, 0] * 10 + [0, 4])
    assert crop_box(half_and_half_mask(), 4, 0.75, rng) == (0, 4)
    assert rng.calls == 22
    # cat_max_ratio 1: mmseg skips the rule, one draw
    assert crop_box(half_and_half_mask(), 4, 1.0, ScriptedRng([0, 0])) == (0, 0)


def test_crop_ratio_rule_ignores_255_and_needs_two_classes() -> None:
    mask = half_and_half_mask()
    mask[:, 4:] = 255  # class 1 and ignore only: no window shows two counted classes
    rng = ScriptedRng([0, 2] * 10 + [0, 1])
    assert crop_box(mask, 4, 0.75, rng) == (0, 1)
    # frequency check with a real generator: P(l = 2) = 1 - (4/5)^11 = 0.914
    hits = [crop_box(half_and_half_mask(), 4, 0.75, np.random.default_rng(seed))[1] == 2 for seed in range(3000)]
    assert abs(np.mean(hits) - (1 - 0.8 ** 11)) < 0.02


# ---------------------------------------------------------------------------------------------------- point 4, hue

def hue_degrees(pixel: np.ndarray) -> float:
    return colorsys.rgb_to_hsv(*(pixel.astype(float) / 255.0))[0] * 360.0


def test_hue_shift_is_two_degrees_per_opencv_unit() -> None:
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert hue_degrees(hue_shift(red, 18)[0, 0]) == pytest.approx(36.0, abs=0.5)
    assert hue_degrees(hue_shift(red, -18)[0, 0]) == pytest.approx(324.0, abs=0.5)


def test_photometric_hue_range_on_a_pure_hue_image() -> None:
    """Pure red (hue 0) at half intensity: brightness (first), contrast and saturation keep its hue (no
    channel reaches 255: 128 + 32 = 160, x 1.5 = 240), so the hue seen after the distortion is the hue step
    alone: an integer in [-18, 18) OpenCV units = -36..34 degrees in steps of 2."""
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 128
    shifts = []
    for seed in range(1500):
        out = mmseg_photometric_distortion(red, np.random.default_rng(seed), hue_delta=18)
        pixel = out[0, 0]
        if pixel.max() == pixel.min():
            continue  # fully desaturated: no hue to read
        shifts.append((hue_degrees(pixel) + 180.0) % 360.0 - 180.0)
    shifts = np.array(shifts)
    assert np.all(np.abs(shifts / 2 - np.round(shifts / 2)) < 0.75)  # on the 2-degree grid (uint8 rounding)
    steps = set(np.round(shifts / 2).astype(int))
    assert min(steps) == -18 and max(steps) == 17  # ±36 degrees (mmseg's randint excludes +18)
    assert 0 in steps and len(steps) > 30


# ---------------------------------------------------------------------------------------------------- point 1, padding

def test_padding_after_normalisation_values() -> None:
    """Image: 0 in normalised units (the mean colour), raw pixels: the mean colour, mask: 255."""
    image = torch.randn(3, 5, 7)
    raw = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    mask = torch.randint(0, 3, (5, 7))
    padded, padded_raw, padded_mask = pad_normalised(image, raw, mask, 8)
    assert padded.shape == (3, 8, 8) and padded_raw.shape == (3, 8, 8) and padded_mask.shape == (8, 8)
    assert torch.equal(padded[:, :5, :7], image) and torch.equal(padded_raw[:, :5, :7], raw)
    assert torch.all(padded[:, 5:] == 0) and torch.all(padded[:, :, 7:] == 0)
    assert torch.all(padded_mask[5:] == 255) and torch.all(padded_mask[:, 7:] == 255)
    expected_colour = [round(channel * 255) for channel in CLIP_MEAN]  # 0 normalised = mean·255 in pixels
    assert list(CLIP_MEAN_UINT8) == expected_colour == [123, 117, 104]
    for channel in range(3):
        assert torch.all(padded_raw[channel, 5:] == expected_colour[channel])
        assert abs((expected_colour[channel] / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]) < 0.01


def test_seeded_sample_pads_after_normalisation() -> None:
    """A 20 x 30 image at ratio 1 and crop 48: the sample's padding is 0 / mean colour / 255, not black."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    seeds = np.zeros((20, 30), dtype=np.uint8)
    seeds[5:15, 5:20] = 1
    dataset = SimpleNamespace(image=lambda image_id: image, image_path=lambda image_id: image_id)
    augmentation = MmsegAugmentation(crop=48, ratio_min=1.0, ratio_max=1.0, photometric=False)
    sample = SeededTrainingSet(dataset, ["a"], {"a": seeds}, augmentation, seed=0)[(0, 0)]
    assert sample["image"].shape == (3, 48, 48) and sample["seed_mask"].shape == (48, 48)
    assert torch.all(sample["image"][:, 20:] == 0) and torch.all(sample["image"][:, :, 30:] == 0)
    assert torch.all(sample["seed_mask"][20:] == 255) and torch.all(sample["seed_mask"][:, 30:] == 255)
    assert sample["raw_image"][:, 30, 40].tolist() == list(CLIP_MEAN_UINT8)
    assert int((sample["seed_mask"] == 1).sum()) == 10 * 15


def test_sliding_window_pads_only_when_asked() -> None:
    seen: list[tuple[int, ...]] = []

    def model(windows: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(windows.shape[2:]))
        return windows[:, :1].repeat(1, 2, 1, 1)

    images = torch.ones(1, 3, 10, 12)
    sliding_window_logits(model, images, crop=16, stride=8, pad_to_crop=False)
    sliding_window_logits(model, images, crop=16, stride=8, pad_to_crop=True)
    assert seen == [(10, 12), (16, 16)]


# ---------------------------------------------------------------------------------------------------- point 5

def test_clip_drop_path_is_active_in_training_only() -> None:
    from weakclip_core.models.weakclip import WeakCLIP

    torch.manual_seed(0)
    model = WeakCLIP(tiny_clip(), CLASS_NAMES, replace(TINY_WEAKCLIP, dropout=0.0), clip_drop_path_rate=0.5)
    images = torch.randn(2, 3, 64, 64)
    model.train()
    for module in model.modules():  # BN statistics would also differ between two training forwards
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    first, second = model(images).logits, model(images).logits
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(images).logits, model(images).logits)
    plain = WeakCLIP(tiny_clip(), CLASS_NAMES, replace(TINY_WEAKCLIP, dropout=0.0))
    assert set(plain.clip.state_dict()) == set(model.clip.state_dict())  # hooks, not new modules


@pytest.mark.parametrize("unit", ["image", "token"])
def test_clip_drop_path_draws_per_image_or_per_token_position(unit: str) -> None:
    """What one stochastic-depth draw drops. ``token`` is the reference's: its blocks run on (L, N, D) tokens and
    timm's ``drop_path`` draws a (L, 1, 1) mask, so a token position's branch is dropped in every image of the
    batch alike; ``image`` (timm's per-sample rule on (N, L, D)) drops an image's whole branch. Read at the last
    block's ``ls_1`` hook on a (N = 6, L = 40, D = 2) tensor of ones, rate 0.5: each entry 0 or 1 / 0.5."""
    from weakclip_core.models.weakclip import WeakCLIP

    torch.manual_seed(0)
    model = WeakCLIP(tiny_clip(), CLASS_NAMES, TINY_WEAKCLIP, clip_drop_path_rate=0.5, clip_drop_path_unit=unit)
    model.train()
    blocks = model.clip.visual.transformer.resblocks
    assert getattr(model.clip.visual.transformer, "batch_first", True)  # open_clip: (N, L, D)
    mask = blocks[len(blocks) - 1].ls_1(torch.ones(6, 40, 2))[..., 0]  # block rate 0.5 * (L-1)/(L-1)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    if unit == "token":
        assert torch.equal(mask, mask[:1].expand(6, 40))  # the same token positions in every image
        assert 0 < mask[0].count_nonzero() < 40  # some positions dropped, some kept
    else:
        assert torch.equal(mask, mask[:, :1].expand(6, 40))  # all of an image's tokens alike
        assert 0 < mask[:, 0].count_nonzero() < 6


def test_decoder_init_reference_draws_kaiming_fan_out_and_leaves_the_classifier() -> None:
    """``decoder_init: reference``: the neck's 1x1 laterals and 3x3 outputs and the head's 3x3 convs as mmcv 1.3.17's
    ``ConvModule`` initialises itself (Kaiming-normal, fan-out, ReLU gain: std sqrt(2 / (out * k * k)), bias 0);
    the classifier keeps PyTorch's default (the reference never calls ``init_weights``), as does
    ``torch_default``'s whole decoder (weights within U(+-1 / sqrt(fan_in)), biases not zero)."""
    from weakclip_core.models.weakclip import WeakCLIP

    arch = replace(TINY_WEAKCLIP, neck_width=48, head_width=40)
    torch.manual_seed(0)
    reference = WeakCLIP(tiny_clip(), CLASS_NAMES, arch, decoder_init="reference").decoder
    torch.manual_seed(0)
    default = WeakCLIP(tiny_clip(), CLASS_NAMES, arch).decoder

    def std_of(convs) -> float:
        return float(torch.cat([conv.weight.detach().flatten() for conv in convs]).std())

    laterals, outputs = list(reference.neck.laterals), list(reference.neck.outputs)
    head_convs = [m for m in reference.head.scale_heads.modules() if isinstance(m, torch.nn.Conv2d)]
    assert std_of(laterals) == pytest.approx((2 / 48) ** 0.5, rel=0.05)
    assert std_of(outputs) == pytest.approx((2 / (48 * 9)) ** 0.5, rel=0.05)
    assert std_of(head_convs) == pytest.approx((2 / (40 * 9)) ** 0.5, rel=0.05)
    assert all(not conv.bias.any() for conv in laterals + outputs)
    classifier_bound = 1 / 40 ** 0.5  # PyTorch's default, fan_in = head width
    assert reference.head.classifier.weight.abs().max() <= classifier_bound
    assert reference.head.classifier.bias.abs().max() <= classifier_bound and reference.head.classifier.bias.any()
    fan_in = laterals[0].in_channels
    assert all(conv.weight.abs().max() <= 1 / fan_in ** 0.5 for conv in default.neck.laterals)
    assert all(conv.bias.any() for conv in default.neck.laterals)


def test_weakclip_runs_windows_that_are_not_patch_multiples() -> None:
    """The reference's strided patch convolution drops the last H mod 16 rows: a 72 x 88 window gives the
    logits of its top-left 64 x 80."""
    from weakclip_core.models.weakclip import WeakCLIP

    model = WeakCLIP(tiny_clip(), CLASS_NAMES, TINY_WEAKCLIP).eval()
    images = torch.randn(1, 3, 72, 88)
    torch.testing.assert_close(model(images).logits, model(images[:, :, :64, :80]).logits)


# ---------------------------------------------------------------------------------------------------- point 6

def test_pseudo_softmax_classes_param() -> None:
    assert build_dataclass(PseudoConfig, {}).softmax_classes == "labels"
    assert build_dataclass(PseudoConfig, {"softmax_classes": "all"}).softmax_classes == "all"
    with pytest.raises(ConfigError, match="softmax_classes"):
        build_dataclass(PseudoConfig, {"softmax_classes": "some"}, "pseudo")


# ---------------------------------------------------------------------------------------------------- point 7

def test_mctformer_timm_recipe() -> None:
    augment = ClassificationAugment(224, 0.08, 0, 9, "rand-m9-mstd0.5-inc1", 0.25)
    erasing = augment.build_erasing()
    assert erasing is not None and erasing.probability == 0.25 and erasing.mode == "pixel"
    assert erasing.max_count == 1
    steps = augment.build().transforms
    randaugment = steps[-1].__closure__  # the PIL wrapper closes over timm's RandAugment
    timm_op = next(cell.cell_contents for cell in randaugment if hasattr(cell.cell_contents, "ops"))
    assert timm_op.num_layers == 2
    assert {op.magnitude for op in timm_op.ops} == {9} and {op.magnitude_std for op in timm_op.ops} == {0.5}
    assert any(op.name.endswith("Increasing") for op in timm_op.ops)
    assert ClassificationAugment(224, 0.08, 2, 9).build_erasing() is None
    with pytest.raises(ConfigError, match="auto_augment"):
        build_dataclass(CamTrainConfig, {"auto_augment": "rand-m9", "randaugment_ops": 2}, "cam.train")
    # the cosine floor: MCTformer's min lr is reached at the last step
    assert warmup_cosine_lr(100, 100, 6.25e-5, 5, 1e-5) == pytest.approx(1e-5)


@pytest.mark.parametrize("warmup_epochs", [5, 1, 0])
def test_mctformer_lr_schedule_is_timms_stepped_at_each_epochs_end(warmup_epochs: int) -> None:
    """``cam.train.lr_schedule: timm_epoch_cosine`` against timm's own scheduler driven as MCTformer's main.py
    (9606597) drives it: created with ``--warmup-lr 1e-6`` (its initial lr), ``lr_scheduler.step(epoch)`` after
    each epoch of ``range(epochs)``; every step of every epoch trains at the optimizer's lr of that moment."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    from pipeline.cam_train import lr_at_step, recorded_train
    from weakclip_core.training.schedules import timm_epoch_cosine_lr

    epochs, steps_per_epoch, base_lr, min_lr = 12, 7, 6.25e-5, 1e-5
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
                                  warmup_lr_init=1e-6, cycle_limit=1, t_in_epochs=True)
    reference = []
    for epoch in range(epochs):
        reference += [optimizer.param_groups[0]["lr"]] * steps_per_epoch
        scheduler.step(epoch)
    ours = [timm_epoch_cosine_lr(step, steps_per_epoch, epochs, base_lr, warmup_epochs, min_lr)
            for step in range(epochs * steps_per_epoch)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=0)
    if warmup_epochs:  # the one-epoch lag: the first two epochs both at the warm-up's initial lr
        assert ours[0] == ours[steps_per_epoch] == 1e-6
    # The stage picks it by cam.train.lr_schedule; the default keeps the per-step warm-up + cosine.
    timm_train = CamTrainConfig(epochs=epochs, warmup_epochs=warmup_epochs, min_lr=min_lr,
                                lr_schedule="timm_epoch_cosine")
    assert [lr_at_step(timm_train, step, steps_per_epoch, base_lr) for step in range(len(ours))] == ours
    default_train = replace(timm_train, lr_schedule="warmup_cosine")
    assert lr_at_step(default_train, 30, steps_per_epoch, base_lr) == warmup_cosine_lr(
        30, epochs * steps_per_epoch, base_lr, warmup_epochs * steps_per_epoch, min_lr)
    # The model file records the key only when set away from its default (a default run's model.pt keeps its bytes).
    assert "lr_schedule" not in recorded_train(default_train)
    assert recorded_train(timm_train)["lr_schedule"] == "timm_epoch_cosine"


def test_mctformer_timm_recipe_is_a_pure_function_of_seed_epoch_index() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    dataset = SimpleNamespace(split=lambda name: ["a", "b"], image=lambda image_id: image,
                              image_labels=lambda image_id, allow_empty=False: [1],
                              label_vector=lambda image_id, allow_empty=False: np.ones(2, np.float32))
    augment = ClassificationAugment(32, 0.08, 0, 9, "rand-m9-mstd0.5-inc1", 0.25)
    first = ClassificationDataset(dataset, "train", 32, augment, seed=3)
    second = ClassificationDataset(dataset, "train", 32, augment, seed=3)
    torch.testing.assert_close(first[(1, 0)][0], second[(1, 0)][0])
    assert not torch.equal(first[(1, 0)][0], first[(2, 0)][0])


# ---------------------------------------------------------------------------------------------------- synthetic

def test_synthetic_default_takes_the_size_free_fixes() -> None:
    """params.yaml (128-px images, crop 128): the seed-loss sum, hue ±36°, the crop ratio rule, the context
    init and CLIP's stochastic depth apply as in the reference; the (2048, 512) base does not: [] (the image's
    own size) keeps the reference's relation short side = crop, as the images are 128 px."""
    from pathlib import Path

    from weakclip_core.config import load_params

    params = load_params(Path(__file__).resolve().parent.parent / "params.yaml")
    train = params.weakclip.train
    assert params.weakclip.loss.seed_loss_reduction == "per_image_sum"
    assert (train.img_scale, train.cat_max_ratio, train.hue_delta) == ([], 0.75, 18)
    assert (train.prompt_init_std, train.clip_drop_path_rate) == (1.0, 0.1)
    assert (params.pseudo.img_scale, params.pseudo.pad_small_windows, params.pseudo.softmax_classes) == \
        ([], False, "labels")
    assert params.cam.train.min_lr == 1e-5 and params.cam.train.reprob == 0.0 and params.cam.train.auto_augment == ""
    assert train.crop == params.dataset.synthetic.image_size


def test_pseudo_masks_with_the_reference_softmax_over_all_classes(tmp_path) -> None:
    """``softmax_classes: all`` runs end to end (the CRF on the argmax's classes, background first), one mask
    per train image with dataset classes only."""
    from pipeline.pseudo_masks import assemble, run_shard
    from tests.test_pseudo_masks import N_TRAIN, params_dict, paths_of, write_chain
    from weakclip_core.config import params_from_dict
    from weakclip_core.data.layout import PreparedDataset, read_mask

    write_chain(tmp_path)
    settings = params_dict(tmp_path, "masks_all", odds_ratio=0.0)
    settings["pseudo"]["softmax_classes"] = "all"
    params = params_from_dict(settings)
    paths = paths_of(tmp_path, "all")
    assert run_shard(params, paths=paths, show_progress=False) == N_TRAIN
    assemble(params, paths)
    dataset = PreparedDataset.open(tmp_path / "data")
    for image_id in dataset.split("train"):
        mask = read_mask(tmp_path / "masks_all" / f"{image_id}.png")
        assert mask.shape == (64, 64) and int(mask.max()) < dataset.n_classes
