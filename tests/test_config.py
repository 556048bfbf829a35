"""The params loader: defaults load, and bad keys/types/ranges are rejected by their key path."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from weakclip_core.config import ConfigError, load_params, params_from_dict, to_plain, to_plain_without_defaults

REPO = Path(__file__).resolve().parent.parent


def test_repository_params_load_and_round_trip():
    params = load_params(REPO / "params.yaml")
    assert params.weakclip.prompt_len == 8
    assert params.weakclip.taps == [3, 5, 7, 11]
    plain = to_plain(params)
    assert params_from_dict(plain) == params


@dataclasses.dataclass(frozen=True)
class _Inner:
    kept: int = 1
    added_later: str = "old"


@dataclasses.dataclass(frozen=True)
class _Outer:
    lr: float = 0.1
    schedule: str = "cosine"
    inner: _Inner = _Inner()


def test_a_key_recorded_when_set_is_left_out_only_while_it_holds_its_default():
    """The model file's record of its params: the named keys vanish at their defaults, nothing else does, and the
    remaining keys keep their order (the file's bytes depend on it)."""
    keys = (("schedule",), ("inner", "added_later"))
    assert list(to_plain_without_defaults(_Outer(), keys).items()) == [("lr", 0.1), ("inner", {"kept": 1})]
    changed = _Outer(lr=0.2, schedule="step", inner=_Inner(kept=1, added_later="new"))
    assert list(to_plain_without_defaults(changed, keys).items()) == [
        ("lr", 0.2), ("schedule", "step"), ("inner", {"kept": 1, "added_later": "new"})]
    # A key not named stays even at its default.
    assert to_plain_without_defaults(_Outer(), ()) == {"lr": 0.1, "schedule": "cosine",
                                                       "inner": {"kept": 1, "added_later": "old"}}


def test_params_yaml_lists_every_schema_key():
    """params.yaml spells out every key, so `dvc exp run -S` can vary any of them."""
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    schema = to_plain(params_from_dict({}))

    def keys(tree, prefix=""):
        out = set()
        for key, value in tree.items():
            out.add(prefix + key)
            if isinstance(value, dict):
                out |= keys(value, prefix + key + ".")
        return out

    assert keys(schema) == keys(written)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"weakclip": {"prompt_len": "eight"}}, "weakclip.prompt_len: expected int, got 'eight'"),
        ({"weakclip": {"prompt_lenn": 8}}, "weakclip.prompt_lenn: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"weakclip": {"prompt_len": 0}}, "weakclip.prompt_len: 0 is out of range, must be >= 1"),
        ({"weakclip": {"prompt_len": True}}, "weakclip.prompt_len: expected int"),
        ({"weakclip": {"seeds": {"mode": "soft"}}}, "weakclip.seeds.mode: expected one of ['confident', 'dense']"),
        ({"weakclip": {"seeds": {"fg_threshold": 0.2, "bg_threshold": 0.3}}}, "weakclip.seeds.bg_threshold"),
        ({"weakclip": {"taps": [3, 5, 7]}}, "weakclip.taps: expected 4 block indices"),
        ({"weakclip": {"co_attention_heads": 3}}, "weakclip.co_attention_width: 256 is not divisible by"),
        ({"cam": {"infer": {"scales": [1.0, "big"]}}}, "cam.infer.scales[1]: expected float"),
        ({"cam": {"infer": {"flip": "yes"}}}, "cam.infer.flip: expected bool"),
        ({"dataset": {"synthetic": {"image_size": 8}}}, "dataset.synthetic.image_size: 8 is out of range"),
        ({"dataset": {"name": "voc"}}, "dataset.source: required when name is 'voc'"),
        ({"seg": {"model": "segformer", "encoder": "resnet18"}}, "seg.encoder: segformer needs an MiT encoder"),
        ({"seg": {"train": {"freeze_encoder_bn": True}}},
         "seg.train.freeze_encoder_bn: true keeps the encoder's BatchNorm at the ImageNet statistics it loads, but "
         "encoder_weights is imports/none"),
        ({"clip": {"source": "file"}}, "clip.weights: required when source is 'file'"),
        ({"pseudo": []}, "pseudo: expected a mapping"),
        ({"pseudo": {"absent_class_odds_ratio": 0.5}}, "pseudo.absent_class_odds_ratio: 0 (off) or > 1, got 0.5"),
        ({"pseudo": {"absent_class_odds_ratio": 1}}, "pseudo.absent_class_odds_ratio: 0 (off) or > 1, got 1.0"),
        ({"pseudo": {"absent_class_odds_ratio": float("inf")}}, "pseudo.absent_class_odds_ratio: inf is out of range"),
        # cross-field rules, checked when params load (issue #22, finding 8)
        ({"cam": {"arch": {"image_size": 30, "patch_size": 8}}},
         "cam.arch.image_size: 30 is not a multiple of patch_size 8"),
        ({"cam": {"infer": {"threshold_start": 0.7, "threshold_stop": 0.3}}},
         "cam.infer.threshold_start: 0.7 is above threshold_stop 0.3"),
        ({"cam": {"infer": {"scales": []}}}, "cam.infer.scales: expected at least one item, got an empty list"),
        ({"pseudo": {"scales": []}}, "pseudo.scales: expected at least one item, got an empty list"),
        ({"pseudo": {"crop": 32, "stride": 48}}, "pseudo.stride: 48 is larger than crop 32"),
        ({"weakclip": {"train": {"scale_min": 2.5, "scale_max": 2.0}}},
         "weakclip.train.scale_min: 2.5 is above scale_max 2.0"),
        ({"seg": {"train": {"scale_min": 2.5, "scale_max": 2.0}}}, "seg.train.scale_min: 2.5 is above scale_max 2.0"),
        ({"weakclip": {"loss": {"ratio_min": 30.0, "ratio_max": 20.0}}},
         "weakclip.loss.ratio_min: 30.0 is above ratio_max 20.0"),
        # NaN fails every range check, bounded above, below, both, in a list
        ({"cam": {"train": {"lr": float("nan")}}}, "cam.train.lr: nan is not a number, must be >= 0.0"),
        ({"weakclip": {"seeds": {"fg_threshold": float("nan")}}},
         "weakclip.seeds.fg_threshold: nan is not a number, must be >= 0.0 and <= 1.0"),
        ({"weakclip": {"seeds": {"bg_threshold": float("nan")}}}, "weakclip.seeds.bg_threshold: nan is not a number"),
        ({"cam": {"infer": {"scales": [1.0, float("nan")]}}}, "cam.infer.scales[1]: nan is not a number"),
        ({"dataset": {"synthetic": {"part_fraction": float("nan")}}},
         "dataset.synthetic.part_fraction: nan is not a number"),
    ],
)
def test_bad_values_name_their_key_path(data, message):
    with pytest.raises(ConfigError) as error:
        params_from_dict(data)
    assert message in str(error.value)


def test_range_check_is_nan_aware_and_inclusive():
    from weakclip_core.config.schema import check_range

    for low, high in [(0.0, 1.0), (0.0, None), (None, 1.0), (None, None)]:
        with pytest.raises(ConfigError, match=r"^x: nan is not a number"):
            check_range(float("nan"), "x", low, high)
    check_range(0.0, "x", 0.0, 1.0)
    check_range(1.0, "x", 0.0, 1.0)
    with pytest.raises(ConfigError, match=r"^x: 1\.5 is out of range, must be <= 1\.0$"):
        check_range(1.5, "x", 0.0, 1.0)


def test_equal_ends_of_a_cross_field_rule_are_accepted():
    params = params_from_dict({"cam": {"infer": {"threshold_start": 0.3, "threshold_stop": 0.3}},
                               "pseudo": {"crop": 32, "stride": 32},
                               "weakclip": {"train": {"scale_min": 1.0, "scale_max": 1.0}}})
    assert params.cam.infer.threshold_start == params.cam.infer.threshold_stop == 0.3


def test_int_is_accepted_for_float_and_converted():
    params = params_from_dict({"weakclip": {"temperature_init": 1}})
    assert params.weakclip.temperature_init == 1.0 and isinstance(params.weakclip.temperature_init, float)


def test_load_params_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("weakclip: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_params(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("weakclip:\n  prompt_len: eight\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: weakclip.prompt_len: expected int, got 'eight'"):
        load_params(wrong)


def test_values_dvc_exp_run_s_writes_load_as_dvc_reads_them(tmp_path: Path) -> None:
    """`dvc exp run -S key=0.00003` writes `3e-05` (YAML 1.2, DVC's ruamel.yaml): it is that float, as DVC's own
    params reader says, not the string YAML 1.1 makes of it (the loader used to refuse it as not a float)."""
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    apply_overrides(str(path), ["weakclip.train.weight_decay=0.00003", "weakclip.train.min_lr=1e-7",
                                "seg.train.lr=0.0002"])
    text = path.read_text(encoding="utf-8")
    assert "weight_decay: 3e-05" in text and "min_lr: 1e-07" in text  # how DVC writes them
    assert yaml.safe_load(text)["weakclip"]["train"]["weight_decay"] == "3e-05"  # YAML 1.1's reading: a string
    dvc_reads = load_yaml(str(path))
    params = load_params(path)
    assert params.weakclip.train.weight_decay == dvc_reads["weakclip"]["train"]["weight_decay"] == 3e-05
    assert params.weakclip.train.min_lr == 1e-07 and params.seg.train.lr == 0.0002


def test_a_key_given_twice_is_refused_naming_the_file_and_lines(tmp_path: Path) -> None:
    """A second `lr:` (or a second section) used to win silently; DVC refuses such a file, and so does the loader."""
    path = tmp_path / "params.yaml"
    path.write_text("weakclip:\n  train:\n    lr: 0.001\n    iterations: 300\n    lr: 0.01\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_params(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not valid YAML") and 'duplicate key "lr"' in message
    assert "line 3" in message and "line 5" in message and "unicode string" not in message
    assert "To suppress" not in message and "\n" not in message  # one line


def test_clip_image_size_must_be_a_multiple_of_its_patch_size() -> None:
    with pytest.raises(ConfigError, match=r"^clip\.arch\.image_size: 100 is not a multiple of patch_size 16$"):
        params_from_dict({"clip": {"arch": {"image_size": 100}}})
    params_from_dict({"clip": {"arch": {"image_size": 96}}})  # 6 x 16


def test_weakclip_and_its_clip_must_fit_together_at_load_time() -> None:
    """Pairs that used to load and then fail at weakclip_train's first step, after the clip and CAM stages had run
    (the prompt learner's, the visual taps', the text encoder's own checks): refused by the loader naming the keys.
    A weights file (clip.source: file) brings its own architecture, so clip.arch is not held against it."""
    base = {"clip": {"source": "pretrain", "arch": {"vision_layers": 12, "context_length": 32}},
            "weakclip": {"prompt_len": 8, "text_context_length": 13, "taps": [3, 5, 7, 11]}}
    assert params_from_dict(base).weakclip.prompt_len == 8
    # 13 tokens - 12 contexts = 1 for the name: the prompt learner needs 2 (13 - 11 = 2 passes).
    assert params_from_dict({**base, "weakclip": {**base["weakclip"], "prompt_len": 11}}).weakclip.prompt_len == 11
    with pytest.raises(ConfigError, match=r"^weakclip\.text_context_length: 13 leaves 1 token\(s\) for the class "
                                          r"names after prompt_len 12"):
        params_from_dict({**base, "weakclip": {**base["weakclip"], "prompt_len": 12}})
    # taps are 0-based block indices: 11 needs 12 blocks; 6 blocks end at block 5.
    six_blocks = {**base, "clip": {"source": "random", "arch": {"vision_layers": 6, "context_length": 32}}}
    with pytest.raises(ConfigError, match=r"^weakclip\.taps: \[3, 5, 7, 11\] reach block 11, but "
                                          r"clip\.arch\.vision_layers is 6 \(blocks 0-5\)"):
        params_from_dict(six_blocks)
    assert params_from_dict({**six_blocks, "weakclip": {**base["weakclip"], "taps": [1, 2, 4, 5]}})
    short_text = {**base, "clip": {"source": "pretrain", "arch": {"vision_layers": 12, "context_length": 12}}}
    with pytest.raises(ConfigError, match=r"^weakclip\.text_context_length: 13 tokens exceed clip\.arch\."
                                          r"context_length 12"):
        params_from_dict(short_text)
    from_file = {"clip": {"source": "file", "weights": "imports/ViT-B-16.pt", "arch": {"vision_layers": 6}},
                 "weakclip": base["weakclip"]}
    assert params_from_dict(from_file).clip.source == "file"


def test_a_key_left_out_of_the_params_file_is_named_with_the_value_used(tmp_path: Path, capsys) -> None:
    """A key deleted from params.yaml took the schema's default without a word (cam.arch.depth: the file's 3
    became 6); now one stderr line names it and the value used. The committed params.yaml sets every key."""
    load_params(REPO / "params.yaml")
    assert capsys.readouterr().err == ""

    lines = (REPO / "params.yaml").read_text(encoding="utf-8").splitlines(keepends=True)
    depth_lines = [i for i, line in enumerate(lines) if line.strip().startswith("depth: 3")]
    assert len(depth_lines) == 1, "params.yaml's cam.arch.depth line moved"
    del lines[depth_lines[0]]
    path = tmp_path / "params.yaml"
    path.write_text("".join(lines), encoding="utf-8")
    assert load_params(path).cam.arch.depth == 6
    note = capsys.readouterr().err.strip().splitlines()
    assert note == [f"note: {path} does not set 1 key(s), so the built-in default is used: cam.arch.depth = 6. "
                    f"Write the key into {path} to choose its value"]

    partial = tmp_path / "partial.yaml"
    partial.write_text("weakclip:\n  prompt_len: 4\n", encoding="utf-8")
    load_params(partial)
    note = capsys.readouterr().err.strip()
    assert "runtime = {...} (the whole section)" in note and "weakclip.prompt_len" not in note
    from dataclasses import fields

    from weakclip_core.config.weakclip import WeakClipConfig
    expected = 6 + len(fields(WeakClipConfig)) - 1  # six whole sections, and weakclip's keys but prompt_len
    assert f"does not set {expected} key(s)" in note and note.endswith(f"and {expected - 6} more. Write the key "
                                                                      f"into {partial} to choose its value")


def test_nproc_without_torchrun_is_named_and_a_torchrun_worker_says_nothing(tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:
    """`runtime.nproc: 2` with `launcher: none` runs one process: said in one line, not silently. A torchrun
    worker (LOCAL_RANK set) repeats none of the notes its launcher printed."""
    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert "  launcher: none" in text and "  nproc: 1" in text
    path.write_text(text.replace("  nproc: 1", "  nproc: 2", 1), encoding="utf-8")
    load_params(path)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"note: {path}: runtime.nproc is 2 but runtime.launcher is none, so every stage runs in one process; set "
        "runtime.launcher: torchrun for DDP"]
    partial = tmp_path / "partial.yaml"
    partial.write_text("runtime:\n  nproc: 2\n", encoding="utf-8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    load_params(partial)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("data", "message"), [
    ({"cam": {"train": {"epochs": 2, "warmup_epochs": 3}}},
     "cam.train.warmup_epochs: 3 is above epochs 2: the lr would never reach lr"),
    ({"weakclip": {"train": {"iterations": 40, "warmup_iterations": 50}}},
     "weakclip.train.warmup_iterations: 50 is above iterations 40: the lr would never reach lr"),
    # 100 images // 64 = 1 step an epoch, 3 epochs: 3 steps
    ({"clip": {"pretrain": {"web_images": 100, "batch_size": 64, "epochs": 3, "warmup_steps": 4}}},
     "clip.pretrain.warmup_steps: 4 is more than the 3 steps of training"),
    ({"clip": {"pretrain": {"web_images": 32, "batch_size": 64}}},
     "clip.pretrain.web_images: 32 images an epoch is less than one batch_size (64)"),
])
def test_a_warm_up_longer_than_training_is_refused(data, message) -> None:
    """The lr would never reach its base value (linear warm-up over more steps than the run has)."""
    with pytest.raises(ConfigError) as refused:
        params_from_dict(data)
    assert str(refused.value).startswith(message)


def test_a_warm_up_as_long_as_training_and_a_train_split_corpus_are_accepted() -> None:
    """Equal lengths end the warm-up at the last step (the tiny test chains run 2 iterations with 2 warm-up); on
    the train split the step count is the split's, unknown here."""
    params_from_dict({"weakclip": {"train": {"iterations": 2, "warmup_iterations": 2}},
                      "cam": {"train": {"epochs": 1, "warmup_epochs": 1}},
                      "clip": {"pretrain": {"web_images": 64, "batch_size": 64, "epochs": 1, "warmup_steps": 1}}})
    params_from_dict({"clip": {"pretrain": {"corpus": "train_split", "web_images": 2, "batch_size": 64,
                                            "warmup_steps": 500}}})


def test_the_deeplabv3plus_encoder_list_is_smps() -> None:
    """The list a params load checks `seg.encoder` against is what the pinned smp's DeepLabV3+ builds: each smp
    encoder it leaves out is refused by smp itself for having no dilated mode, and it names no other."""
    import segmentation_models_pytorch as smp
    import torch
    from segmentation_models_pytorch.encoders import encoders

    from weakclip_core.config.seg import DEEPLABV3PLUS_ENCODERS

    assert DEEPLABV3PLUS_ENCODERS <= set(encoders)
    left_out = sorted(set(encoders) - DEEPLABV3PLUS_ENCODERS)
    assert left_out, "smp lists no encoder without a dilated mode any more"
    for name in left_out:
        with pytest.raises(ValueError, match="dilated mode"), torch.device("meta"):
            smp.DeepLabV3Plus(encoder_name=name, encoder_weights=None, classes=3)
    for name in ("resnet18", "efficientnet-b0", "mobileone_s0"):  # a few of the kept ones do build
        with torch.device("meta"):
            smp.DeepLabV3Plus(encoder_name=name, encoder_weights=None, classes=3)


@pytest.mark.parametrize(("encoder", "message"), [
    ("resnet181", "seg.encoder: 'resnet181' is not an encoder of segmentation-models-pytorch's DeepLabV3+; did you "
                  "mean resnet18"),
    ("ResNet50", "did you mean resnet50"),
    ("vgg16", "seg.encoder: 'vgg16' is not an encoder of segmentation-models-pytorch's DeepLabV3+; e.g. resnet18"),
])
def test_a_misspelt_deeplabv3plus_encoder_is_refused_at_load(encoder: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        params_from_dict({"seg": {"model": "deeplabv3plus", "encoder": encoder}})
    assert message in str(refused.value) and str(refused.value).startswith("seg.encoder: ")
    params_from_dict({"seg": {"model": "deeplabv3plus", "encoder": "tu-convnext_tiny"}})  # timm's: left to smp


def test_whole_image_evaluation_with_an_smp_model_is_refused_at_load() -> None:
    """smp's DeepLabV3+ and SegFormer take only sides that are multiples of 16 / 32, so whole views of real images
    (500 x 375 on VOC) used to fail in seg_eval, after both segmenters had trained. DeepLabV2 takes any size."""
    for model, encoder in (("deeplabv3plus", "resnet18"), ("segformer", "mit_b0")):
        with pytest.raises(ConfigError) as refused:
            params_from_dict({"seg": {"model": model, "encoder": encoder, "eval": {"whole_image": True}}})
        assert str(refused.value).startswith(f"seg.eval.whole_image: true runs each view through the network whole, "
                                             f"which {model} takes only at sides that are multiples of 16 or 32")
    params_from_dict({"seg": {"model": "deeplabv2", "encoder": "resnet101", "eval": {"whole_image": True}}})
    # the smp model itself: a 375-px side is refused by smp (what the load-time check saves a run from)
    import segmentation_models_pytorch as smp
    import torch

    with pytest.raises(RuntimeError):
        smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=3).eval()(torch.zeros(1, 3, 375, 500))
