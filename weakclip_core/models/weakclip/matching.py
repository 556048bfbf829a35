"""Matching: cosine similarity between class text embeddings and dense visual embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matching(text_embeddings: torch.Tensor, visual_embeddings: torch.Tensor) -> torch.Tensor:
    """λ' = <t/|t|, f/|f|> per class and position, no temperature.

    text_embeddings: (B, K, D); visual_embeddings: (B, D, h, w) → (B, K, h, w) in [-1, 1].
    """
    text_unit = F.normalize(text_embeddings, dim=2)
    visual_unit = F.normalize(visual_embeddings, dim=1)
    return torch.einsum("bkd,bdhw->bkhw", text_unit, visual_unit)
