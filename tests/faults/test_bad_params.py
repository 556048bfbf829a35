"""Issue #22, finding 8: params and labels that gave a traceback, or were silently accepted, now stop the
stage with one line naming the params key or the labels file, before any work, and lose nothing.

Params rules that span fields (``cam.arch.image_size`` a multiple of ``patch_size``, ``threshold_start`` <=
``threshold_stop``, ``scale_min`` <= ``scale_max``, ``pseudo.stride`` <= ``crop``, non-empty scale lists) are
checked when params load (``weakclip_core.config``: each section's ``validate``); NaN fails every range check
(``weakclip_core.config.schema.check_range``); ``labels.json`` is checked where it is read
(``weakclip_core.data.layout.read_labels_data``). Each case runs the stage that reads the key as the command
line does (``run_stage_cli``) in a copy of a small finished project (tiny VOC-layout data, its CAM store, a
random tiny CLIP artifact, a trained tiny MCTformer and WeakCLIP with its metrics) and asserts the one line
on stderr, exit status 1, and that every file already in the project keeps its bytes, with no file added
(the batch-size check answers once the training set is built, still before anything is written).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline import cam_infer, cam_train, pseudo_masks, seg_train, weakclip_train
from pipeline._stage import run_stage_cli
from test_bad_inputs import PARAMS, build_project
from tiny_chain import params_text



@pytest.fixture(scope="module")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data (8 train images, classes 0..3), its CAM store, a random tiny CLIP artifact, and the models
    the later stages start from (so each stage gets as far as the bad value takes it)."""
    return build_project(tmp_path_factory.mktemp("bad_params"), PARAMS,
                         [(cam_train.main, ()), (weakclip_train.main, ())])


@pytest.fixture
def project(built_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(built_project, copy)
    monkeypatch.chdir(copy)
    return copy


def project_files(project: Path) -> dict[str, bytes]:
    """Every file under ``project`` by relative path, a stage's lock file (``checkpoints/.locks/``) aside."""
    return {str(path.relative_to(project)): path.read_bytes() for path in sorted(project.rglob("*"))
            if path.is_file() and ".locks" not in path.relative_to(project).parts}


def stage_error_lines(project: Path, capsys: pytest.CaptureFixture[str], stage_main: Callable[[list[str]], object],
                      stage: str, *arguments: str) -> tuple[list[str], str]:
    """Run the stage as its command line does; it must exit 1 having changed and added no file. Returns the
    stderr lines that are not progress bars, and the whole stderr."""
    before = project_files(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_stage_cli(lambda: stage_main(["--params", "params.yaml", *arguments]), stage)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert project_files(project) == before  # nothing already written is lost, nothing half-written is added
    return [line for line in err.strip().splitlines() if line.strip() and "it/s]" not in line
            and "img/s]" not in line and "%|" not in line], err


def set_params(project: Path, update: Callable[[dict], None]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    update(params)
    (project / "params.yaml").write_text(params_text(params))


def set_labels(project: Path, update: Callable[[dict], None]) -> None:
    path = project / "data/labels.json"
    labels = json.loads(path.read_text())
    update(labels)
    path.write_text(json.dumps(labels))


NAN = float("nan")

PARAMS_CASES = [
    # (id, stage main, stage name, arguments, params update, the one line)
    ("image_size_not_a_multiple_of_patch_size", cam_train.main, "cam_train", (),
     lambda p: p["cam"]["arch"].update(image_size=30),
     "cam_train: error: params.yaml: cam.arch.image_size: 30 is not a multiple of patch_size 8"),
    ("cam_lr_nan", cam_train.main, "cam_train", (),
     lambda p: p["cam"]["train"].update(lr=NAN),
     "cam_train: error: params.yaml: cam.train.lr: nan is not a number, must be >= 0.0"),
    ("threshold_start_above_stop", cam_infer.main, "cam_infer", (),
     lambda p: p["cam"]["infer"].update(threshold_start=0.7, threshold_stop=0.3),
     "cam_infer: error: params.yaml: cam.infer.threshold_start: 0.7 is above threshold_stop 0.3"),
    ("pseudo_scales_empty", pseudo_masks.main, "pseudo_masks", (),
     lambda p: p["pseudo"].update(scales=[]),
     "pseudo_masks: error: params.yaml: pseudo.scales: expected at least one item, got an empty list"),
    ("pseudo_stride_above_crop", pseudo_masks.main, "pseudo_masks", (),
     lambda p: p["pseudo"].update(crop=32, stride=48),
     "pseudo_masks: error: params.yaml: pseudo.stride: 48 is larger than crop 32 "
     "(the sliding windows would leave gaps)"),
    ("weakclip_scale_min_above_max", weakclip_train.main, "weakclip_train", (),
     lambda p: p["weakclip"]["train"].update(scale_min=2.5, scale_max=2.0),
     "weakclip_train: error: params.yaml: weakclip.train.scale_min: 2.5 is above scale_max 2.0"),
    ("seg_scale_min_above_max", seg_train.main, "seg_train", ("--source", "gt"),
     lambda p: p["seg"]["train"].update(scale_min=2.5, scale_max=2.0),
     "seg_train: error: params.yaml: seg.train.scale_min: 2.5 is above scale_max 2.0"),
    ("fg_threshold_nan", weakclip_train.main, "weakclip_train", (),
     lambda p: p["weakclip"]["seeds"].update(fg_threshold=NAN),
     "weakclip_train: error: params.yaml: weakclip.seeds.fg_threshold: nan is not a number, "
     "must be >= 0.0 and <= 1.0"),
    ("weakclip_batch_larger_than_dataset", weakclip_train.main, "weakclip_train", (),
     lambda p: p["weakclip"]["train"].update(batch_size=16),  # the train split has 8 images
     "weakclip_train: error: weakclip.train.batch_size: 16 is larger than the 8 training samples "
     "(a step needs one full batch)"),
]


@pytest.mark.parametrize("stage_main, stage, arguments, update, expected",
                         [case[1:] for case in PARAMS_CASES], ids=[case[0] for case in PARAMS_CASES])
def test_bad_params_value_is_one_line_naming_the_key(project: Path, capsys: pytest.CaptureFixture[str], stage_main,
                                                     stage: str, arguments: tuple[str, ...], update,
                                                     expected: str) -> None:
    set_params(project, update)
    lines, err = stage_error_lines(project, capsys, stage_main, stage, *arguments)
    assert "Traceback" not in err
    assert lines == [expected]


LABELS_CASES = [
    ("labels_a_list", lambda labels: labels.update(labels=[[1], [2]]),
     "cam_train: error: data/labels.json: 'labels' must be a mapping of image id to a list of class ids, "
     "got a list"),
    ("class_names_a_string", lambda labels: labels.update(class_names="wxyz"),
     "cam_train: error: data/labels.json: 'class_names' must be a list of at least two class names "
     "(strings, background first), got \"wxyz\""),
    ("class_id_a_float", lambda labels: labels["labels"].update(train_004=[1.9]),
     "cam_train: error: data/labels.json: image train_004 has class id 1.9, not an integer"),
    ("class_id_a_bool", lambda labels: labels["labels"].update(train_004=[True]),
     "cam_train: error: data/labels.json: image train_004 has class id true, not an integer"),
    ("class_ids_not_a_list", lambda labels: labels["labels"].update(train_004=2),
     "cam_train: error: data/labels.json: image train_004 has labels 2, expected a list of class ids"),
]


@pytest.mark.parametrize("update, expected", [case[1:] for case in LABELS_CASES],
                         ids=[case[0] for case in LABELS_CASES])
def test_bad_labels_file_is_one_line_naming_the_file(project: Path, capsys: pytest.CaptureFixture[str], update,
                                                     expected: str) -> None:
    set_labels(project, update)
    lines, err = stage_error_lines(project, capsys, cam_train.main, "cam_train")
    assert "Traceback" not in err
    assert lines == [expected.replace("data/labels.json", str(Path("data/labels.json")))]
