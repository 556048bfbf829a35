"""weakclip_train end to end on a tiny CLIP + tiny dataset + CAM store written here: outputs, a frozen CLIP,
resumption to the same weights, the seeded training set, and the seed quality numbers."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.weakclip_train import WeakClipTrainPaths, seed_quality, train_weakclip
from tiny_voc import CLASS_NAMES, TINY_CLIP_ARCH, write_tiny_voc
from weakclip_core.artifacts.cam_store import CamStoreError, CamStoreReader, CamStoreWriter
from weakclip_core.models.clip import build_clip, load_clip_artifact, save_clip_artifact
from weakclip_core.config import ClipConfig, build_dataclass, params_from_dict
from weakclip_core.config.schema import ConfigError
from weakclip_core.config.weakclip import SeedConfig
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.data.segmentation import GroundTruthMaskError
from weakclip_core.data.seeded import SeededTrainingSet, build_seed_masks
from weakclip_core.data.transforms import DenseAugmentation
from weakclip_core.method.seeds import seeds_from_cams
from weakclip_core.runtime.device import seed_everything
from weakclip_core.models.weakclip.model import WeakCLIP
from weakclip_core.artifacts.weakclip import load_weakclip_model

TINY_WEAKCLIP = {
    "prompt_len": 2, "text_context_length": 6, "taps": [0, 1, 2, 3], "co_attention_width": 16,
    "co_attention_heads": 2, "co_attention_layers": 1, "neck_width": 16, "head_width": 16,
    "seeds": {"mode": "confident", "fg_threshold": 0.6, "bg_threshold": 0.2},
    "loss": {"loss_size": 16, "crf_workers": 0},
    "train": {"iterations": 6, "batch_size": 4, "lr": 0.001, "warmup_iterations": 2, "crop": 64,
              "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory) -> Path:
    """A tiny dataset, its CAM store and a random tiny CLIP artifact."""
    root = tmp_path_factory.mktemp("chain")
    write_tiny_voc(root / "data", n_train=12, n_val=4, cam_path=root / "cams" / "train.h5")
    clip_cfg = build_dataclass(ClipConfig, {"source": "random", "arch": dict(TINY_CLIP_ARCH)})
    torch.manual_seed(0)
    save_clip_artifact(root / "clip", build_clip(clip_cfg), clip_cfg)
    return root


def chain_params(root: Path):
    return params_from_dict({"runtime": {"device": "cpu", "seed": 5},
                             "dataset": {"name": "synthetic", "prepared_dir": str(root / "data")},
                             "weakclip": TINY_WEAKCLIP})


def chain_paths(root: Path, run: str) -> WeakClipTrainPaths:
    return WeakClipTrainPaths(clip_dir=root / "clip", cam_store=root / "cams" / "train.h5",
                              model=root / run / "weakclip" / "model.pt", metrics=root / run / "weakclip.json",
                              live_dir=root / run / "dvclive", checkpoint_root=root / run / "checkpoints")


def test_a_clip_of_another_architecture_with_the_same_weights_is_not_resumed(tiny_chain, tmp_path):
    """The resume key held the CLIP's weights' sha256 only; ViT-B-16 and ViT-B-16-quickgelu store the same bytes
    and differ in ``model_config.json`` alone, so after switching (the clip stage's QuickGELU note) a killed
    weakclip_train resumed prompts and decoder trained on the other activation's features."""
    clip_dir = tmp_path / "clip"
    shutil.copytree(tiny_chain / "clip", clip_dir)
    paths = replace(chain_paths(tiny_chain, "quickgelu"), clip_dir=clip_dir,
                    checkpoint_root=tmp_path / "checkpoints")
    params = chain_params(tiny_chain)
    assert train_weakclip(params, paths, stop_after_steps=3, show_progress=False) is None
    config_path = clip_dir / "model_config.json"
    config = json.loads(config_path.read_text())
    assert not config.get("quick_gelu")
    config_path.write_text(json.dumps({**config, "quick_gelu": True}))  # same weights.pt, other activation
    assert train_weakclip(params, paths, stop_after_steps=3, show_progress=False) is None
    assert len(list((tmp_path / "checkpoints" / "weakclip_train").iterdir())) == 2  # a run of its own


@pytest.mark.slow
def test_weakclip_train_writes_outputs_keeps_clip_frozen_and_resumes_exactly(tiny_chain):
    params = chain_params(tiny_chain)
    straight = train_weakclip(params, chain_paths(tiny_chain, "straight"), show_progress=False)
    resumed_paths = chain_paths(tiny_chain, "resumed")
    assert train_weakclip(params, resumed_paths, stop_after_steps=3, show_progress=False) is None
    assert not resumed_paths.model.exists()
    assert (resumed_paths.checkpoint_root / "weakclip_train").is_dir()
    resumed = train_weakclip(params, resumed_paths, show_progress=False)
    assert not (resumed_paths.checkpoint_root / "weakclip_train").exists(), "checkpoints are cleared at the end"

    for run in ("straight", "resumed"):
        paths = chain_paths(tiny_chain, run)
        assert paths.model.is_file() and paths.metrics.is_file()
        assert (paths.live_dir / "metrics.json").is_file()
        assert (paths.live_dir / "plots" / "metrics" / "train" / "seed_loss.tsv").is_file()

    # Same weights after kill + resume as without (CPU, deterministic data order and RNG state).
    first = torch.load(chain_paths(tiny_chain, "straight").model, weights_only=True)
    second = torch.load(resumed_paths.model, weights_only=True)
    assert first["model"].keys() == second["model"].keys()
    for key in first["model"]:
        assert torch.equal(first["model"][key], second["model"][key]), key
    assert not any(key.startswith("clip.") for key in first["model"]), "the frozen CLIP is not duplicated"
    assert first["class_names"] == CLASS_NAMES
    assert straight["miou"] == resumed["miou"]

    # The CLIP inside the trained model is bit-identical to the artifact it was trained on.
    model = load_weakclip_model(chain_paths(tiny_chain, "straight").model)
    reference = load_clip_artifact(tiny_chain / "clip").state_dict()
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, reference[key]), key
    # ... and the learned parts did train: they differ from the initialisation the stage starts from.
    seed_everything(5)
    fresh = WeakCLIP(load_clip_artifact(tiny_chain / "clip"), CLASS_NAMES, chain_params(tiny_chain).weakclip.arch())
    fresh_state = fresh.trainable_state_dict()
    assert torch.equal(model.prompt_learner.name_tokens, fresh.prompt_learner.name_tokens)
    assert not torch.equal(first["model"]["prompt_learner.contexts"], fresh_state["prompt_learner.contexts"])
    changed = [key for key in fresh_state if not torch.equal(first["model"][key], fresh_state[key])]
    assert len(changed) > len(fresh_state) // 2

    assert straight["split"] == "train" and straight["n_images"] == 12
    assert straight["seed_mode"] == "confident" and straight["thresholds_chosen_with_gt"] is False
    assert 0.0 <= straight["miou"] <= 1.0 and set(straight["per_class"]) == set(CLASS_NAMES)
    assert straight["seed_miou"] > 0.8  # blurred-GT CAMs give near-perfect confident seeds


def test_seed_offset_moves_only_this_stages_seed(tiny_chain):
    """weakclip.train.seed_offset adds to runtime.seed for this stage: (seed 5, offset 2) trains the same weights
    as (seed 7, offset 0), and other weights than (seed 5, offset 0): the ablations' seeds vary WeakCLIP alone."""
    def trained(seed: int, offset: int, run: str) -> dict:
        weakclip = {**TINY_WEAKCLIP, "train": {**TINY_WEAKCLIP["train"], "iterations": 2, "seed_offset": offset}}
        params = params_from_dict({"runtime": {"device": "cpu", "seed": seed},
                                   "dataset": {"name": "synthetic", "prepared_dir": str(tiny_chain / "data")},
                                   "weakclip": weakclip})
        train_weakclip(params, chain_paths(tiny_chain, run), show_progress=False)
        return torch.load(chain_paths(tiny_chain, run).model, weights_only=True)["model"]

    offset, shifted, plain = trained(5, 2, "offset"), trained(7, 0, "shifted"), trained(5, 0, "plain")
    assert all(torch.equal(offset[key], shifted[key]) for key in offset)
    assert not all(torch.equal(offset[key], plain[key]) for key in offset)


def test_training_set_samples_are_deterministic_and_aligned(tiny_chain):
    dataset = PreparedDataset.open(tiny_chain / "data")
    image_ids = dataset.split("train")
    store = CamStoreReader(tiny_chain / "cams" / "train.h5")
    seed_masks = build_seed_masks(store, dataset, image_ids, SeedConfig(fg_threshold=0.6, bg_threshold=0.2),
                                  progress=False)
    training_set = SeededTrainingSet(dataset, image_ids, seed_masks, DenseAugmentation(crop=32), seed=1)
    plain_seeds = {}  # made as arrays, without PackedMasks: the samples must be the same
    for image_id in image_ids:
        classes, cams = store.read(image_id)
        plain_seeds[image_id] = seeds_from_cams(cams, classes, SeedConfig(fg_threshold=0.6, bg_threshold=0.2))
    as_arrays = SeededTrainingSet(dataset, image_ids, plain_seeds, DenseAugmentation(crop=32), seed=1)
    for key in [(0, 0), (3, 5), (7, len(image_ids) - 1)]:
        packed_sample, plain_sample = training_set[key], as_arrays[key]
        assert all(torch.equal(packed_sample[name], plain_sample[name]) for name in packed_sample), key
    sample = training_set[(3, 5)]
    assert sample["image"].shape == (3, 32, 32) and sample["raw_image"].shape == (3, 32, 32)
    assert sample["raw_image"].dtype == torch.uint8 and sample["seed_mask"].dtype == torch.int64
    again = training_set[(3, 5)]
    for key in sample:
        assert torch.equal(sample[key], again[key]), key
    assert not torch.equal(training_set[(4, 5)]["raw_image"], sample["raw_image"])
    # Without augmentation (no resize, no photometric, crop = the image), the seeds sit on the image:
    # every seed pixel of class k has class k's colour in the image.
    plain = SeededTrainingSet(dataset, image_ids, seed_masks,
                              DenseAugmentation(crop=64, scale_min=1.0, scale_max=1.0, photometric=False), seed=1)
    sample = plain[(0, 2)]
    image = sample["raw_image"].permute(1, 2, 0).numpy().astype(int)
    seeds = sample["seed_mask"].numpy()
    colours = {1: (220, 40, 40), 2: (40, 200, 60), 3: (40, 60, 220)}
    for class_index in set(np.unique(seeds)) - {0, 255}:
        mean_colour = image[seeds == class_index].mean(axis=0)
        np.testing.assert_allclose(mean_colour, colours[class_index], atol=12)


def test_seed_quality_hand_worked(tmp_path):
    write_tiny_voc(tmp_path, n_train=1, n_val=1)
    dataset = PreparedDataset.open(tmp_path)
    ground_truth = dataset.mask("train_000")
    seeds = ground_truth.copy()
    present = [c for c in np.unique(ground_truth) if c != 0][0]
    # Relabel half the background as ignore, and four object pixels as background.
    seeds[:, : seeds.shape[1] // 2][ground_truth[:, : seeds.shape[1] // 2] == 0] = 255
    object_pixels = np.argwhere(ground_truth == present)[:4]
    seeds[object_pixels[:, 0], object_pixels[:, 1]] = 0
    quality = seed_quality({"train_000": seeds}, dataset, ["train_000"])
    n_bg_seed = int(((seeds == 0) & (ground_truth == 0)).sum())
    n_object = int((ground_truth == present).sum())
    # On labelled pixels: background IoU = n_bg / (n_bg + 4), object IoU = (n_object - 4) / n_object
    # (other classes absent everywhere are undefined and left out).
    expected_object_classes = [c for c in np.unique(ground_truth) if c != 0]
    ious = [n_bg_seed / (n_bg_seed + 4)]
    for class_index in expected_object_classes:
        count = int((ground_truth == class_index).sum())
        ious.append((count - 4) / count if class_index == present else 1.0)
    assert quality["seed_miou"] == pytest.approx(np.mean(ious))
    assert quality["seed_coverage"] == pytest.approx((seeds != 255).sum() / ground_truth.size)


def test_a_store_for_other_labels_is_refused(tmp_path):
    write_tiny_voc(tmp_path / "data", n_train=2, n_val=1)
    dataset = PreparedDataset.open(tmp_path / "data")
    image_ids = dataset.split("train")
    with CamStoreWriter(tmp_path / "cams.h5", "tiny", CLASS_NAMES, {}) as writer:
        for image_id in image_ids:
            wrong = [c for c in (1, 2, 3) if c not in dataset.labels[image_id]][:1]
            writer.add(image_id, wrong, np.zeros((1, 64, 64), np.float32))
    with pytest.raises(CamStoreError, match="cams.h5"):
        build_seed_masks(CamStoreReader(tmp_path / "cams.h5"), dataset, image_ids, SeedConfig(), progress=False)


def test_missing_clip_weights_name_the_clip_stage(tmp_path: Path) -> None:
    """A WeakCLIP file whose CLIP artifact is gone says which file is missing and which stage makes it."""
    saved = tmp_path / "model.pt"
    torch.save({"clip_artifact": str(tmp_path / "clip"), "clip_sha256": "0" * 64}, saved)
    with pytest.raises(FileNotFoundError, match=r"clip/weights\.pt .*does not exist: run the clip stage first"):
        load_weakclip_model(saved)


def test_gt_seeds_are_the_prepared_masks_and_the_metrics_say_gt_was_used(tiny_chain):
    """``weakclip.seeds.source: gt`` (the upper bound of the ceiling ablation) trains on the prepared GT masks:
    the seeds then score mIoU 1 on every GT pixel (the known answer), and the metrics carry ``gt_used``."""
    weakclip = {**TINY_WEAKCLIP, "seeds": {"source": "gt"}, "train": {**TINY_WEAKCLIP["train"], "iterations": 2}}
    params = params_from_dict({"runtime": {"device": "cpu", "seed": 5},
                               "dataset": {"name": "synthetic", "prepared_dir": str(tiny_chain / "data")},
                               "weakclip": weakclip})
    paths = chain_paths(tiny_chain, "gt_seeds")
    metrics = train_weakclip(params, paths, show_progress=False)
    assert metrics["seeds_source"] == "gt" and metrics["gt_used"] is True and metrics["cam_variant"] is None
    assert metrics["seed_miou"] == 1.0 and metrics["seed_coverage"] == 1.0


def test_a_mask_folder_that_is_the_gt_folder_is_refused_before_training(tiny_chain):
    """Imported seeds that resolve to the prepared GT masks would make a "weakly supervised" WeakCLIP train on
    GT: the stage stops naming the key and both folders, and writes nothing."""
    for folder in (tiny_chain / "data" / "SegmentationClass", tiny_chain / "data" / "." / "SegmentationClass"):
        weakclip = {**TINY_WEAKCLIP, "seeds": {"source": "mask_folder", "mask_folder": str(folder)}}
        params = params_from_dict({"runtime": {"device": "cpu"},
                                   "dataset": {"name": "synthetic", "prepared_dir": str(tiny_chain / "data")},
                                   "weakclip": weakclip})
        paths = chain_paths(tiny_chain, "refused_gt")
        with pytest.raises(GroundTruthMaskError, match="weakclip.seeds.mask_folder: .*ground-truth mask folder"):
            train_weakclip(params, paths, show_progress=False)
        assert not paths.model.exists() and not paths.metrics.exists()


def test_gt_seeds_need_a_gt_mask_for_every_train_image(tiny_chain, tmp_path):
    import shutil

    shutil.copytree(tiny_chain / "data", tmp_path / "data")
    image_id = PreparedDataset.open(tmp_path / "data").split("train")[2]
    (tmp_path / "data" / "SegmentationClass" / f"{image_id}.png").unlink()
    weakclip = {**TINY_WEAKCLIP, "seeds": {"source": "gt"}}
    params = params_from_dict({"runtime": {"device": "cpu"},
                               "dataset": {"name": "synthetic", "prepared_dir": str(tmp_path / "data")},
                               "weakclip": weakclip})
    paths = chain_paths(tmp_path, "no_gt")
    with pytest.raises(ConfigError, match=f"weakclip.seeds.source: 'gt' .* 1 of the 12 train images .*{image_id}"):
        train_weakclip(params, paths, show_progress=False)
    assert not paths.model.exists() and not paths.metrics.exists()


def test_lr_schedule_mmcv_cosine_sets_the_references_lr(tiny_chain):
    """``weakclip.train.lr_schedule: mmcv_cosine`` (the presets) reaches the training loop: the lr logged at the
    last of 6 steps (warm-up 2, lr 1e-3, min 1e-6) is mmcv's cosine at 5 / 6 of all iterations, by hand, where
    the default's cosine runs over the 4 steps after the warm-up (3 / 4 of the way)."""
    def last_lr(schedule: str) -> float:
        weakclip = {**TINY_WEAKCLIP, "train": {**TINY_WEAKCLIP["train"], "lr_schedule": schedule}}
        params = params_from_dict({"runtime": {"device": "cpu", "seed": 5},
                                   "dataset": {"name": "synthetic", "prepared_dir": str(tiny_chain / "data")},
                                   "weakclip": weakclip})
        paths = chain_paths(tiny_chain, f"schedule_{schedule}")
        train_weakclip(params, paths, show_progress=False)
        rows = (paths.live_dir / "plots" / "metrics" / "train" / "lr.tsv").read_text().splitlines()
        return float(rows[-1].split("\t")[-1])

    assert last_lr("mmcv_cosine") == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * 5 / 6)) / 2)
    assert last_lr("warmup_cosine") == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * 3 / 4)) / 2)
