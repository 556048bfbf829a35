"""DeepLabV2 (Chen et al., TPAMI 2018): the segmenter WSSS tables retrain on pseudo masks.

A torchvision ResNet (101 by default) with the strides of ``layer3`` and ``layer4`` replaced by dilation
2 and 4 (``replace_stride_with_dilation=[False, True, True]``), so the features are at output stride 8,
then ASPP-L: four parallel 3x3 convolutions of the 2048-channel features straight to the K class scores,
dilated 6, 12, 18 and 24, summed; the logits are bilinearly upsampled to the input size. No decoder, no
batch norm in the head. ``encoder`` is the ResNet without its classifier (state-dict keys ``conv1.weight``,
``layer1.0.conv1.weight``, ... as torchvision and timm write them), ``head`` the ASPP: the parameter groups
the WSSS recipe trains at lr and 10 x lr (``seg.train.head_lr_mult``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

ASPP_RATES = (6, 12, 18, 24)
ENCODERS = {"resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101}


class ASPPSum(nn.Module):
    """DeepLabV2's ASPP: parallel dilated 3x3 convolutions to the class scores, summed."""

    def __init__(self, in_channels: int, n_classes: int, rates: tuple[int, ...] = ASPP_RATES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, n_classes, kernel_size=3, padding=rate, dilation=rate, bias=True) for rate in rates)
        for branch in self.branches:  # the reference init: N(0, 0.01) weights, zero bias
            nn.init.normal_(branch.weight, mean=0.0, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(features) for branch in self.branches]).sum(dim=0)


class DeepLabV2(nn.Module):
    """``(B, 3, H, W)`` ImageNet-normalised images -> ``(B, K, H, W)`` logits."""

    def __init__(self, n_classes: int, encoder: str = "resnet101", rates: tuple[int, ...] = ASPP_RATES) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"DeepLabV2 encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        backbone = ENCODERS[encoder](weights=None, replace_stride_with_dilation=[False, True, True])
        backbone.fc = nn.Identity()  # no classifier: the encoder's state dict is the ImageNet one minus fc.*
        self.encoder = backbone
        self.head = ASPPSum(2048, n_classes, rates)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(images))))
        return encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
