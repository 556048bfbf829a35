"""Pyramid adapter: four ViT taps at stride 16 → a 1/4, 1/8, 1/16, 1/32 feature pyramid (ViTDet-style)."""

from __future__ import annotations

import torch
from torch import nn


class PyramidAdapter(nn.Module):
    """Trainable; keeps the channel width of the ViT (768 at ViT-B/16).

    1/4: GroupNorm → ConvT 2x → BN → GELU → ConvT 2x; 1/8: GroupNorm → ConvT 2x;
    1/16: GroupNorm; 1/32: GroupNorm → MaxPool 2x. GroupNorm with one group
    normalises each tapped map over channels and positions.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_quarter = nn.Sequential(
            nn.GroupNorm(1, width),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.to_eighth = nn.Sequential(nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, kernel_size=2, stride=2))
        self.to_sixteenth = nn.GroupNorm(1, width)
        self.to_thirty_second = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(kernel_size=2, stride=2))

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """taps: 4 x (B, width, H/16, W/16) → [(B, width, H/4, W/4), (.., H/8), (.., H/16), (.., H/32)]."""
        if len(taps) != 4:
            raise ValueError(f"PyramidAdapter expects 4 tapped maps, got {len(taps)}")
        levels = (self.to_quarter, self.to_eighth, self.to_sixteenth, self.to_thirty_second)
        return [level(tap) for level, tap in zip(levels, taps)]
