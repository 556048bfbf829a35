"""The retraining segmenter: both smp families build, train a step, load local encoder weights."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_voc import write_tiny_voc
from weakclip_core.config.seg import SegConfig, SegTrainConfig
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.data.segmentation import (GroundTruthMaskError, MaskedImageDataset, ground_truth_dirs,
                                             refuse_ground_truth_dir)
from weakclip_core.data.transforms import DenseAugmentation
from weakclip_core.models.segmenter import (SEGMENTER_MEAN, SEGMENTER_STD, SegmenterWeightsError, build_segmenter,
                                     load_encoder_weights, load_segmenter, segmenter_record)
from weakclip_core.artifacts.model_file import save_final_model


@pytest.mark.parametrize("family, encoder", [("deeplabv3plus", "resnet18"), ("segformer", "mit_b0")])
def test_build_and_one_training_step_on_tiny_data(tmp_path, family, encoder):
    write_tiny_voc(tmp_path / "voc", n_train=4, n_val=2, size=64)
    dataset = PreparedDataset.open(tmp_path / "voc")
    samples = MaskedImageDataset(dataset, dataset.split("train"), tmp_path / "voc" / "SegmentationClass",
                                 DenseAugmentation(64, 0.75, 1.25), seed=0, mean=SEGMENTER_MEAN, std=SEGMENTER_STD)
    images, masks = zip(*(samples[(0, index)] for index in range(4)))
    images, masks = torch.stack(images), torch.stack(masks)
    assert images.shape == (4, 3, 64, 64) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3, 255}

    torch.manual_seed(0)
    model = build_segmenter(SegConfig(model=family, encoder=encoder, train=SegTrainConfig(crop=64)),
                            dataset.n_classes)
    logits = model(images)
    assert logits.shape == (4, 4, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = F.cross_entropy(logits, masks, ignore_index=255)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())]
    assert any(name.startswith("encoder.") for name in changed)
    assert any(name.startswith(("decoder.", "segmentation_head.")) for name in changed)


def test_samples_are_a_pure_function_of_seed_epoch_index(tmp_path):
    write_tiny_voc(tmp_path / "voc", n_train=3, n_val=2, size=64)
    dataset = PreparedDataset.open(tmp_path / "voc")
    def make(seed):
        return MaskedImageDataset(dataset, dataset.split("train"), tmp_path / "voc" / "SegmentationClass",
                                  DenseAugmentation(48), seed=seed, mean=SEGMENTER_MEAN, std=SEGMENTER_STD)
    first, again, other = make(0)[(2, 1)], make(0)[(2, 1)], make(1)[(2, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_local_encoder_weights_load_and_bad_files_are_named(tmp_path):
    cfg = SegConfig(model="deeplabv3plus", encoder="resnet18")
    torch.manual_seed(1)
    source = build_segmenter(cfg, 3)
    # A torchvision-style checkpoint: classifier head included, wrapped in "state_dict", "encoder." prefix.
    state = {f"encoder.{key}": value for key, value in source.encoder.state_dict().items()}
    state["encoder.fc.weight"] = torch.zeros(1000, 512)
    state["encoder.fc.bias"] = torch.zeros(1000)
    weights_path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, weights_path)
    torch.manual_seed(2)
    loaded = build_segmenter(SegConfig(model="deeplabv3plus", encoder="resnet18",
                                       encoder_weights=str(weights_path)), 3)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    assert not torch.equal(loaded.segmentation_head[0].weight, source.segmentation_head[0].weight)

    with pytest.raises(SegmenterWeightsError, match="missing.pth not found"):
        load_encoder_weights(loaded, tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(SegmenterWeightsError, match="wrong.pth does not fit"):
        load_encoder_weights(loaded, tmp_path / "wrong.pth")


def test_saved_segmenter_round_trips(tmp_path):
    cfg = SegConfig(model="segformer", encoder="mit_b0", train=SegTrainConfig(crop=64))
    model = build_segmenter(cfg, 4).eval()
    path = tmp_path / "model.pt"
    save_final_model(path, model, segmenter_record(cfg, ["background", "a", "b", "c"]), source="gt")
    rebuilt, saved = load_segmenter(path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(images).numpy(), model(images).numpy())
    assert saved["source"] == "gt" and saved["config"]["class_names"][1] == "a"
    with pytest.raises(SegmenterWeightsError, match="run the seg_train stage"):
        load_segmenter(tmp_path / "nothing.pt")


def test_frozen_encoder_batch_norm_is_eval_mode_batch_norm_and_never_trains(tmp_path):
    """``seg.train.freeze_encoder_bn`` (the presets; DeepLabV2's practice): in train mode the
    encoder computes what torch's ``BatchNorm2d`` computes in eval mode with the loaded ImageNet statistics; a
    training step moves the convolutions but no statistic or affine weight; the saved model rebuilds so."""
    from torch import nn

    torch.manual_seed(3)
    imagenet = build_segmenter(SegConfig(model="deeplabv2", encoder="resnet50"), 3).encoder
    for module in imagenet.modules():  # statistics and affine weights unlike the initial 0 / 1
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    torch.save(imagenet.state_dict(), tmp_path / "resnet50.pth")  # torchvision's layout, num_batches_tracked too
    cfg = SegConfig(model="deeplabv2", encoder="resnet50", encoder_weights=str(tmp_path / "resnet50.pth"),
                    train=SegTrainConfig(freeze_encoder_bn=True))
    model = build_segmenter(cfg, 3).train()
    images = torch.randn(2, 3, 41, 41)
    imagenet.eval()
    expected = imagenet.layer4(imagenet.layer3(imagenet.layer2(imagenet.layer1(
        imagenet.maxpool(imagenet.relu(imagenet.bn1(imagenet.conv1(images))))))))
    torch.testing.assert_close(model.features(images), expected, atol=2e-4, rtol=1e-3)  # a x + b vs (x - m) / s

    frozen_state = {key: value.clone() for key, value in model.encoder.state_dict().items()
                    if ".bn" in f".{key}" or ".downsample.1." in key}  # every BatchNorm's four tensors
    assert len(frozen_state) == 4 * sum(isinstance(m, nn.BatchNorm2d) for m in imagenet.modules())
    conv = model.encoder.layer1[0].conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(images), torch.randint(0, 3, (2, 41, 41))).backward()
    optimizer.step()
    for key, value in frozen_state.items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    assert not torch.equal(model.encoder.layer1[0].conv1.weight, conv)

    path = tmp_path / "model.pt"
    save_final_model(path, model.eval(), segmenter_record(cfg, ["background", "a", "b"]), source="pseudo")
    rebuilt, saved = load_segmenter(path)
    assert saved["config"]["seg"]["train"]["freeze_encoder_bn"] is True
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images))
    assert "freeze_encoder_bn" not in segmenter_record(SegConfig(), ["background"])["seg"]["train"]  # default files
    # keep their bytes


def test_a_pseudo_mask_folder_resolving_to_gt_is_refused(tmp_path):
    prepared = tmp_path / "prepared"
    (prepared / "SegmentationClass").mkdir(parents=True)
    (tmp_path / "link").symlink_to(prepared / "SegmentationClass")
    gt_dirs = ground_truth_dirs(prepared)
    for bad in [prepared / "SegmentationClass", tmp_path / "link", prepared / "SegmentationClass" / "sub",
                Path(str(prepared / "x" / ".." / "SegmentationClass"))]:
        with pytest.raises(GroundTruthMaskError, match="pseudo.output_dir"):
            refuse_ground_truth_dir(bad, gt_dirs, "pseudo.output_dir")
    assert refuse_ground_truth_dir(tmp_path / "pseudo", gt_dirs, "pseudo.output_dir") == (tmp_path / "pseudo").resolve()


def test_your_own_datas_masks_and_cocos_rendered_masks_are_gt_folders_too(tmp_path):
    """README "Your own data": ``<source>/masks`` holds GT masks, as COCO's ``dataset.coco_masks`` does; a seeds
    or pseudo-mask folder resolving into either is refused like the prepared ``SegmentationClass``."""
    prepared, source, coco = tmp_path / "prepared", tmp_path / "my_dataset", tmp_path / "coco_masks"
    for folder in (prepared / "SegmentationClass", source / "masks", coco):
        folder.mkdir(parents=True)
    assert ground_truth_dirs(prepared, source, coco) == [
        prepared / "SegmentationClass", source / "SegmentationClass", source / "SegmentationClassAug",
        source / "masks", source / "voc_format" / "class_labels", coco]
    gt_dirs = ground_truth_dirs(prepared, source, coco)
    for bad in (source / "masks", coco / "sub", source / "voc_format" / "class_labels"):
        with pytest.raises(GroundTruthMaskError, match="weakclip.seeds.mask_folder"):
            refuse_ground_truth_dir(bad, gt_dirs, "weakclip.seeds.mask_folder")
    assert refuse_ground_truth_dir(source / "pseudo", gt_dirs, "weakclip.seeds.mask_folder") == \
        (source / "pseudo").resolve()
