"""Planted code in a model file or checkpoint never runs (issue #22, finding 2).

Model files and checkpoints come back from shared DVC remotes. A pickle payload added to one (here an
object whose ``__reduce__`` would create a *marker file* when unpickled) must be refused when the stage
loads the file: one line naming the file, exit status 1, the marker absent, and nothing already written
lost. Each loader is met through the stage that reads it: ``cam_infer`` (``load_trained_mctformer``),
``pseudo_masks`` (``load_weakclip_model``), ``seg_eval`` (``load_segmenter``), ``cam_train`` resuming
(``Checkpointer.load``, including a checkpoint made for another config), and ``weakclip_train`` reading a
poisoned CLIP artifact (``load_clip_artifact``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline import cam_infer, cam_train, pseudo_masks, seg_eval, weakclip_train
from pipeline._stage import run_stage_cli
from test_bad_inputs import PARAMS, assert_nothing_lost, build_project, private_copy, snapshot
from weakclip_core.artifacts.atomic import write_json
from weakclip_core.artifacts.model_file import save_final_model
from weakclip_core.artifacts.weakclip import save_weakclip_model
from weakclip_core.config import WeakClipConfig, build_dataclass, load_params
from weakclip_core.config.seg import SegConfig
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.models.clip import load_clip_artifact
from weakclip_core.models.segmenter import build_segmenter, segmenter_record
from weakclip_core.models.weakclip.model import WeakCLIP

MARKER_NAME = "PLANTED_CODE_RAN"


class Payload:
    """Unpickled, it runs code: it creates the file ``marker`` (what an attacker's payload would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 — pickle protocol
        return (exec, (f"open({self.marker!r}, 'w').write('planted code ran')",))


def plant(path: Path, marker: Path, replace_config: dict | None = None) -> None:
    """Add the payload to the dict saved in ``path`` (optionally with another ``config``); it stays a file
    that an unrestricted ``torch.load`` (weights_only off) reads as before, running the payload."""
    saved = torch.load(path, map_location="cpu", weights_only=True)  # the writers' files are plain data
    saved["note"] = Payload(marker)
    if replace_config is not None:
        saved["config"] = replace_config
    with open(path, "wb") as stream:
        torch.save(saved, stream)


def build_model_project(folder: Path) -> Path:
    """Tiny data, CAM store, CLIP artifact, a trained MCTformer (cam_train + cam_infer run), plus an
    untrained WeakCLIP file (with its ``metrics/weakclip.json``) and an untrained segmenter file, written by the
    stages' own writers: every model file a stage loads."""
    project = build_project(folder, PARAMS, [(cam_train.main, ()), (cam_infer.main, ())])
    previous = Path.cwd()
    os.chdir(project)
    try:
        params = load_params("params.yaml")
        dataset = PreparedDataset.open(params.dataset.prepared_dir)
        torch.manual_seed(0)
        cfg = build_dataclass(WeakClipConfig, PARAMS["weakclip"], "weakclip")
        model = WeakCLIP(load_clip_artifact("artifacts/clip"), dataset.class_names, cfg.arch())
        save_weakclip_model("artifacts/weakclip/model.pt", model, cfg, "artifacts/clip")
        write_json(Path("metrics/weakclip.json"), {"thresholds_chosen_with_gt": False, "seed_mode": "confident",
                                                   "cam_variant": "fused"})  # what pseudo_masks reads besides
        seg_cfg = build_dataclass(SegConfig, PARAMS["seg"], "seg")
        save_final_model("artifacts/seg/gt/model.pt", build_segmenter(seg_cfg, dataset.n_classes, encoder_weights=False),
                         config=segmenter_record(seg_cfg, dataset.class_names), source="gt")
    finally:
        os.chdir(previous)
    return project


@pytest.fixture
def project(model_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the session's ``model_project`` (tests/faults/conftest.py), made the working folder."""
    return private_copy(model_project, tmp_path, monkeypatch)


def refused_in_one_line(project: Path, stage_main, stage: str, planted: Path, capsys: pytest.CaptureFixture,
                        *arguments: str) -> str:
    """Run the stage as its command line does; the payload must not have run, the stage must stop with one
    line naming ``planted`` and exit 1, and every output already written keeps its bytes."""
    marker = project / MARKER_NAME
    before = snapshot(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_stage_cli(lambda: stage_main(["--params", "params.yaml", *arguments]), stage)
    assert not marker.exists(), f"{stage} ran the code planted in {planted}"
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]  # minus progress bars
    assert exited.value.code == 1 and len(lines) == 1, stderr
    err = lines[0]
    assert err.startswith(f"{stage}: error: {planted}: refused to load this "), err
    assert "may have been tampered with or made by another version" in err, err
    assert_nothing_lost(project, before)
    return err


def test_planted_mctformer_model_is_refused_by_cam_infer(project: Path, capsys: pytest.CaptureFixture) -> None:
    planted = Path("artifacts/mctformer/model.pt")
    plant(project / planted, project / MARKER_NAME)
    err = refused_in_one_line(project, cam_infer.main, "cam_infer", planted, capsys)
    assert "trained MCTformer" in err and "exec" in err


def test_planted_weakclip_model_is_refused_by_pseudo_masks(project: Path, capsys: pytest.CaptureFixture) -> None:
    planted = Path("artifacts/weakclip/model.pt")
    plant(project / planted, project / MARKER_NAME)
    refused_in_one_line(project, pseudo_masks.main, "pseudo_masks", planted, capsys)


def test_planted_segmenter_is_refused_by_seg_eval(project: Path, capsys: pytest.CaptureFixture) -> None:
    planted = Path("artifacts/seg/gt/model.pt")
    plant(project / planted, project / MARKER_NAME)
    refused_in_one_line(project, seg_eval.main, "seg_eval", planted, capsys, "--source", "gt")


@pytest.mark.parametrize("other_config", [False, True], ids=["same_config", "other_config"])
def test_planted_checkpoint_is_refused_before_resuming(project: Path, capsys: pytest.CaptureFixture,
                                                       other_config: bool) -> None:
    """A resume checkpoint with a payload, for this config or for another one (the payload used to run
    before the config comparison): refused, and the checkpoint is left for the user to inspect."""
    cam_train.train_cam_model(load_params("params.yaml"), stop_after_steps=1, show_progress=False)
    (checkpoint,) = Path("checkpoints/cam_train").glob("*/last.pt")
    torch.load(checkpoint, map_location="cpu", weights_only=True)  # what the trainer writes is plain data
    plant(checkpoint, project / MARKER_NAME, replace_config={"made_by": "another config"} if other_config else None)
    planted_bytes = checkpoint.read_bytes()
    err = refused_in_one_line(project, cam_train.main, "cam_train", checkpoint, capsys)
    assert "training checkpoint" in err
    assert checkpoint.read_bytes() == planted_bytes


def test_a_checkpoint_other_code_wrote_stops_the_stage_in_one_line(project: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed, ``pipeline/cam_train.py`` edited, the stage re-run (as ``dvc repro`` does after an edit):
    it used to resume the old code's weights silently. Now one line names the checkpoint and the edited file,
    nothing is written or deleted, and ``WEAKCLIP_RESUME_OTHER_CODE=1`` resumes the run to its end."""
    monkeypatch.delenv("WEAKCLIP_RESUME_OTHER_CODE", raising=False)
    cam_train.train_cam_model(load_params("params.yaml"), stop_after_steps=1, show_progress=False)
    (checkpoint,) = Path("checkpoints/cam_train").glob("*/last.pt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["code"]["pipeline/cam_train.py"] = "0" * 64  # the file's bytes when the run was killed
    with open(checkpoint, "wb") as stream:
        torch.save(saved, stream)
    checkpoint_bytes = checkpoint.read_bytes()
    model = Path("artifacts/mctformer/model.pt")
    model_bytes = model.read_bytes()
    before = snapshot(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_stage_cli(lambda: cam_train.main(["--params", "params.yaml"]), "cam_train")
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert exited.value.code == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"cam_train: error: {checkpoint}: a checkpoint of this config at step 1 was written "
                               "by other code (differing files: pipeline/cam_train.py); delete checkpoints/cam_train "
                               "to start over"), lines[0]
    assert checkpoint.read_bytes() == checkpoint_bytes and model.read_bytes() == model_bytes
    assert_nothing_lost(project, before)

    monkeypatch.setenv("WEAKCLIP_RESUME_OTHER_CODE", "1")
    result = cam_train.train_cam_model(load_params("params.yaml"), show_progress=False)
    assert result is not None and result.steps > 1
    assert "resuming it anyway" in capsys.readouterr().err
    assert not checkpoint.exists()  # finished: the checkpoints are cleared as after any run


def test_poisoned_clip_weights_are_one_line_in_weakclip_train(project: Path, capsys: pytest.CaptureFixture) -> None:
    """``artifacts/clip/weights.pt`` was already read with weights_only=True (the payload never ran), but the
    refusal was a raw ``UnpicklingError`` traceback; now it is one line naming the file."""
    planted = Path("artifacts/clip/weights.pt")
    plant(project / planted, project / MARKER_NAME)
    refused_in_one_line(project, weakclip_train.main, "weakclip_train", planted, capsys)


def test_unplanted_final_model_files_load_with_weights_only(model_project: Path) -> None:
    """The files the stages write are plain data: the safe loader reads them as they are."""
    for relative in ("artifacts/mctformer/model.pt", "artifacts/weakclip/model.pt", "artifacts/seg/gt/model.pt",
                     "artifacts/clip/weights.pt"):
        saved = torch.load(model_project / relative, map_location="cpu", weights_only=True)
        assert isinstance(saved, dict) and saved
