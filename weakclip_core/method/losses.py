"""WeakCLIP's training losses: balanced seeding loss, CRF boundary loss, auxiliary matching loss.

All on P resized to ``loss.loss_size`` (64 in the reference), like the
reference's DGCN-lite head. Seeds are class maps with 255 = ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from weakclip_core.config.weakclip import WeakClipLossConfig
from weakclip_core.data.layout import IGNORE_INDEX
from weakclip_core.method.crf import CrfPool

MIN_PROBABILITY = 1e-7  # added before renormalising P, so log P and Q/P stay finite
CRF_FLOOR = 1e-4  # Q is floored and renormalised, as in the reference


def resize_seeds(seeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer seeds → (B, h, w) long by nearest neighbour (255 stays 255)."""
    if tuple(seeds.shape[1:]) == tuple(size):
        return seeds.long()
    return F.interpolate(seeds[:, None].float(), size=size, mode="nearest")[:, 0].long()


def resize_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, h, w) → (B, K, size, size), bilinear (align_corners off)."""
    if logits.shape[2:] == (size, size):
        return logits
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def smoothed_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax(P) + 1e-7, renormalised: (B, K, h, w), strictly positive."""
    probabilities = logits.softmax(dim=1) + MIN_PROBABILITY
    return probabilities / probabilities.sum(dim=1, keepdim=True)


def seeding_loss(logits: torch.Tensor, seeds: torch.Tensor, reduction: str = "per_image_sum") -> torch.Tensor:
    """Partial cross-entropy over seed pixels, balanced between background and foreground.

    logits: (B, K, h, w); seeds: (B, h, w) with 0 = background, 1..K-1, 255 ignored; p = softmax + 1e-7.

    ``per_image_sum`` (the reference's ``dgcn_cal_seeding_loss``; also the paper's sum of a background and a
    foreground term): for each image, bg_i = mean -log p over its background seeds and fg_i = mean -log p over
    its foreground seeds (0 when it has none); loss = mean_i bg_i + mean_i fg_i.
    ``pooled_mean``: (mean -log p over the batch's bg seed pixels + mean over its fg seed pixels) / 2; if one
    set is empty the other alone.
    No seeds → 0 (a graph-connected zero, so backward gives zero gradients, never NaN).
    """
    log_probabilities = smoothed_probabilities(logits).log()
    valid = seeds != IGNORE_INDEX
    target = torch.where(valid, seeds, torch.zeros_like(seeds))
    picked = -log_probabilities.gather(1, target[:, None])[:, 0]  # (B, h, w)
    selections = (valid & (seeds == 0), valid & (seeds > 0))
    if reduction == "per_image_sum":
        total = logits.sum() * 0.0
        for selected in selections:
            sums = torch.where(selected, picked, torch.zeros_like(picked)).sum(dim=(1, 2))
            counts = selected.sum(dim=(1, 2)).to(picked.dtype)
            total = total + torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums)).mean()
        return total
    if reduction != "pooled_mean":
        raise ValueError(f"seed loss reduction must be per_image_sum or pooled_mean, got {reduction!r}")
    parts = []
    for selected in selections:
        if selected.any():
            parts.append(picked[selected].mean())
    if not parts:
        return logits.sum() * 0.0
    return torch.stack(parts).mean()


def boundary_loss(logits: torch.Tensor, crf_probabilities: torch.Tensor, ratio_min: float,
                  ratio_max: float) -> torch.Tensor:
    """KL(Q ‖ P) with the ratio clipped: mean over pixels of Σ_k Q_k log(clip(Q_k / P_k)).

    logits: (B, K, h, w) for P; crf_probabilities: Q, (B, K, h, w), treated as a
    constant. Where the ratio is clipped, no gradient flows (as in the reference).
    """
    probabilities = smoothed_probabilities(logits)
    target = crf_probabilities.detach().to(probabilities)
    ratio = torch.clamp(target / probabilities, ratio_min, ratio_max)
    return (target * ratio.log()).sum(dim=1).mean()


def auxiliary_loss(matching: torch.Tensor, seeds: torch.Tensor, temperature: float,
                   form: str = "matching_size") -> torch.Tensor:
    """Cross-entropy of λ'/temperature against the seeds; 255 ignored. matching: (B, K, h, w); seeds: (B, H, W).

    ``form``: ``matching_size`` resizes the seeds (nearest) to λ's size and averages over the seed pixels;
    ``reference`` upsamples λ'/temperature bilinearly (corners not aligned) to the seeds' size and averages over
    every pixel, an ignored one counting 0: the reference's mmseg 0.19 ``IdentityHead`` loss
    (``BaseDecodeHead.losses``: ``resize`` to the label, ``CrossEntropyLoss`` with ``reduction='none'``, then the
    plain mean). No seed pixel → 0 with zero gradients.
    """
    if form == "reference":
        if not (seeds != IGNORE_INDEX).any():
            return matching.sum() * 0.0
        scores = F.interpolate(matching / temperature, size=tuple(seeds.shape[1:]), mode="bilinear",
                               align_corners=False)
        return F.cross_entropy(scores, seeds, ignore_index=IGNORE_INDEX, reduction="sum") / seeds.numel()
    small_seeds = resize_seeds(seeds, tuple(matching.shape[2:]))
    if not (small_seeds != IGNORE_INDEX).any():
        return matching.sum() * 0.0
    return F.cross_entropy(matching / temperature, small_seeds, ignore_index=IGNORE_INDEX)


def crf_targets(logits: torch.Tensor, images_uint8: torch.Tensor, crf_pool: CrfPool) -> torch.Tensor:
    """Q = dense CRF of P on the image downsized to P's size; (B, K, h, w), no gradient.

    images_uint8: (B, 3, H, W) uint8 RGB (before normalisation). As in the
    reference, P is floored at 1e-4 before the CRF, and Q is floored at 1e-4
    and renormalised after it.
    """
    size = logits.shape[2:]
    with torch.no_grad():
        small = F.interpolate(images_uint8.float(), size=size, mode="bilinear", align_corners=False)
        small = small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        probabilities = smoothed_probabilities(logits.detach()).float().clamp_min(CRF_FLOOR).cpu().numpy()
    refined = np.maximum(crf_pool.map(small, probabilities), CRF_FLOOR)
    refined = refined / refined.sum(axis=1, keepdims=True)
    return torch.from_numpy(refined).to(device=logits.device, dtype=logits.dtype)


@dataclass
class WeakClipLosses:
    """The total loss and its parts (scalars), for the optimizer and for logging."""

    total: torch.Tensor
    seed: torch.Tensor
    boundary: torch.Tensor
    aux: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "seed_loss": float(self.seed.detach()),
                "boundary_loss": float(self.boundary.detach()), "aux_loss": float(self.aux.detach())}


def weakclip_losses(logits: torch.Tensor, matching: torch.Tensor, seeds: torch.Tensor,
                    images_uint8: torch.Tensor, cfg: WeakClipLossConfig, crf_pool: CrfPool) -> WeakClipLosses:
    """total = seed + boundary_weight · boundary + aux_weight · aux (seed reduced as ``cfg.seed_loss_reduction``).

    logits: P, (B, K, H/4, W/4); matching: λ', (B, K, H/16, W/16); seeds:
    (B, H, W) long with 255 ignored; images_uint8: (B, 3, H, W) uint8 RGB of the
    same crops. P is resized to ``cfg.loss_size`` for the seeding and boundary
    losses; the CRF runs in ``crf_pool``.
    """
    small_logits = resize_logits(logits.float(), cfg.loss_size)
    small_seeds = resize_seeds(seeds, (cfg.loss_size, cfg.loss_size))
    seed = seeding_loss(small_logits, small_seeds, cfg.seed_loss_reduction)
    if cfg.boundary_weight > 0:
        boundary = boundary_loss(small_logits, crf_targets(small_logits, images_uint8, crf_pool),
                                 cfg.ratio_min, cfg.ratio_max)
    else:
        boundary = small_logits.sum() * 0.0
    aux = auxiliary_loss(matching.float(), seeds, cfg.aux_temperature, cfg.aux_form)
    total = seed + cfg.boundary_weight * boundary + cfg.aux_weight * aux
    return WeakClipLosses(total=total, seed=seed, boundary=boundary, aux=aux)
