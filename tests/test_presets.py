"""Paper presets: they apply over params.yaml, validate, carry docs/METHOD.md's numbers and build the full-size models."""

from __future__ import annotations

import shutil
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import yaml

from weakclip_core.models.clip import clip_from_config, named_model_config
from weakclip_core.config import ConfigError, Params, load_params
from weakclip_core.config.params import distributed_batch_sizes
from weakclip_core.config import paper
from weakclip_core.config.presets import apply_preset, deep_merge, main
from weakclip_core.config.weakclip import WeakClipArchConfig, WeakClipConfig, paper_weakclip_arch, paper_weakclip_config
from weakclip_core.data.voc import VOC_CLASS_NAMES
from weakclip_core.models.mctformer import build_mctformer
from weakclip_core.models.weakclip import WeakCLIP

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"voc": REPO / "configs" / "voc.yaml", "coco": REPO / "configs" / "coco.yaml"}


def count(parameters) -> int:
    return sum(parameter.numel() for parameter in parameters)


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    target = tmp_path / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", target)
    return target


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Params]:
    """Each preset applied over a copy of the repository's params.yaml, then re-read by the one loader."""
    result = {}
    for name, preset in PRESETS.items():
        target = tmp_path_factory.mktemp(name) / "params.yaml"
        shutil.copyfile(REPO / "params.yaml", target)
        apply_preset(preset, target)
        result[name] = load_params(target)
    return result


def test_presets_carry_the_papers_numbers(applied: dict[str, Params]) -> None:
    """Every number below is copied by hand from docs/METHOD.md, not from the presets."""
    for name, params in applied.items():
        assert params.dataset.name == name and params.dataset.source
        assert params.clip.source == "file" and params.clip.weights
        assert params.clip.model_name.startswith("ViT-B-16")
        arch = params.cam.arch
        assert (arch.image_size, arch.patch_size, arch.width, arch.depth, arch.heads, arch.drop_path) == \
            (224, 16, 384, 12, 6, 0.1)
        train = params.cam.train
        assert (train.batch_size, train.epochs, train.lr, train.weight_decay, train.warmup_epochs) == \
            (64, 60, 5e-4, 0.05, 5)
        # MCTformer (main.py): timm RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, min lr 1e-5
        assert (train.auto_augment, train.randaugment_ops, train.reprob, train.min_lr) == \
            ("rand-m9-mstd0.5-inc1", 0, 0.25, 1e-5)
        assert (params.cam.infer.threshold_start, params.cam.infer.threshold_stop,
                params.cam.infer.threshold_step, params.cam.infer.attention_layers) == (0.0, 0.59, 0.01, 3)
        weakclip = params.weakclip
        assert (weakclip.prompt_len, weakclip.text_context_length, weakclip.temperature_init) == (8, 13, 0.1)
        assert weakclip.taps == [3, 5, 7, 11]
        assert (weakclip.co_attention_width, weakclip.co_attention_heads, weakclip.co_attention_layers) == (256, 4, 3)
        assert (weakclip.loss.aux_weight, weakclip.loss.aux_temperature, weakclip.loss.loss_size) == (0.4, 0.07, 64)
        assert (weakclip.loss.ratio_min, weakclip.loss.ratio_max) == (0.05, 20.0)
        crf = weakclip.loss.crf
        assert (crf.iterations, crf.gaussian_sxy, crf.gaussian_compat, crf.bilateral_sxy, crf.bilateral_srgb,
                crf.bilateral_compat) == (10, 3.0, 3.0, 80.0, 13.0, 10.0)
        schedule = weakclip.train
        assert (schedule.lr, schedule.weight_decay, schedule.warmup_iterations, schedule.min_lr, schedule.crop) == \
            (1e-4, 3e-5, 1500, 1e-6, 512)
        assert (schedule.scale_min, schedule.scale_max) == (0.5, 2.0)
        # hustvl/WeakCLIP (issue #17): Resize(img_scale=(2048, 512)), RandomCrop(cat_max_ratio=0.75), mmseg's
        # PhotoMetricDistortion hue_delta 18, trunc_normal_ contexts (std 1), backbone drop_path_rate 0.1,
        # dgcn_cal_seeding_loss (loss_1 + loss_2 of per-image means)
        assert (schedule.img_scale, schedule.cat_max_ratio, schedule.hue_delta) == ([2048, 512], 0.75, 18)
        assert (schedule.prompt_init_std, schedule.clip_drop_path_rate) == (1.0, 0.1)
        assert weakclip.loss.seed_loss_reduction == "per_image_sum"
        # the reference's blocks see (L, N, D): timm's drop_path drops token positions; mmcv's CosineAnnealing
        # over all iterations with the warm-up multiplying it; mmseg 0.19's cross-entropy mean over all pixels
        assert (schedule.clip_drop_path_unit, schedule.lr_schedule, schedule.decoder_init) == \
            ("token", "mmcv_cosine", "reference")
        assert weakclip.loss.aux_form == "reference"
        pseudo = params.pseudo
        assert pseudo.scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and pseudo.flip and pseudo.use_crf
        assert (pseudo.crop, pseudo.stride) == (512, 341)
        # the reference's test pipeline: img_scale (2048, 512), small windows as is; softmax: the paper's (labels)
        assert (pseudo.img_scale, pseudo.pad_small_windows, pseudo.softmax_classes) == ([2048, 512], False, "labels")
        seg = params.seg.train
        assert (params.seg.model, seg.optimizer, seg.momentum, seg.weight_decay, seg.schedule, seg.crop) == \
            ("deeplabv2", "sgd", 0.9, 5e-4, "poly", 448)
        # issue #18: the WSSS tables' DeepLabV2 retraining, ImageNet ResNet-101, 10x lr on the ASPP head
        assert (params.seg.encoder, seg.head_lr_mult) == ("resnet101", 10.0)
        assert params.runtime.launcher == "torchrun"
    voc, coco = applied["voc"], applied["coco"]
    assert (voc.weakclip.train.iterations, voc.weakclip.train.batch_size, voc.runtime.nproc) == (20000, 16, 2)
    assert (coco.weakclip.train.iterations, coco.weakclip.train.batch_size, coco.runtime.nproc) == (40000, 24, 4)
    assert (voc.dataset.train_split, voc.dataset.val_split, voc.dataset.voc_mask_dir) == \
        ("train_aug", "val", "SegmentationClassAug")
    assert (coco.dataset.train_split, coco.dataset.val_split) == ("train", "val")
    voc_crf, coco_crf = voc.pseudo.crf, coco.pseudo.crf
    assert (voc_crf.gaussian_sxy, voc_crf.gaussian_compat, voc_crf.bilateral_sxy, voc_crf.bilateral_srgb,
            voc_crf.bilateral_compat) == (3.0, 3.0, 83.0, 5.0, 3.0)
    assert (coco_crf.gaussian_sxy, coco_crf.gaussian_compat, coco_crf.bilateral_sxy, coco_crf.bilateral_srgb,
            coco_crf.bilateral_compat) == (1.0, 3.0, 67.0, 3.0, 4.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_yaml_spells_the_papers_architecture(name: str) -> None:
    """configs/*.yaml repeat the paper's architecture for `make preset`; they must not drift from config/paper.py."""
    written = yaml.safe_load(PRESETS[name].read_text())["weakclip"]
    arch_keys = [item.name for item in fields(WeakClipArchConfig)]
    assert {key: written.get(key) for key in arch_keys} == {**asdict(paper_weakclip_arch()), "taps": list(paper.TAPS)}


def test_the_papers_architecture_has_one_source() -> None:
    """config/paper.py's constants are WeakClipConfig's defaults, paper_weakclip_arch() and what
    paper_weakclip_config() puts over any base (keeping the base's seeds, losses and training)."""
    arch = paper_weakclip_arch()
    assert {item.name: getattr(arch, item.name) for item in fields(arch)} == \
        {item.name: getattr(paper, item.name.upper()) for item in fields(WeakClipArchConfig)}
    assert WeakClipConfig().arch() == arch
    base = load_params(REPO / "params.yaml").weakclip  # the synthetic default: narrower widths
    assert base.arch() != arch
    preset = paper_weakclip_config(base)
    assert preset.arch() == arch and (preset.seeds, preset.loss, preset.train) == (base.seeds, base.loss, base.train)
    # what the paper says, copied by hand from docs/METHOD.md §2 (not from config/paper.py)
    assert (arch.prompt_len, arch.text_context_length, arch.temperature_init, arch.taps, arch.co_attention) == \
        (8, 13, 0.1, (3, 5, 7, 11), True)
    assert (arch.co_attention_width, arch.co_attention_heads, arch.co_attention_layers) == (256, 4, 3)
    assert (arch.neck_width, arch.head_width, arch.dropout) == (256, 256, 0.1)  # head 256: its 4.14M (parity test)


def test_applied_presets_give_the_papers_architecture(applied: dict[str, Params]) -> None:
    for params in applied.values():
        assert params.weakclip.arch() == paper_weakclip_arch()


def test_apply_keeps_unnamed_keys_and_comments(params_copy: Path) -> None:
    before = load_params(params_copy)
    header = params_copy.read_text().splitlines()[0]
    apply_preset(PRESETS["voc"], params_copy)
    after = load_params(params_copy)
    text = params_copy.read_text()
    assert text.splitlines()[0] == header  # the file's own comments survive the round trip
    assert "  body_tint: 0.8        # bodies take most of their class colour" in text  # a key the preset leaves
    # A value the preset changes takes the preset's comment, or its name: the synthetic set's reasons go, with
    # their continuation lines (applying used to leave `depth: 12  # from scratch ...: 3 blocks ...`).
    lines = text.splitlines()
    assert "    depth: 12             # configs/voc.yaml" in lines
    assert "  name: voc             # configs/voc.yaml" in lines
    assert any(line.startswith("    lr: 0.0005") and "scaled in code by batch/512" in line for line in lines)
    for synthetic_reason in ("# synthetic | voc | coco", "3 blocks keep class-token attention local",
                             "# epochs; 12 stopped mid-descent", "2.5e-4 left the class tokens"):
        assert synthetic_reason not in text, synthetic_reason
    # keys the preset does not name keep their params.yaml values
    assert after.dataset.synthetic == before.dataset.synthetic
    assert after.clip.pretrain == before.clip.pretrain
    assert after.runtime.seed == before.runtime.seed
    # applying the same preset again changes nothing
    apply_preset(PRESETS["voc"], params_copy)
    assert params_copy.read_text() == text
    # COCO over VOC gives the same params as COCO over the defaults (every VOC-specific key is overridden)
    apply_preset(PRESETS["coco"], params_copy)
    fresh = params_copy.with_name("fresh.yaml")
    shutil.copyfile(REPO / "params.yaml", fresh)
    apply_preset(PRESETS["coco"], fresh)
    assert load_params(params_copy) == load_params(fresh)


def test_apply_names_the_placeholder_paths_still_left(params_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The presets' four local files (VOC tree, CLIP, DeiT-S, ResNet-101) are /path/to/ placeholders; `apply` and
    `check` list those still left, so a DeiT placeholder does not wait for cam_train to fail; once set, none."""
    assert main(["apply", str(PRESETS["voc"]), "--params", str(params_copy)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "still placeholders (/path/to/...): dataset.source, clip.weights, cam.arch.pretrained, seg.encoder_weights; "
        "set each to a local file before the chain runs")
    local = params_copy.with_name("local.yaml")
    local.write_text("dataset:\n  source: /data/VOC2012\nclip:\n  weights: /w/ViT-B-16.pt\ncam:\n  arch:\n"
                     "    pretrained: /w/deit.pth\nseg:\n  encoder_weights: /w/r101.pth\n")
    assert main(["check", str(local), "--params", str(params_copy)]) == 0
    assert "still placeholders" not in capsys.readouterr().out


def test_the_smoke_overlay_in_reproducing_is_valid_over_each_preset(params_copy: Path) -> None:
    """docs/REPRODUCING.md's smoke-run overlay (a walkthrough ran the VOC chain with these keys) stays a valid
    preset over each paper preset: a renamed or retyped key in it would stop a user's first run."""
    text = (REPO / "docs" / "REPRODUCING.md").read_text()
    block = text.split("# configs/smoke.yaml", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    smoke = params_copy.with_name("smoke.yaml")
    smoke.write_text(block)
    for preset in PRESETS.values():
        shutil.copyfile(REPO / "params.yaml", params_copy)
        apply_preset(preset, params_copy)
        params = apply_preset(smoke, params_copy)
        assert (params.runtime.device, params.runtime.launcher, params.weakclip.train.iterations) == ("cpu", "none", 4)
        assert (params.seg.eval.scales, params.pseudo.crop) == ([1.0], 128)


def test_bad_preset_names_the_key_and_leaves_params_untouched(params_copy: Path, tmp_path: Path) -> None:
    original = params_copy.read_bytes()
    typo = tmp_path / "typo.yaml"
    typo.write_text("weakclip:\n  promt_len: 8\n")
    with pytest.raises(ConfigError, match=r"weakclip\.promt_len: unknown key"):
        apply_preset(typo, params_copy)
    out_of_range = tmp_path / "range.yaml"
    out_of_range.write_text("pseudo:\n  crf:\n    iterations: 0\n")
    with pytest.raises(ConfigError, match=r"pseudo\.crf\.iterations: 0 is out of range"):
        apply_preset(out_of_range, params_copy)
    section_for_scalar = tmp_path / "shape.yaml"
    section_for_scalar.write_text("runtime:\n  seed:\n    value: 1\n")
    with pytest.raises(ConfigError, match=r"runtime\.seed"):
        apply_preset(section_for_scalar, params_copy)
    assert main(["apply", str(typo), "--params", str(params_copy)]) == 2
    assert params_copy.read_bytes() == original
    assert sorted(p.name for p in params_copy.parent.iterdir() if p.name.startswith(".")) == []


def test_a_preset_whose_batch_does_not_divide_over_its_processes_is_refused(params_copy: Path,
                                                                             tmp_path: Path) -> None:
    """COCO's preset once held seg.train.batch_size 10 with runtime.nproc 4: valid key by key, but seg_train
    refuses it at its start, after every stage before it has run. check and apply refuse it at once."""
    original = params_copy.read_bytes()
    odd = tmp_path / "odd.yaml"
    odd.write_text("runtime:\n  launcher: torchrun\n  nproc: 4\nseg:\n  train:\n    batch_size: 10\n")
    with pytest.raises(ConfigError, match=r"seg\.train\.batch_size: the global batch 10 does not divide over "
                                          r"runtime\.nproc = 4"):
        apply_preset(odd, params_copy)
    assert main(["check", str(odd), "--params", str(params_copy)]) == 2
    assert params_copy.read_bytes() == original
    single = tmp_path / "single.yaml"  # without torchrun nothing is split: any batch is fine
    single.write_text("runtime:\n  launcher: none\n  nproc: 4\nseg:\n  train:\n    batch_size: 10\n")
    assert main(["check", str(single), "--params", str(params_copy)]) == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_training_batch_of_a_preset_divides_over_its_processes(applied: dict[str, Params], name: str) -> None:
    params = applied[name]
    batches = distributed_batch_sizes(params)
    assert set(batches) == {"clip.pretrain.batch_size", "cam.train.batch_size", "weakclip.train.batch_size",
                            "seg.train.batch_size"} - ({"clip.pretrain.batch_size"} if params.clip.source != "pretrain"
                                                        else set())
    assert params.runtime.launcher == "torchrun"
    assert all(size % params.runtime.nproc == 0 for size in batches.values()), batches


def test_the_batches_checked_together_are_the_ones_each_stage_checks(applied: dict[str, Params]) -> None:
    """``distributed_batch_sizes`` is the union of the training stages' own ``global_batches`` (the StageSpecs
    of pipeline/), for a params file with the synthetic CLIP pre-training and for one loading a CLIP file."""
    from pipeline import cam_train, clip, seg_train, weakclip_train  # noqa: PLC0415 (the stages' specs)

    for params in (load_params(REPO / "params.yaml"), applied["voc"]):
        union: dict[str, int] = {}
        for stage in (clip, cam_train, weakclip_train, seg_train):
            union.update(stage.SPEC.global_batches(params))
        assert union == distributed_batch_sizes(params)


def test_deep_merge_by_hand() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    merged = deep_merge(base, {"a": {"c": [3]}, "e": 5})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": "x", "e": 5}


def weakclip_on_meta(params: Params, class_names: list[str]) -> WeakCLIP:
    """The preset's full-size WeakCLIP (CLIP architecture of the preset at its crop size) with no memory."""
    with torch.device("meta"):
        clip_model = clip_from_config(named_model_config(params.clip.model_name,
                                                         image_size=params.weakclip.train.crop))
        return WeakCLIP(clip_model, class_names, params.weakclip.arch())


def test_preset_models_have_the_papers_parameter_counts(applied: dict[str, Params]) -> None:
    voc = weakclip_on_meta(applied["voc"], VOC_CLASS_NAMES)
    coco_names = ["background", *(f"class {index}" for index in range(1, 81))]  # parameter counts ignore names
    coco = weakclip_on_meta(applied["coco"], coco_names)
    assert voc.num_classes == 21 and coco.num_classes == 81
    assert voc.clip.visual.positional_embedding.shape == (1 + 32 * 32, 768)  # ViT-B/16 at 512
    # docs/METHOD.md §2: 21.24M trainable / 171.46M total at K = 21 (paper table: 21.2M / 171.5M, 12.4 %).
    voc_total, voc_trainable = count(voc.parameters()), count(voc.trainable_parameters())
    assert abs(voc_trainable / 1e6 - 21.24) < 0.005 * 21.24, voc_trainable
    assert abs(voc_total / 1e6 - 171.46) < 0.001 * 171.46, voc_total
    assert round(100 * voc_trainable / voc_total, 1) == 12.4
    # K = 81 adds 60 classes to each of the 4 FPN laterals' inputs (256 outputs) and to the 1x1 classifier.
    expected_extra = 60 * 256 * 4 + (60 * 256 + 60)
    assert count(coco.trainable_parameters()) - voc_trainable == expected_extra
    assert count(coco.clip.parameters()) == count(voc.clip.parameters())


def deit_small_mctformer_parameters(n_classes: int) -> int:
    """MCTformer-V2 on DeiT-S counted by hand: patch embedding, C class tokens, position embedding for
    C + 14x14 tokens, 12 pre-norm blocks (width 384, MLP 1536), a 3x3 PatchCAM conv; no final norm, no head.
    (timm's deit_small_patch16_224 is 22,050,664 = these blocks + 1 token + final norm + a 1000-way head.)"""
    width, hidden = 384, 1536
    patch_embedding = 3 * 16 * 16 * width + width
    block = 2 * (2 * width) + (width * 3 * width + 3 * width) + (width * width + width) \
        + (width * hidden + hidden) + (hidden * width + width)
    return (patch_embedding + n_classes * width + (n_classes + 196) * width + 12 * block
            + (width * n_classes * 9 + n_classes))


def test_preset_mctformer_is_deit_small(applied: dict[str, Params]) -> None:
    # Built on CPU: MCTformerV2's constructor reads drop-path rates with .tolist(), which a meta tensor cannot.
    for name, n_foreground in (("voc", 20), ("coco", 80)):
        model = build_mctformer(applied[name].cam.arch, n_foreground)  # built only: the DeiT-S path is a placeholder
        assert count(model.parameters()) == deit_small_mctformer_parameters(n_foreground)
    # With one class token, swapping the PatchCAM conv for a final norm and a 1000-way head gives DeiT-S's
    # published 22,050,664 parameters (timm deit_small_patch16_224).
    patch_cam_conv, final_norm, imagenet_head = 384 * 9 + 1, 2 * 384, 384 * 1000 + 1000
    assert deit_small_mctformer_parameters(1) - patch_cam_conv + final_norm + imagenet_head == 22_050_664
