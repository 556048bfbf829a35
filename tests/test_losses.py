"""WeakCLIP's losses against independent numpy computations on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch

from weakclip_core.config.weakclip import CrfConfig, WeakClipLossConfig
from weakclip_core.method.crf import CrfPool
from weakclip_core.method.losses import auxiliary_loss, boundary_loss, seeding_loss, weakclip_losses


def numpy_probabilities(logits: np.ndarray) -> np.ndarray:
    """softmax over axis 1, + 1e-7, renormalised (the reference's dgcn_softmax)."""
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True) + 1e-7
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def numpy_seeding(logits: np.ndarray, seeds: np.ndarray) -> float:
    probabilities = numpy_probabilities(logits.astype(np.float64))
    background, foreground = [], []
    for b, y, x in np.ndindex(*seeds.shape):
        label = seeds[b, y, x]
        if label == 255:
            continue
        (background if label == 0 else foreground).append(-np.log(probabilities[b, label, y, x]))
    means = [np.mean(values) for values in (background, foreground) if values]
    return float(np.mean(means)) if means else 0.0


def numpy_cross_entropy(scores: np.ndarray, targets: np.ndarray) -> float:
    losses = []
    for b, y, x in np.ndindex(*targets.shape):
        if targets[b, y, x] == 255:
            continue
        column = scores[b, :, y, x].astype(np.float64)
        log_sum = np.log(np.exp(column - column.max()).sum()) + column.max()
        losses.append(log_sum - column[targets[b, y, x]])
    return float(np.mean(losses))


def hand_seeds() -> np.ndarray:
    seeds = np.full((2, 4, 4), 255, dtype=np.int64)
    seeds[0, 0, :3] = 0
    seeds[0, 2, 1] = 2
    seeds[0, 3, 3] = 1
    seeds[1, 1, 1:4] = 1
    seeds[1, 3, 0] = 0
    return seeds


def numpy_reference_seeding(logits: np.ndarray, seeds: np.ndarray) -> float:
    """hustvl/WeakCLIP dgcn_cal_seeding_loss on one-hot cues: per image sum / max(count, 1e-4) for bg and
    for fg, each averaged over the batch, then added."""
    probabilities = numpy_probabilities(logits.astype(np.float64))
    terms = np.zeros((2, seeds.shape[0]))
    for b in range(seeds.shape[0]):
        for part, selected in enumerate((seeds[b] == 0, (seeds[b] > 0) & (seeds[b] != 255))):
            ys, xs = np.nonzero(selected)
            total = sum(-np.log(probabilities[b, seeds[b, y, x], y, x]) for y, x in zip(ys, xs))
            terms[part, b] = total / max(len(ys), 1e-4)
    return float(terms[0].mean() + terms[1].mean())


def test_seeding_loss_against_numpy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    seeds = hand_seeds()
    pooled = seeding_loss(torch.from_numpy(logits), torch.from_numpy(seeds), "pooled_mean")
    assert np.isclose(float(pooled), numpy_seeding(logits, seeds), rtol=1e-5)
    reference = seeding_loss(torch.from_numpy(logits), torch.from_numpy(seeds))  # per_image_sum, the default
    assert np.isclose(float(reference), numpy_reference_seeding(logits, seeds), rtol=1e-5)
    # hand-worked: uniform logits over 3 classes → every seed pixel costs log 3; both images have bg and fg
    # seeds, so the reference's sum is 2 log 3 and the pooled mean log 3
    uniform = torch.zeros(2, 3, 4, 4)
    assert np.isclose(float(seeding_loss(uniform, torch.from_numpy(seeds), "pooled_mean")), np.log(3), rtol=1e-5)
    assert np.isclose(float(seeding_loss(uniform, torch.from_numpy(seeds))), 2 * np.log(3), rtol=1e-5)


@pytest.mark.parametrize("only", [0, 2])
def test_seeding_loss_with_one_class_only(only: int) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    seeds = np.full((1, 4, 4), 255, dtype=np.int64)
    seeds[0, 1:3, 1:3] = only
    probabilities = numpy_probabilities(logits.astype(np.float64))
    expected = -np.log(probabilities[0, only, 1:3, 1:3]).mean()  # that set's mean alone, not halved
    for reduction in ("per_image_sum", "pooled_mean"):
        ours = seeding_loss(torch.from_numpy(logits), torch.from_numpy(seeds), reduction)
        assert np.isclose(float(ours), expected, rtol=1e-5)


def test_all_ignore_gives_zero_and_zero_gradient() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    seeds = torch.full((2, 4, 4), 255, dtype=torch.long)
    seed = seeding_loss(logits, seeds) + seeding_loss(logits, seeds, "pooled_mean")
    matching = torch.randn(2, 3, 2, 2, requires_grad=True)
    aux = auxiliary_loss(matching, seeds, 0.07)
    (seed + aux).backward()
    assert seed.item() == 0.0 and aux.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.equal(matching.grad, torch.zeros_like(matching))


def test_boundary_loss_against_numpy() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(2, 3, 5, 5)).astype(np.float32)
    q = rng.dirichlet(np.full(3, 0.3), size=(2, 5, 5)).transpose(0, 3, 1, 2).astype(np.float32)
    p = numpy_probabilities(logits.astype(np.float64))
    expected = np.mean(np.sum(q * np.log(np.clip(q / p, 0.05, 20.0)), axis=1))
    assert (q / p < 0.05).any() and (q / p > 20.0).any()  # both clips are exercised
    ours = boundary_loss(torch.from_numpy(logits), torch.from_numpy(q), 0.05, 20.0)
    assert np.isclose(float(ours), expected, rtol=1e-5, atol=1e-6)


def test_boundary_loss_is_zero_with_zero_gradient_when_q_equals_p() -> None:
    logits = torch.randn(1, 4, 3, 3, requires_grad=True)
    q = torch.from_numpy(numpy_probabilities(logits.detach().numpy().astype(np.float64))).float()
    loss = boundary_loss(logits, q, 0.05, 20.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert logits.grad.abs().max() < 1e-5


def test_auxiliary_loss_against_numpy() -> None:
    rng = np.random.default_rng(3)
    matching = rng.uniform(-1, 1, size=(2, 3, 4, 4)).astype(np.float32)
    seeds = np.full((2, 8, 8), 255, dtype=np.int64)
    seeds[:, ::2, ::2] = hand_seeds()  # nearest 8 → 4 samples every second pixel from the first
    seeds[:, 1::2, :] = 1  # rows nearest resizing must skip
    expected = numpy_cross_entropy(matching / 0.07, hand_seeds())
    ours = auxiliary_loss(torch.from_numpy(matching), torch.from_numpy(seeds), 0.07)
    assert np.isclose(float(ours), expected, rtol=1e-5)


def test_auxiliary_loss_in_the_references_form_against_numpy() -> None:
    """``aux_form: reference``: λ'/τ (2 x 2) upsampled bilinearly to the 4 x 4 seeds (corners not aligned: the
    source rows and columns of the 4 outputs sit at 0, 0.25, 0.75, 1 after clamping, worked out here), the
    cross-entropy at every seed pixel summed and divided by all 2 x 16 pixels (mmseg 0.19: ignored pixels count 0
    in the mean)."""
    rng = np.random.default_rng(5)
    matching = rng.uniform(-1, 1, size=(2, 3, 2, 2)).astype(np.float32)
    seeds = np.full((2, 4, 4), 255, dtype=np.int64)
    seeds[0, 0, :3] = 0
    seeds[0, 3, 3] = 2
    seeds[1, 1:3, 1] = 1
    source = np.array([0.0, 0.25, 0.75, 1.0])
    weights = np.stack([1 - source, source], axis=1)  # (4, 2): output i mixes input rows 0 and 1
    scores = np.einsum("ia,jb,nkab->nkij", weights, weights, matching.astype(np.float64) / 0.07)
    per_seed = numpy_cross_entropy(scores, seeds)
    n_seeds = int((seeds != 255).sum())
    expected = per_seed * n_seeds / seeds.size
    ours = auxiliary_loss(torch.from_numpy(matching), torch.from_numpy(seeds), 0.07, form="reference")
    assert np.isclose(float(ours), expected, rtol=1e-5)
    empty = torch.full((2, 4, 4), 255, dtype=torch.long)
    assert float(auxiliary_loss(torch.from_numpy(matching), empty, 0.07, form="reference")) == 0.0


def test_total_with_inline_crf_against_numpy() -> None:
    """P already at loss_size; a blocky image so the bilinear 4x downsizing is exact."""
    crf_cfg = CrfConfig()
    cfg = WeakClipLossConfig(boundary_weight=1.0, aux_weight=0.4, aux_temperature=0.07, loss_size=8,
                             ratio_min=0.05, ratio_max=20.0, crf_workers=0, crf=crf_cfg)
    rng = np.random.default_rng(4)
    small_image = rng.integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
    image = small_image.repeat(4, axis=1).repeat(4, axis=2)  # (1, 32, 32, 3), 4x4 blocks
    logits = rng.normal(scale=6.0, size=(1, 3, 8, 8)).astype(np.float32)  # some P below 1e-4
    matching = rng.uniform(-1, 1, size=(1, 3, 2, 2)).astype(np.float32)
    seeds = np.full((1, 32, 32), 255, dtype=np.int64)
    seeds[0, :8, :] = 0
    seeds[0, 16:24, 8:24] = 2
    # numpy reference
    p = numpy_probabilities(logits.astype(np.float64))
    crf = dcrf.DenseCRF2D(8, 8, 3)
    crf_input = np.maximum(p[0], 1e-4).astype(np.float32)  # the reference floors P before the CRF
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(crf_input).reshape(3, -1)))
    crf.addPairwiseGaussian(sxy=crf_cfg.gaussian_sxy, compat=crf_cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=crf_cfg.bilateral_sxy, srgb=crf_cfg.bilateral_srgb,
                             rgbim=np.ascontiguousarray(small_image[0]), compat=crf_cfg.bilateral_compat)
    q = np.maximum(np.array(crf.inference(crf_cfg.iterations)).reshape(1, 3, 8, 8), 1e-4)
    q = q / q.sum(axis=1, keepdims=True)
    expected_boundary = np.mean(np.sum(q * np.log(np.clip(q / p, 0.05, 20.0)), axis=1))
    expected_seed = numpy_reference_seeding(logits, seeds[:, ::4, ::4])  # cfg's default: per_image_sum
    expected_aux = numpy_cross_entropy(matching / 0.07, seeds[:, ::16, ::16])
    with CrfPool(crf_cfg, workers=0) as pool:
        losses = weakclip_losses(torch.from_numpy(logits), torch.from_numpy(matching), torch.from_numpy(seeds),
                                 torch.from_numpy(image).permute(0, 3, 1, 2).contiguous(), cfg, pool)
    assert np.isclose(float(losses.seed), expected_seed, rtol=1e-5)
    assert np.isclose(float(losses.boundary), expected_boundary, rtol=1e-4, atol=1e-6)
    assert np.isclose(float(losses.aux), expected_aux, rtol=1e-5)
    assert np.isclose(float(losses.total), expected_seed + expected_boundary + 0.4 * expected_aux, rtol=1e-4)
    assert set(losses.as_floats()) == {"loss", "seed_loss", "boundary_loss", "aux_loss"}


def test_total_resizes_p_and_backpropagates() -> None:
    """P at 16 px, the losses at 8: the seeding loss is the numpy reference's on P downsized bilinearly with
    half-pixel centres (a factor of 2 samples between input pixels 2i and 2i + 1: each output is the mean of a
    2 x 2 block) and the seeds by nearest neighbour (every 8th); gradients reach P and λ'."""
    torch.manual_seed(0)
    cfg = WeakClipLossConfig(loss_size=8, crf_workers=0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    matching = torch.randn(2, 3, 4, 4, requires_grad=True)
    seeds = torch.from_numpy(np.random.default_rng(5).integers(0, 3, size=(2, 64, 64)))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with CrfPool(cfg.crf, workers=0) as pool:
        losses = weakclip_losses(logits, matching, seeds, images, cfg, pool)
    downsized = logits.detach().numpy().astype(np.float64).reshape(2, 3, 8, 2, 8, 2).mean(axis=(3, 5))
    assert np.isclose(float(losses.seed), numpy_reference_seeding(downsized, seeds.numpy()[:, ::8, ::8]), rtol=1e-5)
    losses.total.backward()
    assert all(np.isfinite(value) for value in losses.as_floats().values())
    assert logits.grad.abs().sum() > 0 and matching.grad.abs().sum() > 0
