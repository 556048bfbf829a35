"""seg_train@{pseudo,gt} and seg_eval on a tiny dataset: outputs, exact resume, GT guards, and seg_eval's
metrics against a hand-worked case (a segmenter that predicts one class everywhere)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.seg_eval import SegEvalPaths, evaluate_segmenter
from pipeline.seg_train import SegTrainPaths, train_segmenter
from tiny_voc import CLASS_NAMES, write_tiny_voc
from weakclip_core.config import params_from_dict
from weakclip_core.config.seg import SegConfig, SegTrainConfig
from weakclip_core.data.layout import DatasetError, PreparedDataset
from weakclip_core.data.segmentation import GroundTruthMaskError
from weakclip_core.models.segmenter import build_segmenter, load_segmenter, segmenter_record
from weakclip_core.config import CrfConfig
from weakclip_core.evaluation.metrics import ConfusionAccumulator
from weakclip_core.method.inference import InferenceAugmentation, predict_image_batch
from weakclip_core.method.prediction_crf import crf_prediction
from weakclip_core.artifacts.model_file import save_final_model

SEG = {"model": "segformer", "encoder": "mit_b0",
       "train": {"epochs": 2, "batch_size": 4, "crop": 64, "lr": 0.001, "checkpoint_every": 1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """root/data (tiny VOC, 8 train / 4 val) and root/pseudo (stand-in pseudo masks: a copy of GT + provenance)."""
    root = tmp_path_factory.mktemp("seg")
    write_tiny_voc(root / "data", n_train=8, n_val=4, size=64)
    (root / "pseudo").mkdir()
    for path in sorted((root / "data" / "SegmentationClass").glob("*.png")):
        shutil.copyfile(path, root / "pseudo" / path.name)
    (root / "pseudo" / "provenance.json").write_text(json.dumps(
        {"made_by": "tests", "gt_used": False, "threshold_chosen_with_gt": False, "cam_variant": "fused"}))
    return root


def params_of(root: Path, output_dir: Path | None = None):
    return params_from_dict({"runtime": {"device": "cpu", "seed": 3},
                             "dataset": {"prepared_dir": str(root / "data")},
                             "pseudo": {"output_dir": str(output_dir or root / "pseudo")}, "seg": SEG})


def train_paths(root: Path, run: str) -> SegTrainPaths:
    return SegTrainPaths(model_root=root / run / "seg", live_root=root / run / "dvclive",
                         checkpoint_root=root / run / "checkpoints")


@pytest.mark.slow
def test_seg_train_writes_the_model_and_resumes_to_identical_weights(tiny):
    params = params_of(tiny)
    straight = train_segmenter(params, "pseudo", train_paths(tiny, "straight"), show_progress=False)
    assert straight.steps == 4 and np.isfinite(straight.final_loss)
    resumed_paths = train_paths(tiny, "resumed")
    assert train_segmenter(params, "pseudo", resumed_paths, stop_after_steps=3, show_progress=False) is None
    assert not resumed_paths.model("pseudo").exists()
    assert (resumed_paths.checkpoint_root / "seg_train_pseudo").is_dir()
    train_segmenter(params, "pseudo", resumed_paths, show_progress=False)
    assert not (resumed_paths.checkpoint_root / "seg_train_pseudo").exists()
    first = torch.load(straight.model_path, weights_only=True)
    second = torch.load(resumed_paths.model("pseudo"), weights_only=True)
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
    assert first["source"] == "pseudo" and first["config"]["class_names"] == CLASS_NAMES
    assert first["mask_provenance"]["threshold_chosen_with_gt"] is False
    assert (resumed_paths.live_dir("pseudo") / "metrics.json").is_file()


def test_a_pseudo_source_that_is_the_gt_folder_or_lacks_provenance_is_refused(tiny, tmp_path):
    with pytest.raises(GroundTruthMaskError, match="pseudo.output_dir"):
        train_segmenter(params_of(tiny, tiny / "data" / "SegmentationClass"), "pseudo", train_paths(tmp_path, "a"),
                        show_progress=False)
    (tmp_path / "gt_link").symlink_to(tiny / "data" / "SegmentationClass")
    with pytest.raises(GroundTruthMaskError):
        train_segmenter(params_of(tiny, tmp_path / "gt_link"), "pseudo", train_paths(tmp_path, "b"),
                        show_progress=False)
    shutil.copytree(tiny / "pseudo", tmp_path / "no_provenance")
    (tmp_path / "no_provenance" / "provenance.json").unlink()
    with pytest.raises(DatasetError, match="provenance.json: missing"):
        train_segmenter(params_of(tiny, tmp_path / "no_provenance"), "pseudo", train_paths(tmp_path, "c"),
                        show_progress=False)


def constant_segmenter(root: Path, source: str, predicted_class: int) -> SegEvalPaths:
    """Save a SegFormer whose head has zero weights and a bias that picks ``predicted_class`` everywhere."""
    cfg = SegConfig(model="segformer", encoder="mit_b0", train=SegTrainConfig(crop=64))
    model = build_segmenter(cfg, len(CLASS_NAMES))
    with torch.no_grad():
        model.segmentation_head[0].weight.zero_()
        model.segmentation_head[0].bias.copy_(torch.nn.functional.one_hot(torch.tensor(predicted_class), 4) * 5.0)
    paths = SegEvalPaths(model_root=root / "seg", metrics_root=root / "metrics", reports_root=root / "reports")
    save_final_model(paths.model(source), model, segmenter_record(cfg, CLASS_NAMES), source=source,
                     mask_provenance={"gt_used": False, "threshold_chosen_with_gt": False, "cam_variant": "fused"})
    return paths


def test_seg_eval_metrics_match_a_hand_worked_case(tiny, tmp_path):
    paths = constant_segmenter(tmp_path, "pseudo", predicted_class=2)
    metrics = evaluate_segmenter(params_of(tiny), "pseudo", paths, n_samples=2, n_worst=3, show_progress=False)
    dataset = PreparedDataset.open(tiny / "data")
    masks = [dataset.mask(image_id) for image_id in dataset.split("val")]
    valid = sum(int((mask != 255).sum()) for mask in masks)
    count = {k: sum(int((mask == k).sum()) for mask in masks) for k in range(4)}
    # Everything predicted as class 2: IoU_2 = |GT=2| / valid; a class in GT but never predicted: 0;
    # a class in neither: undefined (None), left out of the mean.
    expected = {name: (count[k] / valid if k == 2 else (0.0 if count[k] else None))
                for k, name in enumerate(CLASS_NAMES)}
    assert metrics["per_class"] == pytest.approx(expected)
    defined = [v for v in expected.values() if v is not None]
    assert metrics["miou"] == pytest.approx(sum(defined) / len(defined))
    assert metrics["pixel_accuracy"] == pytest.approx(count[2] / valid)
    assert metrics["precision"]["boat"] == pytest.approx(count[2] / valid)
    assert metrics["recall"]["boat"] == (1.0 if count[2] else None)
    assert metrics["precision"]["background"] is None and metrics["recall"]["background"] == 0.0
    assert metrics["split"] == "val" and metrics["n_images"] == 4 and metrics["source"] == "pseudo"
    assert metrics["threshold_chosen_with_gt"] is False and metrics["gt_used_in_training"] is False
    assert json.loads(paths.metrics("pseudo").read_text()) == metrics
    reports = sorted(p.name for p in paths.reports("pseudo").iterdir())
    assert "confusion_matrix.png" in reports
    assert len([r for r in reports if r.startswith("sample_")]) == 2
    assert len([r for r in reports if r.startswith("worst_")]) == 3


def test_an_image_whose_mask_is_all_ignore_is_not_ranked_worst(tiny, tmp_path):
    """A GT mask of 255 only (a user's "don't care" image) has no pixel to score: its per-image mIoU is undefined,
    not 0.0, so it must not be shown as the worst prediction (it used to be ranked first, ahead of every real miss)."""
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    val_ids = PreparedDataset.open(data).split("val")
    mask_path = data / "SegmentationClass" / f"{val_ids[0]}.png"
    with Image.open(mask_path) as mask:
        blank = mask.copy()
    blank.paste(255, (0, 0, *blank.size))
    blank.save(mask_path)
    paths = constant_segmenter(tmp_path, "pseudo", predicted_class=2)
    params = params_from_dict({"runtime": {"device": "cpu", "seed": 3}, "dataset": {"prepared_dir": str(data)},
                               "pseudo": {"output_dir": str(tiny / "pseudo")}, "seg": SEG})
    evaluate_segmenter(params, "pseudo", paths, n_samples=0, n_worst=len(val_ids), show_progress=False)
    worst = sorted(p.name for p in paths.reports("pseudo").iterdir() if p.name.startswith("worst_"))
    assert len(worst) == len(val_ids) - 1 and not any(val_ids[0] in name for name in worst), worst


def test_seg_eval_of_the_gt_model_says_gt_was_used(tiny, tmp_path):
    paths = constant_segmenter(tmp_path, "gt", predicted_class=0)
    metrics = evaluate_segmenter(params_of(tiny), "gt", paths, n_samples=0, n_worst=0, show_progress=False)
    assert metrics["gt_used_in_training"] is True and metrics["per_class"]["apple"] == 0.0


def test_seg_eval_runs_the_reference_protocol_and_records_it(tiny, tmp_path):
    """``seg.eval`` at the presets' protocol (scales, flip, CRF in a worker process) on the one-class segmenter:
    a constant prediction stays constant under every view and the CRF (one class shown), so the hand-worked
    figures of the single-scale run must come out again; the metrics say which protocol made them."""
    paths = constant_segmenter(tmp_path, "pseudo", predicted_class=2)
    single = evaluate_segmenter(params_of(tiny), "pseudo", paths, n_samples=0, n_worst=0, show_progress=False)
    assert single["eval"] == {"scales": [1.0], "flip": False, "crf": None}
    protocol = {"scales": [0.5, 0.75, 1.0, 1.25, 1.5], "flip": True, "use_crf": True, "workers": 1,
                "crf": {"iterations": 10, "gaussian_sxy": 1.0, "gaussian_compat": 3.0, "bilateral_sxy": 112.0,
                        "bilateral_srgb": 2.0, "bilateral_compat": 3.0}}
    params = params_from_dict({"runtime": {"device": "cpu", "seed": 3}, "dataset": {"prepared_dir": str(tiny / "data")},
                               "pseudo": {"output_dir": str(tiny / "pseudo")}, "seg": {**SEG, "eval": protocol}})
    reference = evaluate_segmenter(params, "pseudo", paths, n_samples=0, n_worst=0, show_progress=False)
    assert reference["eval"] == {"scales": protocol["scales"], "flip": True, "crf": protocol["crf"]}
    assert reference["per_class"] == single["per_class"] and reference["miou"] == single["miou"]


def test_the_model_file_does_not_hold_the_evaluation_protocol():
    """An evaluation setting must not change a trained model's bytes (seg_train declares seg minus eval)."""
    default = SegConfig()
    reference_protocol = params_from_dict({"seg": {"eval": {"scales": [0.5, 1.0], "flip": True, "use_crf": True}}}).seg
    assert segmenter_record(default, CLASS_NAMES) == segmenter_record(reference_protocol, CLASS_NAMES)
    assert "eval" not in segmenter_record(default, CLASS_NAMES)["seg"]


def test_encoder_weights_replaced_at_the_same_path_are_not_resumed(tiny, tmp_path):
    """As the DeiT init of cam_train: the encoder weights' bytes are in the resume key, not only their path."""
    import segmentation_models_pytorch as smp

    def encoder_file(seed: int) -> None:
        torch.manual_seed(seed)
        torch.save(smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=3).encoder.state_dict(),
                   tmp_path / "mit_b0.pth")

    params = params_from_dict({"runtime": {"device": "cpu", "seed": 3}, "dataset": {"prepared_dir": str(tiny / "data")},
                               "pseudo": {"output_dir": str(tiny / "pseudo")},
                               "seg": {**SEG, "encoder_weights": str(tmp_path / "mit_b0.pth")}})
    paths = train_paths(tmp_path, "run")
    encoder_file(1)
    assert train_segmenter(params, "pseudo", paths, stop_after_steps=2, show_progress=False) is None
    encoder_file(2)  # other weights, same path: a run of its own from step 0 (the same file resumes: the test above)
    assert train_segmenter(params, "pseudo", paths, stop_after_steps=1, show_progress=False) is None
    assert sorted(torch.load(path, weights_only=True)["step"]
                  for path in paths.checkpoint_root.glob("seg_train_pseudo/*/last.pt")) == [1, 2]


def test_seg_eval_crf_scores_each_image_with_its_own_crf_prediction(tiny, tmp_path, monkeypatch):
    """A segmenter whose head is random (seeded) predicts several classes per image, so the CRF has work: the
    stage's figures with ``use_crf`` (in a worker process, batches of 1 image so that one batch's CRFs run while the
    next is inferred) equal the confusion of ``crf_prediction`` applied image by image to the views'
    probabilities, and differ from the figures without the CRF."""
    import pipeline.seg_eval

    monkeypatch.setattr(pipeline.seg_eval, "EVAL_BATCH", 1)
    paths = constant_segmenter(tmp_path, "pseudo", predicted_class=0)
    model, saved = load_segmenter(paths.model("pseudo"))
    torch.manual_seed(0)
    with torch.no_grad():
        model.segmentation_head[0].weight.normal_(0.0, 2.0)
        model.segmentation_head[0].bias.zero_()
    save_final_model(paths.model("pseudo"), model, saved["config"], source="pseudo",
                     mask_provenance={"gt_used": False, "threshold_chosen_with_gt": False, "cam_variant": "fused"})
    crf = {"iterations": 5, "gaussian_sxy": 1.0, "gaussian_compat": 3.0, "bilateral_sxy": 20.0,
           "bilateral_srgb": 10.0, "bilateral_compat": 10.0}

    def evaluate(use_crf: bool) -> dict:
        params = params_from_dict({"runtime": {"device": "cpu", "seed": 3},
                                   "dataset": {"prepared_dir": str(tiny / "data")},
                                   "pseudo": {"output_dir": str(tiny / "pseudo")},
                                   "seg": {**SEG, "eval": {"flip": True, "use_crf": use_crf, "workers": 1, "crf": crf}}})
        return evaluate_segmenter(params, "pseudo", paths, n_samples=0, n_worst=0, show_progress=False)

    dataset = PreparedDataset.open(tiny / "data")
    images = [dataset.image(image_id) for image_id in dataset.split("val")]
    views = InferenceAugmentation(scales=(1.0,), flip=True, crop=64, stride=42)
    probabilities = predict_image_batch(model.eval(), images, None, dataset.n_classes, views,
                                        mean=saved["config"]["mean"], std=saved["config"]["std"])
    assert max(len(np.unique(p.argmax(axis=0))) for p in probabilities) >= 2
    expected = ConfusionAccumulator(dataset.n_classes)
    for image_id, image, probability in zip(dataset.split("val"), images, probabilities):
        expected.add(dataset.mask(image_id), crf_prediction(image, probability, CrfConfig(**crf)))
    assert len(images) >= 3  # three batches or more pass through the queue of CRF batches
    with_crf, without_crf = evaluate(True), evaluate(False)
    assert with_crf["miou"] == pytest.approx(expected.report().miou)
    assert with_crf["per_class"] == pytest.approx(expected.report().as_dict(dataset.class_names)["per_class"])
    assert with_crf["per_class"] != without_crf["per_class"]


def test_a_failing_crf_names_its_image(tiny, tmp_path, monkeypatch):
    """A CRF prediction that raises (a broken model output, a CRF worker that died) says which image it was for:
    the error keeps its type and message and gains a note naming the image."""
    import pipeline.seg_eval

    paths = constant_segmenter(tmp_path, "pseudo", predicted_class=0)
    val = PreparedDataset.open(tiny / "data").split("val")
    calls = []

    def failing_on_the_second(job):
        calls.append(job)
        if len(calls) == 2:
            raise ValueError("the CRF failed")
        return np.zeros(job[0].shape[:2], dtype=np.uint8)

    monkeypatch.setattr(pipeline.seg_eval, "crf_on_shown_job", failing_on_the_second)
    params = params_from_dict({"runtime": {"device": "cpu"}, "dataset": {"prepared_dir": str(tiny / "data")},
                               "pseudo": {"output_dir": str(tiny / "pseudo")},
                               "seg": {**SEG, "eval": {"use_crf": True, "workers": 0}}})
    with pytest.raises(ValueError, match="the CRF failed") as failed:
        evaluate_segmenter(params, "pseudo", paths, n_samples=0, n_worst=0, show_progress=False)
    assert failed.value.__notes__ == [f"while making the CRF prediction of image {val[1]}"]
