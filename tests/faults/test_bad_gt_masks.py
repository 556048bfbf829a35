"""Broken GT masks met by every stage that reads GT, and a killed writer's leftovers beside pseudo_masks' outputs.

Every stage that scores against GT (``cam_infer``, ``pseudo_masks``, ``seg_eval``) or trains on it
(``seg_train --source gt``) reads masks through ``weakclip_core.data.layout.read_checked_mask``. Each test
breaks one mask of a finished tiny project (a mask of the wrong size, or class id K+3), runs the stage's
``main`` the way its command line does (``run_stage_cli``), and checks the one line the user sees, exit
status 1, and that nothing appeared or changed outside ``checkpoints/`` (a stage's resumable work folder).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline import cam_infer, cam_train, pseudo_masks, seg_eval, seg_train, weakclip_train
from test_bad_inputs import PARAMS, SIZE, build_project, private_copy, run_and_kill_mid_write
from tiny_chain import is_temporary
from tiny_voc import CLASS_NAMES
from weakclip_core.data.layout import read_mask, write_mask
from pipeline._stage import run_stage_cli

K = len(CLASS_NAMES)  # 4: background + 3


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data, CAM store, CLIP artifact, trained MCTformer, WeakCLIP and GT-trained segmenter."""
    params = {**PARAMS, "seg": {**PARAMS["seg"], "train": {**PARAMS["seg"]["train"], "epochs": 1}}}
    project = build_project(tmp_path_factory.mktemp("trained"), params, [
        (cam_train.main, ()), (weakclip_train.main, ()), (seg_train.main, ("--source", "gt"))])
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    return project


@pytest.fixture
def project(trained_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return private_copy(trained_project, tmp_path, monkeypatch)


def every_file(project: Path) -> dict[str, bytes]:
    """Every file outside ``checkpoints/`` (work folders a re-run resumes from), by relative path."""
    return {str(path.relative_to(project)): path.read_bytes() for path in sorted(project.rglob("*"))
            if path.is_file() and "checkpoints" not in path.relative_to(project).parts}


def one_line_failure(project: Path, capsys: pytest.CaptureFixture[str], stage: str,
                     stage_main: Callable[[list[str]], None], *arguments: str) -> str:
    """Run ``stage_main`` as its command line does; it must exit 1 with one line on stderr besides its
    progress bars, and every file outside ``checkpoints/`` must be as before (nothing new under a final
    name, no temporary)."""
    before = every_file(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_stage_cli(lambda: stage_main(["--params", "params.yaml", *arguments]), stage)
    assert exit_info.value.code == 1
    assert every_file(project) == before
    assert [path for path in project.rglob("*") if is_temporary(path)] == []
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]  # minus progress bars
    assert len(lines) == 1, lines
    return lines[0]


def _wrong_size(path: Path) -> str:
    write_mask(path, np.zeros((20, 24), np.uint8))
    return f"{path.relative_to(Path.cwd())}: mask is 24x20 but its image is {SIZE}x{SIZE} (width x height)"


def _class_id_out_of_range(path: Path) -> str:
    mask = read_mask(path)
    mask[3, 5] = K + 3
    write_mask(path, mask)
    return f"{path.relative_to(Path.cwd())}: class id {K + 3} out of range (expected 0..{K - 1} or 255 ignore)"


STAGES = {  # stage -> (main, arguments, the image whose GT it meets)
    "cam_infer": (cam_infer.main, (), "train_002"),
    "pseudo_masks": (pseudo_masks.main, (), "train_002"),
    "seg_train": (seg_train.main, ("--source", "gt"), "train_005"),
    "seg_eval": (seg_eval.main, ("--source", "gt"), "val_001"),
}


@pytest.mark.slow
@pytest.mark.parametrize("breakage", [_wrong_size, _class_id_out_of_range], ids=["wrong_size", "class_id_K+3"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_broken_gt_mask_is_one_line_naming_the_file(project: Path, capsys: pytest.CaptureFixture[str], stage: str,
                                                    breakage: Callable[[Path], str]) -> None:
    if stage == "pseudo_masks":  # pseudo_masks reads the upstream GT-use flags first
        assert (project / "metrics/weakclip.json").is_file()
    stage_main, arguments, image_id = STAGES[stage]
    message = breakage(project / "data/SegmentationClass" / f"{image_id}.png")
    assert one_line_failure(project, capsys, stage, stage_main, *arguments) == f"{stage}: error: {message}"


@pytest.mark.slow
def test_pseudo_masks_removes_a_killed_writers_leftovers_and_nothing_else(project: Path) -> None:
    """A writer SIGKILLed inside ``atomic_dir`` / ``atomic_path`` left its temporaries beside the final
    names; the next run deletes exactly those (a live process's temporary and unrelated files stay)."""
    run_and_kill_mid_write(project, (
        "from weakclip_core.artifacts.atomic import atomic_dir, atomic_path\n"
        "with atomic_path('metrics/pseudo.json') as t:\n"
        "    t.write_text('{}')\n"
        "    with atomic_dir('pseudo_masks') as d:\n"
        "        (d / 'train_000.png').write_bytes(b'half')\n"
        "        kill_myself()\n"))
    leftovers = sorted(p.name for p in [*project.iterdir(), *project.joinpath("metrics").iterdir()]
                       if is_temporary(p))
    assert len(leftovers) == 2
    assert leftovers[0].startswith(".pseudo.json.") and leftovers[1].startswith(".pseudo_masks.")
    live = project / f".pseudo_masks.{os.getpid()}.abcdefgh.tmp"  # this process is alive
    live.mkdir()
    unrelated = [project / ".pseudo_masks.notes", project / "metrics" / "pseudo.json.tmp"]
    for path in unrelated:
        path.write_text("keep me\n")

    pseudo_masks.main(["--params", "params.yaml"])
    assert sorted(p.name for p in [*project.iterdir(), *project.joinpath("metrics").iterdir()]
                  if is_temporary(p)) == [live.name]
    assert all(path.read_text() == "keep me\n" for path in unrelated)
    assert sorted(p.name for p in (project / "pseudo_masks").iterdir()) == sorted(
        [f"train_{index:03d}.png" for index in range(8)] + ["provenance.json"])
