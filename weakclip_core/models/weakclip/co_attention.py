"""Co-attention matching: text attends to the image and the image attends to the text.

Both branches work at ``width`` (256) between shared input projections from the
joint space (512) and one output projection each back to it. Each branch is
``layers`` chained pre-norm decoder layers (self-attention → cross-attention →
MLP): layer i+1 reads layer i's output. (The reference code feeds every layer
the same input and keeps only the last one's output; the paper chains them.)
The learned per-channel temperatures α, β (init 0.1) scale the updates:
t* = t + α·Δt, f* = f + β·Δf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention, bias-free q/k/v projections, output projection with bias."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries: (B, N, C), memory: (B, M, C) → (B, N, C)."""
        batch, count, channels = queries.shape

        def split(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(batch, tensor.shape[1], self.heads, channels // self.heads).transpose(1, 2)

        attended = nn.functional.scaled_dot_product_attention(
            split(self.query(queries)), split(self.key(memory)), split(self.value(memory)))
        return self.dropout(self.out(attended.transpose(1, 2).reshape(batch, count, channels)))


class CoAttentionLayer(nn.Module):
    """Pre-norm: x += SelfAttn(LN x); x += CrossAttn(LN x, memory); x += MLP(LN x)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attention = MultiHeadAttention(width, heads, dropout)
        self.cross_norm = nn.LayerNorm(width)
        self.cross_attention = MultiHeadAttention(width, heads, dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        normed = self.self_norm(tokens)
        tokens = tokens + self.self_attention(normed, normed)
        tokens = tokens + self.cross_attention(self.cross_norm(tokens), memory)
        return tokens + self.dropout(self.mlp(self.mlp_norm(tokens)))


@dataclass
class CoAttentionOutput:
    """t* (B, K, D) and f* (B, 1 + h*w, D): updated class and visual (class token first) embeddings."""

    text: torch.Tensor
    visual: torch.Tensor


class CoAttention(nn.Module):
    """Text branch (K class embeddings attend to the visual tokens) and visual branch (visual
    tokens attend to the K class embeddings), with per-channel temperatures α (text), β (visual)."""

    def __init__(self, joint_width: int, width: int, heads: int, layers: int, temperature_init: float,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.visual_in = nn.Sequential(nn.LayerNorm(joint_width), nn.Linear(joint_width, width), nn.LayerNorm(width))
        self.text_in = nn.Sequential(nn.LayerNorm(joint_width), nn.Linear(joint_width, width))
        self.text_layers = nn.ModuleList(CoAttentionLayer(width, heads, dropout) for _ in range(layers))
        self.visual_layers = nn.ModuleList(CoAttentionLayer(width, heads, dropout) for _ in range(layers))
        self.text_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, joint_width))
        self.visual_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, joint_width))
        self.text_temperature = nn.Parameter(torch.full((joint_width,), float(temperature_init)))  # α
        self.visual_temperature = nn.Parameter(torch.full((joint_width,), float(temperature_init)))  # β
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> CoAttentionOutput:
        """text: (B, K, D) class embeddings; visual: (B, M, D) joint-space visual tokens."""
        text_tokens = self.text_in(text)
        visual_tokens = self.visual_in(visual)
        text_update, visual_update = text_tokens, visual_tokens
        for layer in self.text_layers:
            text_update = layer(text_update, visual_tokens)
        for layer in self.visual_layers:
            visual_update = layer(visual_update, text_tokens)
        return CoAttentionOutput(
            text=text + self.text_temperature * self.text_out(text_update),
            visual=visual + self.visual_temperature * self.visual_out(visual_update),
        )
