"""Issue #18, item 4: ``seg.model: deeplabv2`` (ResNet-101, output stride 8, ASPP 6/12/18/24 summed) and the
WSSS training recipe's 10x head lr; the parameter count is checked against one worked out from the
architecture by hand, not from the module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline.seg_train import make_optimizer
from weakclip_core.config import params_from_dict
from weakclip_core.config.schema import ConfigError
from weakclip_core.models.deeplabv2 import ASPPSum, DeepLabV2
from weakclip_core.models.segmenter import SegmenterWeightsError, build_segmenter
from weakclip_core.training.schedules import set_lr


def resnet_parameter_count(blocks: tuple[int, ...]) -> int:
    """A bottleneck ResNet without its classifier, counted from its definition: 7x7 stem conv (no bias) + BN;
    per stage of width ``planes`` (64, 128, 256, 512; expansion 4), blocks of 1x1 -> 3x3 -> 1x1 convs
    (no bias) each followed by BN (2 parameters per channel), the first block with a 1x1 projection + BN."""
    total = 7 * 7 * 3 * 64 + 2 * 64
    inplanes = 64
    for planes, n_blocks in zip((64, 128, 256, 512), blocks):
        for block in range(n_blocks):
            total += inplanes * planes + 2 * planes  # 1x1 reduce
            total += 9 * planes * planes + 2 * planes  # 3x3
            total += planes * 4 * planes + 2 * 4 * planes  # 1x1 expand
            if block == 0:
                total += inplanes * 4 * planes + 2 * 4 * planes  # projection shortcut
            inplanes = 4 * planes
    return total


def aspp_parameter_count(n_classes: int, n_rates: int = 4) -> int:
    """ASPP-L: ``n_rates`` 3x3 convs 2048 -> K with bias."""
    return n_rates * (9 * 2048 * n_classes + n_classes)


def test_parameter_count_matches_the_architecture() -> None:
    assert resnet_parameter_count((3, 4, 23, 3)) == 42_500_160  # torchvision's 44,549,160 minus fc (2,049,000)
    model = DeepLabV2(21, "resnet101")
    counted = sum(parameter.numel() for parameter in model.parameters())
    assert counted == resnet_parameter_count((3, 4, 23, 3)) + aspp_parameter_count(21) == 44_048_532
    assert [branch.dilation for branch in model.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_output_stride_8_and_logits_at_the_input_size() -> None:
    model = DeepLabV2(3, "resnet50").eval()
    images = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert model.features(images).shape == (1, 2048, 8, 6)
        assert model(images).shape == (1, 3, 64, 48)


def numpy_dilated_conv(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, rate: int) -> np.ndarray:
    """A 3x3 convolution at dilation ``rate`` with zero padding ``rate`` (same size), by its definition:
    out[k, y, x] = bias[k] + sum over c, i, j of weight[k, c, i, j] * padded[c, y + i * rate, x + j * rate]."""
    channels, height, width = features.shape
    padded = np.zeros((channels, height + 2 * rate, width + 2 * rate))
    padded[:, rate:rate + height, rate:rate + width] = features
    out = np.repeat(bias[:, None, None], height * width, axis=1).reshape(-1, height, width).astype(np.float64)
    for i in range(3):
        for j in range(3):
            window = padded[:, i * rate:i * rate + height, j * rate:j * rate + width]
            out += np.einsum("kc,chw->khw", weight[:, :, i, j], window)
    return out


def test_aspp_is_the_sum_of_four_dilated_convolutions_at_rates_6_12_18_24() -> None:
    """DeepLabV2's ASPP-L against numpy: the four 3x3 branches at dilations 6, 12, 18, 24 (same-size zero
    padding) summed, biases included; the forward is that map resized bilinearly to the input."""
    torch.manual_seed(0)
    head = ASPPSum(4, 3)
    for branch in head.branches:  # biases non-zero, so each branch's own bias must be in the sum
        torch.nn.init.normal_(branch.bias)
    features = torch.randn(1, 4, 20, 27)  # wider than 2 x 6 so the small rates see real neighbours
    expected = sum(numpy_dilated_conv(features[0].double().numpy(), branch.weight.detach().double().numpy(),
                                      branch.bias.detach().double().numpy(), rate)
                   for branch, rate in zip(head.branches, (6, 12, 18, 24)))
    with torch.no_grad():
        np.testing.assert_allclose(head(features)[0].double().numpy(), expected, rtol=1e-4, atol=1e-5)


def _params(**train: object) -> object:
    return params_from_dict({"seg": {"model": "deeplabv2", "encoder": "resnet50",
                                     "train": {"optimizer": "sgd", "lr": 0.001, "momentum": 0.9, **train}}})


def test_the_head_trains_at_ten_times_the_lr() -> None:
    params = _params(head_lr_mult=10.0)
    model = build_segmenter(params.seg, 3)
    optimizer = make_optimizer(model, params)
    encoder, head = optimizer.param_groups
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    set_lr(optimizer, 0.0005)
    assert (encoder["lr"], head["lr"]) == (0.0005, 0.005)
    assert optimizer.defaults["momentum"] == 0.9
    single = make_optimizer(model, _params())  # head_lr_mult 1 (the default): one group, as before
    assert len(single.param_groups) == 1


@pytest.mark.parametrize("layout", ["torchvision", "wrapped"])
def test_encoder_takes_a_local_imagenet_file(tmp_path: Path, layout: str) -> None:
    reference = torchvision.models.resnet50(weights=None)
    state = reference.state_dict()  # torchvision (and timm: same key names) layout, fc included
    path = tmp_path / "resnet50.pth"
    torch.save(state if layout == "torchvision" else {"state_dict": {f"module.{k}": v for k, v in state.items()}},
               path)
    params = params_from_dict({"seg": {"model": "deeplabv2", "encoder": "resnet50", "encoder_weights": str(path)}})
    model = build_segmenter(params.seg, 3)
    assert torch.equal(model.encoder.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_weights_of_another_architecture_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    params = params_from_dict({"seg": {"model": "deeplabv2", "encoder": "resnet50", "encoder_weights": str(path)}})
    with pytest.raises(SegmenterWeightsError, match=f"{path} does not fit the encoder"):
        build_segmenter(params.seg, 3)


def test_deeplabv2_needs_a_resnet_encoder() -> None:
    with pytest.raises(ConfigError, match="seg.encoder: deeplabv2 needs resnet101"):
        params_from_dict({"seg": {"model": "deeplabv2", "encoder": "mit_b0"}})
