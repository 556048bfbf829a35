"""Text-guided decoder: λ' joins every pyramid level, then an FPN neck and a semantic-FPN head.

Level i's features (B, C, H_i, W_i) are concatenated with λ' resized to
(H_i, W_i) (C + K channels) → FPN neck (1x1 laterals to ``neck_width``,
top-down nearest-upsample-and-add, 3x3 output convs) → semantic-FPN head
(per level conv3x3-BN-ReLU blocks, each followed by a 2x bilinear upsample
until 1/4, summed) → dropout → 1x1 conv to K. Output stride 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FpnNeck(nn.Module):
    """Four levels of ``in_channels`` → four levels of ``width`` (finest first)."""

    def __init__(self, in_channels: int, width: int, levels: int = 4) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(in_channels, width, kernel_size=1) for _ in range(levels))
        self.outputs = nn.ModuleList(nn.Conv2d(width, width, kernel_size=3, padding=1) for _ in range(levels))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(level) for conv, level in zip(self.laterals, levels)]
        for index in range(len(laterals) - 1, 0, -1):
            laterals[index - 1] = laterals[index - 1] + F.interpolate(
                laterals[index], size=laterals[index - 1].shape[2:], mode="nearest")
        return [conv(lateral) for conv, lateral in zip(self.outputs, laterals)]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SemanticFpnHead(nn.Module):
    """Semantic-FPN head: level at stride 4·2^i gets max(1, i) conv blocks and i 2x upsamples."""

    def __init__(self, in_channels: int, width: int, num_classes: int, dropout: float, levels: int = 4) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for level in range(levels):
            blocks: list[nn.Module] = []
            for block in range(max(1, level)):
                blocks.append(_conv_bn_relu(in_channels if block == 0 else width, width))
                if level > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        summed = self.scale_heads[0](levels[0])
        for head, level in zip(self.scale_heads[1:], levels[1:]):
            upsampled = head(level)
            if upsampled.shape[2:] != summed.shape[2:]:
                upsampled = F.interpolate(upsampled, size=summed.shape[2:], mode="bilinear", align_corners=False)
            summed = summed + upsampled
        return self.classifier(self.dropout(summed))


class TextGuidedDecoder(nn.Module):
    """Pyramid (4 levels of ``feature_width``) + λ' (K maps) → logits P (B, K, H/4, W/4)."""

    def __init__(self, feature_width: int, num_classes: int, neck_width: int, head_width: int,
                 dropout: float) -> None:
        super().__init__()
        self.neck = FpnNeck(feature_width + num_classes, neck_width)
        self.head = SemanticFpnHead(neck_width, head_width, num_classes, dropout)

    def forward(self, pyramid: list[torch.Tensor], matching: torch.Tensor) -> torch.Tensor:
        guided = [torch.cat([level, F.interpolate(matching, size=level.shape[2:], mode="bilinear",
                                                  align_corners=True)], dim=1) for level in pyramid]
        return self.head(self.neck(guided))


def initialise_as_the_reference(decoder: TextGuidedDecoder) -> None:
    """The reference's initialisation of the decoder (``weakclip.train.decoder_init: reference``). Its neck and head
    convolutions are mmcv ``ConvModule``s, which initialise themselves when built: Kaiming-normal, fan-out, for
    ReLU, bias 0 (mmcv 1.3.17 ``ConvModule.init_weights``, called from ``__init__``); and its ``tools/train.py``
    never calls ``model.init_weights()``, so mmseg's ``init_cfg`` (a Xavier neck, an N(0, 0.01) classifier) is
    never applied: the classifier keeps PyTorch's default, as here. BatchNorm is 1 / 0 either way."""
    convolutions = [*decoder.neck.laterals, *decoder.neck.outputs,
                    *(module for module in decoder.head.scale_heads.modules() if isinstance(module, nn.Conv2d))]
    for convolution in convolutions:
        nn.init.kaiming_normal_(convolution.weight, mode="fan_out", nonlinearity="relu")
        if convolution.bias is not None:
            nn.init.zeros_(convolution.bias)
