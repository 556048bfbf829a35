"""Issue #22 findings 1, 4 and 7: output folders that an atomic replacement would empty, a symlinked output
folder, and a killed writer's temporary that a direct re-run left behind.

Every stage runs as a real process in a copy of a tiny project (``tiny_chain``) whose upstream stages ran
once. Each test asserts what the user sees (one line, exit 1, or a clean run) and that nothing already written
is lost: every file of the project keeps its bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_chain import KILLED_RETURNCODE, is_temporary, run_chain, run_stage, stage_env, write_project

UPSTREAM = ("prepare", "clip", "cam_train", "cam_infer", "weakclip_train")
N_TRAIN = 12


@pytest.fixture(scope="module")
def upstream_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project with prepare → clip → cam_train → cam_infer → weakclip_train run once."""
    project = write_project(tmp_path_factory.mktemp("output_folders"))
    run_chain(project, UPSTREAM)
    return project


@pytest.fixture
def project(upstream_project: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(upstream_project, tmp_path / "project", symlinks=True))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes, except run records (wall times, locks)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.is_symlink()
            and not str(path.relative_to(folder)).startswith(("timings/", "checkpoints/.locks/"))}


def one_line_failure(project: Path, stage: str) -> str:
    """Run ``stage``; it must fail with exit 1 and exactly one line on stderr, which is returned."""
    completed = run_stage(project, stage, check=False)
    assert completed.returncode == 1, f"{stage} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    return lines[0]


REFUSAL = "the stage replaces this folder whole when it finishes, which would delete it"


# ------------------------------------------------------------------------- finding 1: folders holding more


@pytest.mark.parametrize("output_dir", ["data", ".", "<absolute project path>"])
def test_pseudo_mask_folder_holding_the_dataset_or_the_project_is_refused(project: Path, output_dir: str) -> None:
    """``pseudo.output_dir: data`` (above the GT folder) deleted ``data/prepared/``; the project root as the
    output folder (88 files became 13) emptied the project."""
    if output_dir.startswith("<"):
        output_dir = str(project.resolve())
    write_project(project, overrides={"pseudo": {"output_dir": output_dir}})
    before = snapshot(project)
    expected = ("data contains data/prepared/tiny (dataset.prepared_dir)" if output_dir == "data"
                else f"{output_dir} is {project.resolve()} (the project folder)")
    assert one_line_failure(project, "pseudo_masks") == (
        f"pseudo_masks: error: pseudo.output_dir: {expected}, which this stage reads; {REFUSAL}: "
        "choose a folder of its own")
    assert snapshot(project) == before
    assert not (project / "checkpoints" / "pseudo_masks").exists()  # refused before any work


@pytest.mark.parametrize("output_dir, expected", [
    ("imports/my_masks", "imports/my_masks is imports/my_masks (weakclip.seeds.mask_folder), which this stage "
                         f"reads; {REFUSAL}: choose a folder of its own"),
    ("data/prepared/tiny/extra", "data/prepared/tiny/extra is inside data/prepared/tiny (dataset.prepared_dir), "
                                 "which this stage reads; the stage replaces this folder whole when it finishes, "
                                 "which would delete what is there, and would change its own input: choose a "
                                 "folder outside it")])
def test_pseudo_mask_folder_that_is_or_lies_inside_an_input_is_refused(project: Path, output_dir: str,
                                                                       expected: str) -> None:
    """A folder of the user's PNGs (imported pseudo masks, a dataset's own images or instance masks) holds only
    files the mask folder may hold, so "nothing foreign" let ``pseudo_masks`` replace it with its masks: the
    imported masks, or the images inside ``dataset.source``, were gone without a word."""
    for folder in ("imports/my_masks", "data/prepared/tiny/extra"):
        (project / folder).mkdir(parents=True)
        (project / folder / "user_0001.png").write_bytes(b"the user's own PNG")
    write_project(project, overrides={"pseudo": {"output_dir": output_dir},
                                      "weakclip": {"seeds": {"mask_folder": "imports/my_masks"}}})
    before = snapshot(project)
    assert one_line_failure(project, "pseudo_masks") == f"pseudo_masks: error: pseudo.output_dir: {expected}"
    assert snapshot(project) == before


@pytest.mark.parametrize(("stage", "model", "message"), [
    ("cam_infer", "artifacts/mctformer/model.pt", "trained for classes {trained}, the dataset data/prepared/tiny has {now} "
     "(re-run cam_train)"),
    ("pseudo_masks", "artifacts/weakclip/model.pt", "trained for the classes {trained}, the dataset has {now} "
     "(re-run weakclip_train)")])
def test_a_model_trained_for_other_classes_is_refused_naming_it(project: Path, stage: str, model: str,
                                                                 message: str) -> None:
    """``prepare`` re-run on another dataset after training: both stages stopped in a traceback (a bare
    ``ValueError``, which the stage runner does not turn into one line); now one line naming the model."""
    import json

    labels_path = project / "data" / "prepared" / "tiny" / "labels.json"
    labels = json.loads(labels_path.read_text())
    trained = list(labels["class_names"])
    labels["class_names"] = [*trained[:-1], "zebra"]
    labels_path.write_text(json.dumps(labels))
    assert one_line_failure(project, stage) == (
        f"{stage}: error: {model}: " + message.format(trained=trained, now=labels["class_names"]))


def test_prepared_folder_holding_other_files_is_refused(project: Path) -> None:
    """``dataset.prepared_dir: data`` would replace ``data/`` with a new dataset, deleting ``data/prepared/``."""
    write_project(project, overrides={"dataset": {"prepared_dir": "data"}})
    before = snapshot(project)
    assert one_line_failure(project, "prepare") == (
        f"prepare: error: dataset.prepared_dir: data holds prepared/, which this stage does not write; {REFUSAL}: "
        "move it away or choose an empty folder")
    assert snapshot(project) == before
    assert sorted(path.name for path in (project / "data").iterdir()) == ["prepared"]  # no temporary left


@pytest.mark.parametrize(("stage", "foreign"), [("clip", "artifacts/clip/vit_b16.pt"),
                                                ("pseudo_masks", "reports/pseudo/notes.txt")])
def test_fixed_output_folder_holding_a_foreign_file_is_refused(project: Path, stage: str, foreign: str) -> None:
    """A file the stage does not write, in a folder it replaces whole, is never deleted: the stage stops."""
    (project / foreign).parent.mkdir(parents=True, exist_ok=True)
    (project / foreign).write_bytes(b"the user's file\n")
    before = snapshot(project)
    folder, name = foreign.rsplit("/", 1)
    assert one_line_failure(project, stage) == (
        f"{stage}: error: {folder} holds {name}, which this stage does not write; {REFUSAL}: "
        "move it away or choose an empty folder")
    assert snapshot(project) == before


# ------------------------------------------------------------------------- finding 4: a symlinked folder


def test_symlinked_pseudo_mask_folder_is_written_through_the_link(project: Path, tmp_path: Path) -> None:
    """``data/pseudo_masks`` links to a folder elsewhere: every run replaces the link's target atomically and
    keeps the link (the old code replaced the link, left the target stale and ``.pseudo_masks.old`` behind,
    and every later run failed with ``[Errno 20] Not a directory``)."""
    shared = tmp_path / "shared"
    target = shared / "masks"
    target.mkdir(parents=True)
    train_ids = (project / "data/prepared/tiny/ImageSets/Segmentation/train.txt").read_text().split()
    assert len(train_ids) == N_TRAIN
    (target / f"{train_ids[0]}.png").write_bytes(b"an earlier run's mask")
    (shared / "notes.txt").write_text("beside the target: kept\n")
    link = project / "data" / "pseudo_masks"
    link.symlink_to(target, target_is_directory=True)
    inputs = snapshot(project / "data" / "prepared")
    expected = sorted([f"{image_id}.png" for image_id in train_ids] + ["provenance.json"])
    runs = []
    for _ in range(2):
        run_stage(project, "pseudo_masks")
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert sorted(path.name for path in target.iterdir()) == expected
        assert sorted(path.name for path in (project / "data").iterdir()) == ["prepared", "pseudo_masks"]
        assert sorted(path.name for path in shared.iterdir()) == ["masks", "notes.txt"]
        runs.append(snapshot(target))
    assert runs[0] == runs[1] and runs[0][f"{train_ids[0]}.png"] != b"an earlier run's mask"
    assert (shared / "notes.txt").read_text() == "beside the target: kept\n"
    assert snapshot(project / "data" / "prepared") == inputs


# ------------------------------------------------------------------------- finding 7: a killed writer's temporary

KILL_IN_FINAL_MODEL_WRITE = """
import os, runpy, signal, sys
real_replace = os.replace
def replace(source, destination, *args, **kwargs):
    if os.path.basename(os.fspath(destination)) == "model.pt":  # the temporary is complete: kill the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, destination, *args, **kwargs)
os.replace = replace
sys.argv = ["pipeline.cam_train", "--params", "params.yaml"]
runpy.run_module("pipeline.cam_train", run_name="__main__", alter_sys=True)
"""


def test_cam_train_rerun_removes_the_temporary_a_kill_in_the_final_model_write_left(project: Path) -> None:
    """A SIGKILL inside the final ``model.pt`` write leaves a full-size ``.model.pt.<pid>.<random>.tmp``; a
    direct re-run of cam_train removes it (its writer is gone), keeps a live writer's temporary and every other
    file, and writes the same model the uninterrupted run wrote."""
    model_folder = project / "artifacts" / "mctformer"
    uninterrupted = (model_folder / "model.pt").read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILL_IN_FINAL_MODEL_WRITE], cwd=project, env=stage_env(),
                            capture_output=True, text=True)
    assert killed.returncode == KILLED_RETURNCODE == -signal.SIGKILL, killed.stderr[-3000:]
    stale = [path for path in model_folder.iterdir() if is_temporary(path)]
    assert len(stale) == 1 and stale[0].name.startswith(".model.pt.")
    assert stale[0].stat().st_size > len(uninterrupted) // 2  # the whole model, under a temporary name
    assert (model_folder / "model.pt").read_bytes() == uninterrupted  # the earlier model is still there
    live = model_folder / f".model.pt.{os.getpid()}.abcdefgh.tmp"  # this process is alive
    live.write_bytes(b"a live writer's file")
    unrelated = [model_folder / ".model.pt.notes", model_folder / "model.pt.tmp"]
    for path in unrelated:
        path.write_text("keep me\n")
    before = {name: data for name, data in snapshot(project).items()
              if not name.startswith(("artifacts/mctformer", "checkpoints", "dvclive"))}

    rerun = run_stage(project, "cam_train")
    assert rerun.returncode == 0
    assert sorted(path.name for path in model_folder.iterdir()) == sorted(
        ["model.pt", live.name, *(path.name for path in unrelated)])
    assert live.read_bytes() == b"a live writer's file"
    assert all(path.read_text() == "keep me\n" for path in unrelated)
    assert (model_folder / "model.pt").read_bytes() == uninterrupted
    assert {name: data for name, data in snapshot(project).items() if name in before} == before
