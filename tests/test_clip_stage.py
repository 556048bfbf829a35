"""The clip stage: CLIP's InfoNCE vs numpy, zero-shot scoring and AP on hand-worked cases,
a tiny end-to-end pretraining run, its resumption, and the deterministic data order."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.clip import run as run_clip_stage
from tiny_voc import TINY_CLIP_ARCH, TINY_WEAKCLIP_TAPS, write_tiny_voc
from weakclip_core.models.clip import load_clip_artifact
from weakclip_core.training.clip_pretrain import (average_precision, caption_clauses, caption_groups, clip_contrastive_loss,
                                         drop_clauses, zero_shot_report, zero_shot_scores)
from weakclip_core.config import params_from_dict
from weakclip_core.data.layout import write_labels, write_mask
from weakclip_core.data.sampling import StepSampler


def numpy_info_nce(images: np.ndarray, texts: np.ndarray, scale: float, targets: np.ndarray) -> float:
    """Symmetric cross-entropy of scale * cos(image_i, text_j) against row-stochastic ``targets``."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    logits = scale * images @ texts.T

    def cross_entropy(matrix: np.ndarray) -> float:
        log_softmax = matrix - np.log(np.exp(matrix).sum(axis=1, keepdims=True))
        return float(-(targets * log_softmax).sum(axis=1).mean())

    return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


BATCH_IMAGES = np.array([[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0], [0.7, 0.7, 0.1]])
BATCH_TEXTS = np.array([[0.9, 0.1, 0.4], [0.0, 1.0, 0.2], [0.1, 0.2, 1.0], [1.0, 0.5, 0.0]])


def test_contrastive_loss_matches_numpy_info_nce():
    loss = clip_contrastive_loss(torch.tensor(BATCH_IMAGES), torch.tensor(BATCH_TEXTS), torch.tensor(10.0))
    assert float(loss) == pytest.approx(numpy_info_nce(BATCH_IMAGES, BATCH_TEXTS, 10.0, np.eye(4)), rel=1e-6)


def test_contrastive_loss_with_identical_captions_splits_the_target():
    groups = torch.tensor([0, 1, 0, 2])  # pairs 0 and 2 share a caption
    targets = np.array([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    loss = clip_contrastive_loss(torch.tensor(BATCH_IMAGES), torch.tensor(BATCH_TEXTS), torch.tensor(3.0), groups)
    assert float(loss) == pytest.approx(numpy_info_nce(BATCH_IMAGES, BATCH_TEXTS, 3.0, targets), rel=1e-6)
    unique = clip_contrastive_loss(torch.tensor(BATCH_IMAGES), torch.tensor(BATCH_TEXTS), torch.tensor(3.0),
                                   torch.arange(4))
    plain = clip_contrastive_loss(torch.tensor(BATCH_IMAGES), torch.tensor(BATCH_TEXTS), torch.tensor(3.0))
    assert float(unique) == pytest.approx(float(plain), rel=1e-9)


CAPTION = "a red-headed grey heron, two blue-tailed kites and a green-marked otter on a wavy tan background"


def test_caption_clauses_and_their_dropout():
    clauses = ["a red-headed grey heron", "two blue-tailed kites", "a green-marked otter", "a wavy tan background"]
    assert caption_clauses(CAPTION) == clauses
    rng = np.random.default_rng(0)
    assert drop_clauses(CAPTION, 0.0, rng) == CAPTION
    assert drop_clauses("a heron", 0.9, rng) == "a heron"
    for seed in range(20):
        dropped = drop_clauses(CAPTION, 0.5, np.random.default_rng(seed))
        kept = dropped.split(" and ")
        assert kept and all(clause in clauses for clause in kept)
        assert kept == [clause for clause in clauses if clause in kept], "clause order is kept"
        assert dropped == drop_clauses(CAPTION, 0.5, np.random.default_rng(seed))
    # Probability 1 drops everything but the one forced clause.
    assert len(drop_clauses(CAPTION, 1.0, np.random.default_rng(3)).split(" and ")) == 1


def test_caption_groups_mark_identical_captions():
    assert caption_groups(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


class MeanColourClip(nn.Module):
    """A stand-in with CLIP's interface: an image embeds as its mean RGB, a prompt as its class's colour."""

    def __init__(self, colours: torch.Tensor) -> None:
        super().__init__()
        self.colours = colours

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.colours[tokens]


def test_zero_shot_scores_are_cosines_to_the_prompts():
    names = ["red", "green", "blue"]
    seen_prompts: list[str] = []

    def tokenizer(prompts):
        seen_prompts.extend(prompts)
        return torch.tensor([names.index(prompt.rsplit(" ", 1)[1]) for prompt in prompts])

    model = MeanColourClip(torch.eye(3))
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0                     # pure red
    images[1, 0] = images[1, 1] = 1.0      # red + green
    scores = zero_shot_scores(model, tokenizer, [images[:1], images[1:]], names, torch.device("cpu"))
    assert seen_prompts == ["a photo of a red", "a photo of a green", "a photo of a blue"]
    expected = np.array([[1.0, 0.0, 0.0], [2 ** -0.5, 2 ** -0.5, 0.0]])
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-6)


def test_average_precision_hand_worked():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # positives at ranks 1, 3 and 4: precisions 1/1, 2/3, 3/4.
    assert average_precision(scores, np.array([1, 0, 1, 1, 0])) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision(scores, np.zeros(5)) is None


def test_zero_shot_report_hand_worked():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([[1, 0], [1, 1], [0, 1]])
    report = zero_shot_report(scores, labels, ["a", "b"])
    # class a ranks images 0, 2, 1 with positives 0 and 1: AP = (1 + 2/3) / 2; class b ranks 1, 2, 0: AP = 1.
    assert report["per_class_ap"] == {"a": pytest.approx(5 / 6), "b": pytest.approx(1.0)}
    assert report["map"] == pytest.approx((5 / 6 + 1.0) / 2)
    # top-1: image 0 -> a (yes), image 1 -> b (yes), image 2 -> a (no).
    assert report["top1"] == pytest.approx(2 / 3)


def test_zero_shot_report_counts_an_unlabelled_image_as_a_negative_and_leaves_it_out_of_top1():
    """COCO val keeps images without an object: they rank as negatives for every class, and top-1 (is the best
    class one of the labels?) has no answer for them."""
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.95, 0.7]])
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    report = zero_shot_report(scores, labels, ["a", "b"])
    # class a ranks images 3, 0, 2, 1 with positives 0 and 1 at ranks 2 and 4: AP = (1/2 + 2/4) / 2;
    # class b ranks 1, 3, 2, 0 with positives 1 and 2 at ranks 1 and 3: AP = (1 + 2/3) / 2.
    assert report["per_class_ap"] == {"a": pytest.approx(0.5), "b": pytest.approx(5 / 6)}
    assert report["top1"] == pytest.approx(2 / 3)  # images 0, 1, 2 as above; image 3 not counted


def test_step_sampler_is_resumable_and_never_repeats_within_a_batch():
    full = list(StepSampler(10, 3, seed=7, total_steps=8))
    resumed = list(StepSampler(10, 3, seed=7, total_steps=8, start_step=5))
    assert len(full) == 24 and resumed == full[15:]
    for step in range(8):
        batch = full[3 * step:3 * step + 3]
        assert len({index for _, index in batch}) == 3
        assert {epoch for epoch, _ in batch} == {step // 3}
    assert full[:3] != list(StepSampler(10, 3, seed=8, total_steps=1))


def tiny_params(root: Path, source: str = "pretrain", corpus: str = "train_split") -> dict:
    return {
        "runtime": {"device": "cpu", "seed": 3},
        "dataset": {"name": "synthetic", "prepared_dir": str(root), "synthetic": {"image_size": 64}},
        "clip": {"source": source, "arch": dict(TINY_CLIP_ARCH),
                 "pretrain": {"epochs": 2, "batch_size": 8, "lr": 0.001, "warmup_steps": 2, "corpus": corpus,
                              "web_images": 16}},
        "weakclip": {"taps": TINY_WEAKCLIP_TAPS},
    }


def test_clip_stage_pretrains_writes_outputs_and_resumes_to_the_same_weights(tmp_path):
    data_root = tmp_path / "data"
    write_tiny_voc(data_root, n_train=24, n_val=8)
    params = params_from_dict(tiny_params(data_root))
    outputs = {}
    for name, stops in (("straight", [None]), ("resumed", [4, None])):
        artifact_dir, metrics_path = tmp_path / name / "clip", tmp_path / name / "clip.json"
        for stop in stops:
            metrics = run_clip_stage(params, artifact_dir, metrics_path, checkpoint_root=tmp_path / name / "ckpt",
                                     stop_after_steps=stop)
            if stop is not None:
                assert metrics is None and not artifact_dir.exists()
                assert (tmp_path / name / "ckpt" / "clip").is_dir()
        assert not (tmp_path / name / "ckpt" / "clip").exists(), "checkpoints are cleared at the end"
        outputs[name] = (load_clip_artifact(artifact_dir), metrics)
        assert {"weights.pt", "model_config.json", "clip.json"} <= {p.name for p in artifact_dir.iterdir()}
        assert metrics_path.is_file()
    straight_model, metrics = outputs["straight"]
    resumed_model, _ = outputs["resumed"]
    # The artifact holds no wall time: the straight and the resumed run write the same bytes (DVC hashes them).
    for artifact_file in sorted((tmp_path / "straight" / "clip").iterdir()):
        assert artifact_file.read_bytes() == (tmp_path / "resumed" / "clip" / artifact_file.name).read_bytes(), \
            artifact_file.name
    assert "train_s" not in metrics["pretrain"] and "wall_s" not in metrics, "wall times live in timings/"
    for (key, value), (_, other) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(value, other), key
    assert metrics["pretrain"]["steps"] == 2 * (24 // 8)
    assert metrics["split"] == "val" and metrics["n_images"] == 8
    for key in ("zero_shot_map", "zero_shot_top1", "random_init_map", "random_init_top1", "dense_probe_miou",
                "random_init_dense_probe_miou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert straight_model.visual.conv1.out_channels == TINY_CLIP_ARCH["vision_width"]


def test_clip_stage_scores_a_val_split_that_keeps_an_image_without_labels(tmp_path):
    """prepare keeps COCO val's unannotated images (and a custom set's empty label rows) in val; the stage's
    zero-shot evaluation over val must take them as negatives, not stop on them."""
    data_root = tmp_path / "data"
    write_tiny_voc(data_root, n_train=8, n_val=4)
    labels = json.loads((data_root / "labels.json").read_text())
    labels["labels"]["val_003"] = []
    write_mask(data_root / "SegmentationClass" / "val_003.png", np.zeros((64, 64), dtype=np.uint8))
    write_labels(data_root, labels["dataset"], labels["class_names"], labels["labels"])
    params = params_from_dict(tiny_params(data_root, source="random"))
    metrics = run_clip_stage(params, tmp_path / "clip", tmp_path / "clip.json", checkpoint_root=tmp_path / "ckpt")
    assert metrics["n_images"] == 4
    assert metrics["zero_shot_top1"] * 3 == pytest.approx(round(metrics["zero_shot_top1"] * 3))  # of 3 labelled


def test_clip_stage_random_source_writes_an_untrained_clip(tmp_path):
    data_root = tmp_path / "data"
    write_tiny_voc(data_root, n_train=8, n_val=4)
    params = params_from_dict(tiny_params(data_root, source="random"))
    metrics = run_clip_stage(params, tmp_path / "clip", tmp_path / "clip.json", checkpoint_root=tmp_path / "ckpt")
    assert metrics["source"] == "random" and "pretrain" not in metrics
    assert load_clip_artifact(tmp_path / "clip").logit_scale.item() == pytest.approx(np.log(1 / 0.07), rel=1e-6)
