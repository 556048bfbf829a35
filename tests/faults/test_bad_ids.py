"""Issue #22, finding 3: an image id that is not a plain file name never reaches a path.

An id ``../../x_rel`` in a split list and ``labels.json`` made ``pseudo_masks`` read ``./x_rel.jpg`` and write
``x_rel.png`` outside its output folder (plus a file in its work folder and a folder under ``reports/``), and
exit 0; a long ``../..`` id read and wrote under an absolute path outside the project. Ids are now checked
where they are read (``weakclip_core.data.layout.check_image_id``: one path component, no separator, not
``..``): the split lists and ``labels.json`` of a prepared folder, and the VOC split lists and COCO
``file_name`` entries ``prepare`` reads. Each case runs the stage as its command line does
(``run_stage_cli``) and asserts the one line naming the file and the id, exit status 1, and that no file
anywhere under the test's folder (the project and the folders around it) is changed or removed, and none
is added outside the project's ``checkpoints/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import prepare, pseudo_masks, weakclip_train
from pipeline._stage import run_stage_cli
from test_bad_inputs import PARAMS, build_project
from tiny_chain import params_text
from test_real_datasets import _coco_tree, _voc_tree

NOT_PLAIN = "is not a plain file name (one path component: no '/', '\\', '..')"


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data (``data/``), its CAM store, a random tiny CLIP artifact and a trained tiny WeakCLIP: what
    ``pseudo_masks`` starts from. Its masks go to ``pseudo_masks/`` (the default ``data/pseudo_masks`` lies inside
    this project's prepared folder ``data``, an input the stage refuses to write into)."""
    params = {**PARAMS, "pseudo": {**PARAMS["pseudo"], "output_dir": "pseudo_masks"}}
    return build_project(tmp_path_factory.mktemp("bad_ids"), params, [(weakclip_train.main, ())])


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``, by relative path; a stage's lock file
    (``checkpoints/.locks/``) aside."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*")) if ".locks" not in path.relative_to(folder).parts}


def one_line_failure(watched: Path, capsys: pytest.CaptureFixture[str], stage_main, stage: str,
                     *arguments: str) -> str:
    """Run the stage as its command line does: exit 1; nothing under ``watched`` changed or removed, and
    nothing added but a stage's work folder under ``project/checkpoints/`` (``pseudo_masks`` makes it before
    it reads the split list). Returns the one line on stderr."""
    before = tree(watched)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_stage_cli(lambda: stage_main(["--params", "params.yaml", *arguments]), stage)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    after = tree(watched)
    assert {path: after.get(path) for path in before} == before  # nothing already written is lost
    assert [path for path in after if path not in before and not path.startswith("project/checkpoints/")] == []
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def add_id(project: Path, image_id: str, *, in_split: bool = True, in_labels: bool = True) -> None:
    """List ``image_id`` in the train split and/or give it labels, and put a readable JPEG where
    ``data/JPEGImages/<id>.jpg`` resolves to, so a reader that does not check ids would go ahead."""
    if in_split:
        split = project / "data/ImageSets/Segmentation/train.txt"
        split.write_text(split.read_text() + f"{image_id}\n")
    if in_labels:
        labels_path = project / "data/labels.json"
        labels = json.loads(labels_path.read_text())
        labels["labels"][image_id] = [1]
        labels_path.write_text(json.dumps(labels))
    target = Path(str(project / "data/JPEGImages" / image_id) + ".jpg")
    target.resolve().parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(project / "data/JPEGImages/train_000.jpg", target)


def absolute_escape_id(project: Path, outside: Path) -> str:
    """A long ``../..`` id that climbs from ``data/JPEGImages`` to the file system root and down to ``outside``."""
    climb = "../" * (len((project / "data/JPEGImages").resolve().parts) + 2)
    return climb + str((outside / "x_abs").resolve()).lstrip("/")


@pytest.mark.parametrize("where", ["split_and_labels", "split_only", "labels_only", "absolute"])
def test_pseudo_masks_refuses_an_id_that_leaves_its_folder(finished_project: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], where: str) -> None:
    project = tmp_path / "project"
    shutil.copytree(finished_project, project)
    monkeypatch.chdir(project)
    if where == "absolute":
        outside = tmp_path / "outside"
        image_id = absolute_escape_id(project, outside)
    else:
        image_id = "../../x_rel"
    add_id(project, image_id, in_split=where != "labels_only", in_labels=where != "split_only")
    named = Path("data/ImageSets/Segmentation/train.txt") if where == "split_only" else Path("data/labels.json")

    line = one_line_failure(tmp_path, capsys, pseudo_masks.main, "pseudo_masks")
    assert line == f"pseudo_masks: error: {named}: image id {image_id!r} {NOT_PLAIN}"


def prepared_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: dict) -> Path:
    """A project whose ``prepare`` already ran once on ``dataset`` (its prepared folder and preview exist)."""
    project = tmp_path / "project"
    project.mkdir()
    params = {"runtime": PARAMS["runtime"], "dataset": {"prepared_dir": "data/prepared", **dataset}}
    (project / "params.yaml").write_text(params_text(params))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as exit_info:
        run_stage_cli(lambda: prepare.main(["--params", "params.yaml", "--no-progress"]), "prepare")
    assert exit_info.value.code == 0
    assert (project / "data/prepared/labels.json").is_file()
    return project


def test_prepare_refuses_a_voc_split_list_id_that_is_not_a_file_name(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = _voc_tree(tmp_path / "VOC2012")
    prepared_project(tmp_path, monkeypatch, {"name": "voc", "source": str(source)})
    split = source / "ImageSets/Segmentation/train.txt"
    split.write_text(split.read_text() + "..\n")  # the stem of a line is the id: '..' names the folder above
    line = one_line_failure(tmp_path, capsys, prepare.main, "prepare", "--no-progress")
    assert line == f"prepare: error: {split}: image id '..' {NOT_PLAIN}"


def test_prepare_refuses_a_coco_file_name_that_leaves_the_image_folder(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    source, _ = _coco_tree(tmp_path / "coco")
    prepared_project(tmp_path, monkeypatch, {"name": "coco", "source": str(source)})
    annotations_path = source / "annotations/instances_train2014.json"
    document = json.loads(annotations_path.read_text())
    escaping = "../../x_coco.jpg"  # from coco/train2014/ to the folder holding coco/
    shutil.copyfile(source / "train2014" / document["images"][1]["file_name"], tmp_path / "x_coco.jpg")
    document["images"][1]["file_name"] = escaping
    annotations_path.write_text(json.dumps(document))
    line = one_line_failure(tmp_path, capsys, prepare.main, "prepare", "--no-progress")
    assert line == f"prepare: error: {annotations_path}: image id {escaping!r} {NOT_PLAIN}"
