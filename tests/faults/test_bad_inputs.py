"""Bad inputs through the real stage entry points (``main([...])``): one clear error naming the file or key,
and nothing already written is lost (every earlier output keeps its bytes, no temporary file is left).

Each test copies a small finished project (tiny VOC-layout data from ``tests/tiny_voc.py``, its CAM
store, a random tiny CLIP artifact, a trained tiny MCTformer, the CAM metrics), breaks one thing, runs
the stage that meets it first, and checks the message and the untouched outputs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from pipeline import cam_infer, cam_train, clip, pseudo_masks, seg_eval, seg_train, weakclip_train
from tiny_chain import REPO_ROOT, TINY_PARAMS, is_temporary, params_text
from tiny_voc import write_tiny_voc
from weakclip_core.artifacts.cam_store import CamStoreError
from weakclip_core.models.clip import (ClipWeightsError, arch_model_config, build_clip, clip_from_config,
                                      save_clip_artifact)
from weakclip_core.config import ClipConfig, ConfigError, build_dataclass
from weakclip_core.config.clip import ClipArchConfig
from weakclip_core.data.layout import DatasetError, read_mask, write_mask
from weakclip_core.data.segmentation import GroundTruthMaskError
from pipeline._stage import run_stage_cli

SIZE = 32
CLIP_ARCH = {"embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 16, "vision_layers": 4,
             "vision_head_width": 8, "text_width": 16, "text_layers": 1, "text_heads": 2, "context_length": 16}
PARAMS = {
    "runtime": {"device": "cpu", "seed": 0, "threads": 1},
    "dataset": {"name": "synthetic", "prepared_dir": "data"},
    "clip": {"source": "random", "arch": CLIP_ARCH},
    "cam": {"arch": TINY_PARAMS["cam"]["arch"],
            "train": {**TINY_PARAMS["cam"]["train"], "epochs": 1, "checkpoint_every": 1},
            "infer": {"scales": [1.0], "flip": False, "attention_layers": 2, "batch_size": 4}},
    "weakclip": {**TINY_PARAMS["weakclip"], "train": {**TINY_PARAMS["weakclip"]["train"], "iterations": 2}},
    "pseudo": {**TINY_PARAMS["pseudo"], "output_dir": "pseudo_masks"},
    "seg": TINY_PARAMS["seg"],
}


def build_project(project: Path, params: dict,
                  stages: list[tuple[Callable[[list[str]], None], tuple[str, ...]]]) -> Path:
    """Tiny VOC-layout data + CAM store + random tiny CLIP artifact in ``project``, then ``stages`` run there
    through their ``main`` (each with its extra arguments), as ``dvc repro`` would in the repository root."""
    write_tiny_voc(project / "data", n_train=8, n_val=4, size=SIZE, cam_path=project / "artifacts/cams/train.h5")
    (project / "params.yaml").write_text(params_text(params))
    clip_cfg = build_dataclass(ClipConfig, {"source": "random", "arch": dict(CLIP_ARCH)})
    torch.manual_seed(0)
    save_clip_artifact(project / "artifacts/clip", build_clip(clip_cfg), clip_cfg)
    previous = Path.cwd()
    os.chdir(project)
    try:
        for stage_main, arguments in stages:
            stage_main(["--params", "params.yaml", *arguments])
    finally:
        os.chdir(previous)
    return project


def private_copy(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of a finished project, made the working directory (stages use relative paths)."""
    copy = tmp_path / "project"
    shutil.copytree(finished, copy)
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data, CAM store, CLIP artifact, a trained MCTformer and its CAM outputs, all written once."""
    return build_project(tmp_path_factory.mktemp("finished"), PARAMS, [(cam_train.main, ()), (cam_infer.main, ())])


@pytest.fixture
def project(finished_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return private_copy(finished_project, tmp_path, monkeypatch)


def snapshot(project: Path) -> dict[str, bytes]:
    """Every output already written (artifacts/, metrics/, plots/), by relative path."""
    return {str(path.relative_to(project)): path.read_bytes()
            for folder in ("artifacts", "metrics", "plots") for path in sorted((project / folder).rglob("*"))
            if path.is_file()}


def assert_nothing_lost(project: Path, before: dict[str, bytes]) -> None:
    """Every output written before the failing run has its bytes; no temporary file sits anywhere."""
    after = snapshot(project)
    assert {key: value for key, value in after.items() if key in before} == before
    assert [path for path in project.rglob("*") if is_temporary(path)] == []


def set_params(project: Path, update: Callable[[dict], None]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    update(params)
    (project / "params.yaml").write_text(params_text(params))


def failure_of(project: Path, stage_main: Callable[..., None], *arguments: str) -> BaseException:
    """Run a stage's ``main`` in ``project``; it must stop, losing nothing. Returns the exception."""
    before = snapshot(project)
    with pytest.raises(Exception) as caught:
        stage_main(["--params", "params.yaml", *arguments])
    assert_nothing_lost(project, before)
    return caught.value


# ------------------------------------------------------------------------------------------------ data


def test_corrupt_jpeg_names_the_image(project: Path) -> None:
    image = project / "data/JPEGImages/train_003.jpg"
    image.write_bytes(image.read_bytes()[:120])
    error = failure_of(project, cam_train.main)
    assert isinstance(error, DatasetError)
    assert str(Path("data/JPEGImages/train_003.jpg")) in str(error) and "unreadable image" in str(error)


def test_truncated_png_mask_names_the_mask(project: Path) -> None:
    mask = project / "data/SegmentationClass/train_002.png"
    mask.write_bytes(mask.read_bytes()[:50])
    error = failure_of(project, cam_infer.main)
    assert isinstance(error, DatasetError)
    assert "train_002.png" in str(error) and "unreadable mask" in str(error)


def test_mask_image_size_mismatch_names_the_mask(project: Path) -> None:
    write_mask(project / "data/SegmentationClass/train_002.png", np.zeros((20, 24), np.uint8))
    error = failure_of(project, cam_infer.main)
    assert isinstance(error, DatasetError)
    assert "train_002.png" in str(error) and "mask is 24x20 but its image is 32x32" in str(error)


def test_mask_class_id_out_of_range_names_the_mask(project: Path) -> None:
    path = project / "data/SegmentationClass/train_001.png"
    mask = read_mask(path)
    mask[0, 0] = 9  # the dataset has classes 0..3
    write_mask(path, mask)
    error = failure_of(project, cam_infer.main)
    assert isinstance(error, DatasetError)
    assert "train_001.png" in str(error) and "class id 9 out of range" in str(error)


def test_label_class_id_out_of_range_names_the_labels_file(project: Path) -> None:
    labels_path = project / "data/labels.json"
    labels = json.loads(labels_path.read_text())
    labels["labels"]["train_004"] = [1, 7]
    labels_path.write_text(json.dumps(labels))
    error = failure_of(project, cam_train.main)
    assert isinstance(error, DatasetError)
    assert "labels.json" in str(error) and "train_004 has class id 7 outside 1..3" in str(error)


def test_image_listed_in_split_but_missing_names_the_file(project: Path) -> None:
    (project / "data/JPEGImages/train_005.jpg").unlink()
    error = failure_of(project, cam_train.main)
    assert isinstance(error, DatasetError)
    assert "train_005.jpg" in str(error) and "image file not found" in str(error)


def test_empty_split_names_the_split_list(project: Path) -> None:
    (project / "data/ImageSets/Segmentation/train.txt").write_text("\n")
    error = failure_of(project, cam_train.main)
    assert isinstance(error, DatasetError)
    assert "train.txt" in str(error) and "split 'train' is empty" in str(error)


def test_image_without_labels_names_the_image(project: Path) -> None:
    labels_path = project / "data/labels.json"
    labels = json.loads(labels_path.read_text())
    labels["labels"]["train_006"] = []
    labels_path.write_text(json.dumps(labels))
    error = failure_of(project, cam_train.main)
    assert isinstance(error, DatasetError)
    assert "labels.json" in str(error) and "train_006 has no class labels" in str(error)


# ------------------------------------------------------------------------------------------------ stores


def test_cam_store_missing_an_image_is_refused(project: Path) -> None:
    with h5py.File(project / "artifacts/cams/train.h5", "a") as store:
        del store["train_003"]
    before = (project / "artifacts/cams/train.h5").read_bytes()
    error = failure_of(project, weakclip_train.main)
    assert isinstance(error, CamStoreError)
    assert "train.h5" in str(error) and "1 image(s) have no CAMs, e.g. train_003" in str(error)
    assert (project / "artifacts/cams/train.h5").read_bytes() == before


def test_cam_store_with_the_wrong_class_count_is_refused(project: Path) -> None:
    with h5py.File(project / "artifacts/cams/train.h5", "a") as store:
        store.attrs["class_names"] = json.dumps(["background", "apple", "boat", "cat", "dog"])
    error = failure_of(project, weakclip_train.main)
    assert isinstance(error, CamStoreError)
    assert "train.h5" in str(error) and "made for 5 classes" in str(error) and "the dataset has 4" in str(error)


def test_clip_weights_file_that_is_not_a_checkpoint_is_refused(project: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "not_a_checkpoint.pt").write_text("these are not weights\n" * 20)
    set_params(project, lambda p: p["clip"].update(source="file", weights="not_a_checkpoint.pt"))
    monkeypatch.setattr(sys, "argv", ["pipeline.clip", "--params", "params.yaml"])
    before = snapshot(project)
    with pytest.raises(ClipWeightsError) as caught:
        clip.main()  # this stage's main reads sys.argv
    assert_nothing_lost(project, before)
    assert "clip.weights: 'not_a_checkpoint.pt' is not a readable CLIP checkpoint" in str(caught.value)


def test_clip_artifact_weights_of_another_model_are_refused(project: Path) -> None:
    other = clip_from_config(arch_model_config(build_dataclass(ClipArchConfig, {**CLIP_ARCH, "vision_width": 24})))
    torch.save(other.state_dict(), project / "artifacts/clip/weights.pt")
    error = failure_of(project, weakclip_train.main)
    assert isinstance(error, ClipWeightsError)
    assert "weights.pt: does not match" in str(error) and "model_config.json" in str(error)


def test_missing_upstream_model_names_the_file(project: Path) -> None:
    (project / "metrics").mkdir(exist_ok=True)
    error = failure_of(project, pseudo_masks.main)  # no artifacts/weakclip/model.pt: weakclip_train never ran
    assert isinstance(error, FileNotFoundError)
    assert str(error) == f"{Path('artifacts/weakclip/model.pt')} does not exist: run `dvc repro weakclip_train` first"


def test_missing_cam_store_names_the_stage_that_makes_it(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "artifacts/cams/train.h5").unlink()
    before = snapshot(project)
    with pytest.raises(SystemExit) as exit_info:  # as the command line runs it
        run_stage_cli(lambda: weakclip_train.main(["--params", "params.yaml"]), "weakclip_train")
    assert exit_info.value.code == 1
    assert_nothing_lost(project, before)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"weakclip_train: error: {Path('artifacts/cams/train.h5')} does not exist: run `dvc repro cam_infer` first"]


@pytest.mark.parametrize("stage_main, arguments, missing, maker", [
    (cam_infer.main, (), "artifacts/mctformer/model.pt", "cam_train"),
    (seg_eval.main, ("--source", "gt"), "artifacts/seg/gt/model.pt", "seg_train@gt"),
    (seg_train.main, ("--source", "pseudo"), "pseudo_masks", "pseudo_masks"),
], ids=["cam_infer", "seg_eval", "seg_train"])
def test_missing_upstream_artifact_names_the_stage_that_makes_it(project: Path, stage_main, arguments, missing: str,
                                                                 maker: str) -> None:
    if (project / missing).is_file():
        (project / missing).unlink()
    error = failure_of(project, stage_main, *arguments)
    assert isinstance(error, FileNotFoundError)
    assert str(error) == f"{Path(missing)} does not exist: run `dvc repro {maker}` first"


def run_and_kill_mid_write(project: Path, code: str) -> None:
    """Run ``code`` in a Python process in ``project``; it calls ``kill_myself()`` (SIGKILL) inside a write."""
    prelude = "import os, signal\ndef kill_myself():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    killed = subprocess.run([sys.executable, "-c", prelude + code], cwd=project,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert killed.returncode == -signal.SIGKILL


def test_cam_infer_removes_a_killed_writers_leftovers_and_nothing_else(project: Path) -> None:
    """A cam_infer SIGKILLed while writing the store and the metrics left ``.train.h5.<pid>.<random>.tmp``
    and ``.cam.json.<pid>.<random>.tmp``; the next run deletes exactly those, not a live writer's
    temporary (this process's pid) nor any other file."""
    run_and_kill_mid_write(project, (
        "import numpy as np\n"
        "from weakclip_core.artifacts.atomic import atomic_path\n"
        "from weakclip_core.artifacts.cam_store import CamStoreWriter\n"
        "writer = CamStoreWriter('artifacts/cams/train.h5', 'tiny', ['background', 'apple'], {})\n"
        "writer.add('train_000', [1], np.zeros((1, 4, 4), np.float32))\n"
        "with atomic_path('metrics/cam.json') as t:\n"
        "    t.write_text('{')\n"
        "    kill_myself()\n"))
    stale = sorted(p.name for folder in ("artifacts/cams", "metrics") for p in (project / folder).iterdir()
                   if is_temporary(p))
    assert [name.split(".")[1] for name in stale] == ["cam", "train"]  # .cam.json.<pid>… and .train.h5.<pid>…
    live = project / "artifacts/cams" / f".train.h5.{os.getpid()}.abcdefgh.tmp"
    live.write_bytes(b"a live writer's file")
    unrelated = [project / "artifacts/cams/.train.h5.notes", project / "artifacts/cams/val.h5.tmp",
                 project / "metrics/.other.json.1.abcdefgh.tmp"]
    for path in unrelated:
        path.write_text("keep me\n")

    cam_infer.main(["--params", "params.yaml"])
    assert sorted(p.name for folder in ("artifacts/cams", "metrics") for p in (project / folder).iterdir()
                  if is_temporary(p)) == sorted([live.name, unrelated[2].name])
    assert all(path.read_text() == "keep me\n" for path in unrelated)
    assert live.read_bytes() == b"a live writer's file"


# ------------------------------------------------------------------------------------------------ params


def test_unknown_params_key_names_the_key(project: Path) -> None:
    set_params(project, lambda p: p["cam"]["train"].update(epochz=3))
    error = failure_of(project, cam_train.main)
    assert isinstance(error, ConfigError)
    assert "params.yaml: cam.train.epochz: unknown key" in str(error)


def test_wrong_params_type_names_the_key(project: Path) -> None:
    set_params(project, lambda p: p["cam"]["train"].update(epochs="two"))
    error = failure_of(project, cam_train.main)
    assert isinstance(error, ConfigError)
    assert "params.yaml: cam.train.epochs: expected int, got 'two'" in str(error)


@pytest.mark.parametrize("stage_main, arguments", [(pseudo_masks.main, ()), (seg_train.main, ("--source", "pseudo"))],
                         ids=["pseudo_masks", "seg_train"])
def test_pseudo_mask_dir_pointing_at_gt_is_refused(project: Path, stage_main, arguments) -> None:
    set_params(project, lambda p: p["pseudo"].update(output_dir="data/SegmentationClass"))
    gt_before = {p.name: p.read_bytes() for p in (project / "data/SegmentationClass").iterdir()}
    error = failure_of(project, stage_main, *arguments)
    assert isinstance(error, GroundTruthMaskError)
    assert "pseudo.output_dir: data/SegmentationClass resolves to the ground-truth mask folder" in str(error)
    assert {p.name: p.read_bytes() for p in (project / "data/SegmentationClass").iterdir()} == gt_before


# ------------------------------------------------------------------------------------------------ disk


def test_disk_full_while_writing_the_model_keeps_the_old_one_and_names_it(project: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC half-way through the final model's bytes: the earlier model.pt survives byte for byte, the
    error says which output failed, and once space is back a re-run resumes from the last checkpoint
    (no step repeated) and writes the same model as before."""
    model_path = project / "artifacts/mctformer/model.pt"
    old_model = model_path.read_bytes()
    real_save = torch.save
    failed_writes: list[str] = []

    def save_until_disk_full(obj, destination, *args, **kwargs):
        name = getattr(destination, "name", str(destination))
        if not Path(name).name.startswith(".model.pt."):
            return real_save(obj, destination, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        destination.write(buffer.getvalue()[:buffer.tell() // 2])  # half the bytes reach the disk
        failed_writes.append(name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    error = failure_of(project, cam_train.main)
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC and failed_writes
    assert any(str(Path("artifacts/mctformer/model.pt")) in note for note in getattr(error, "__notes__", []))
    assert model_path.read_bytes() == old_model
    assert [p for p in project.rglob("*") if is_temporary(p)] == []
    assert list((project / "checkpoints/cam_train").rglob("last.pt")), "training state survived the failure"

    monkeypatch.setattr(torch, "save", real_save)
    steps_run: list[int] = []
    from torch.optim.optimizer import register_optimizer_step_post_hook
    handle = register_optimizer_step_post_hook(lambda *_: steps_run.append(1))
    try:
        cam_train.main(["--params", "params.yaml"])
    finally:
        handle.remove()
    assert steps_run == [], "the re-run resumed after the last step instead of training again"
    assert model_path.read_bytes() == old_model  # same params, same seed: the same bytes
