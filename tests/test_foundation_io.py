"""Atomic writes, the VOC layout readers/writers, and the shared training schedules/checkpoints."""

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip_core.artifacts.atomic import (FolderContents, OutputFolderError, atomic_dir, atomic_path,
                                           check_output_dir, write_json)
from weakclip_core.data.layout import (DatasetError, PreparedDataset, labels_from_mask, read_image, read_image_size,
                                       read_mask, read_split, voc_palette, write_image, write_labels, write_mask,
                                       write_split)
from weakclip_core.training.checkpoint import Checkpointer
from weakclip_core.training.schedules import poly_lr, warmup_cosine_lr


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir_replaces_whole_folder_only_on_success(tmp_path):
    final = tmp_path / "prepared"
    with atomic_dir(final) as folder:
        (folder / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as folder:
            (folder / "b.txt").write_text("2")
            raise RuntimeError("bad input")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    with atomic_dir(final) as folder:
        (folder / "c.txt").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_voc_palette_known_colours():
    palette = voc_palette()
    assert palette[0:3] == [0, 0, 0]
    assert palette[3:6] == [128, 0, 0]       # aeroplane
    assert palette[15 * 3:16 * 3] == [192, 128, 128]  # person
    assert palette[255 * 3:256 * 3] == [224, 224, 192]  # ignore


def test_mask_and_image_round_trip(tmp_path):
    mask = np.array([[0, 1, 255], [2, 2, 0]], dtype=np.uint8)
    write_mask(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    assert labels_from_mask(mask) == [1, 2]
    picture = np.full((4, 5, 3), 200, np.uint8)
    write_image(tmp_path / "i.jpg", picture)
    assert read_image(tmp_path / "i.jpg").shape == (4, 5, 3)


def test_a_16_bit_or_1_bit_mask_of_class_indices_is_read_and_one_above_255_is_refused(tmp_path):
    """Annotation tools and ``cv2.imwrite`` of a uint16 array save masks as 16-bit greyscale, and a boolean array
    saves as 1-bit: their values are class indices like a palette PNG's (they used to be refused as "must be a
    palette or greyscale PNG", which a 16-bit greyscale PNG is). A value that cannot be a class or 255 is refused."""
    classes = np.array([[0, 1, 255], [2, 2, 0]], dtype=np.uint16)
    Image.fromarray(classes).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as image:
        assert image.mode.startswith("I")
    read = read_mask(tmp_path / "wide.png")
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, classes.astype(np.uint8))
    Image.fromarray(np.array([[True, False], [False, True]])).save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as image:
        assert image.mode == "1"
    np.testing.assert_array_equal(read_mask(tmp_path / "bits.png"), [[1, 0], [0, 1]])
    Image.fromarray(np.array([[0, 1000]], dtype=np.uint16)).save(tmp_path / "depth.png")
    with pytest.raises(DatasetError, match=r"depth.png: a I;16 mask holding 1000, above 255"):
        read_mask(tmp_path / "depth.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match="rgb.png: mask must be a single-channel PNG of class indices.*got mode RGB"):
        read_mask(tmp_path / "rgb.png")


def test_an_image_above_pils_size_guard_is_called_too_large_not_unreadable(tmp_path, monkeypatch):
    """PIL refuses to open an image above twice ``MAX_IMAGE_PIXELS`` (~179 MP by default) as a possible
    decompression bomb; a real aerial photo is that large, so the refusal says to downscale it."""
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    write_mask(tmp_path / "big_mask.png", np.zeros((40, 40), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels is above twice this limit
    for read in (read_image, read_image_size):
        with pytest.raises(DatasetError, match="big.png: image too large to open .*downscale it"):
            read(tmp_path / "big.png")
    with pytest.raises(DatasetError, match="big_mask.png: mask too large to open"):
        read_mask(tmp_path / "big_mask.png")


def test_bad_files_are_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg: unreadable image"):
        read_image(tmp_path / "broken.jpg")
    write_mask(tmp_path / "t.png", np.zeros((32, 32), np.uint8))
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="t.png: unreadable mask"):
        read_mask(tmp_path / "t.png")
    with pytest.raises(DatasetError, match="missing.png: mask file not found"):
        read_mask(tmp_path / "missing.png")
    write_split(tmp_path, "empty", [])
    with pytest.raises(DatasetError, match="split 'empty' is empty"):
        read_split(tmp_path, "empty")


def test_prepared_dataset_labels(tmp_path):
    write_labels(tmp_path, "toy", ["background", "a", "b"], {"x": [2, 1], "y": []})
    write_split(tmp_path, "train", ["x", "y"])
    dataset = PreparedDataset.open(tmp_path)
    assert dataset.n_classes == 3 and dataset.split("train") == ["x", "y"]
    np.testing.assert_array_equal(dataset.label_vector("x"), [1.0, 1.0])
    with pytest.raises(DatasetError, match="image y has no class labels"):
        dataset.image_labels("y")
    write_labels(tmp_path, "toy", ["background", "a"], {"x": [3]})
    with pytest.raises(DatasetError, match="class id 3 outside 1..1"):
        PreparedDataset.open(tmp_path)


def test_warmup_cosine_and_poly_by_hand():
    assert warmup_cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert warmup_cosine_lr(10, 100, 1.0, 10, min_lr=0.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(55, 100, 1.0, 10, min_lr=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine_lr(100, 100, 1.0, 10, min_lr=0.01) == pytest.approx(0.01)
    assert poly_lr(50, 100, 1.0, power=0.9) == pytest.approx(0.5 ** 0.9)


def test_mmcv_cosine_lr_is_mmcvs_cosine_annealing_with_linear_warmup():
    """The WeakCLIP reference's ``lr_config`` (CosineAnnealing, min_lr 1e-6, by iteration, warm-up 'linear',
    1500 iterations, ratio 1e-6) over 20k iterations at lr 1e-4, worked out as mmcv writes it: regular lr
    ``annealing_cos(base, min, step / max)``, warm-up ``regular * (1 - k)`` with ``k = (1 - step / 1500) * (1 - 1e-6)``."""
    from weakclip_core.training.schedules import mmcv_cosine_lr

    def mmcv(step: int) -> float:
        regular = 1e-6 + (1e-4 - 1e-6) * (math.cos(math.pi * step / 20000) + 1) / 2
        if step >= 1500:
            return regular
        k = (1 - step / 1500) * (1 - 1e-6)
        return regular * (1 - k)

    for step in (0, 1, 750, 1499, 1500, 8000, 19999):
        assert mmcv_cosine_lr(step, 20000, 1e-4, 1500, 1e-6) == pytest.approx(mmcv(step), rel=1e-12, abs=1e-18)
    assert mmcv_cosine_lr(0, 20000, 1e-4, 1500, 1e-6) == pytest.approx(1e-10)  # base * ratio
    # 8k, where the released checkpoint was taken: 65.5 % of the base lr, where the warm-up-then-cosine is at 72.4 %
    assert mmcv_cosine_lr(8000, 20000, 1e-4, 1500, 0.0) == pytest.approx(1e-4 * (1 + math.cos(0.4 * math.pi)) / 2)
    assert warmup_cosine_lr(8000, 20000, 1e-4, 1500, 0.0) == pytest.approx(1e-4 * (1 + math.cos(math.pi * 6500 / 18500)) / 2)


def test_checkpointer_resumes_state_and_ignores_other_configs(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpointer = Checkpointer("toy", {"lr": 0.1}, root=tmp_path)
    checkpointer.save(model, optimizer, step=7, extra={"epoch": 1})
    expected_draw = torch.rand(3)  # the RNG state saved is the one before this draw

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    step, extra = checkpointer.resume(fresh, fresh_optimizer)
    assert step == 7 and extra == {"epoch": 1}
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(torch.rand(3), expected_draw)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]

    other = Checkpointer("toy", {"lr": 0.2}, root=tmp_path)
    assert other.resume(fresh, fresh_optimizer) == (0, {})
    checkpointer.clear()
    assert checkpointer.load() is None


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """mkstemp/mkdtemp create 0o600/0o700; final outputs get what open()/mkdir() would give: the CAM store
    too (it was left 0o600, unreadable by another user or a pool worker running under another uid)."""
    import os

    from weakclip_core.artifacts.cam_store import CamStoreWriter
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as folder:
            (folder / "x").write_text("1")
        CamStoreWriter(tmp_path / "cams" / "train.h5", "toy", ["background", "cat"], {}).close()
    finally:
        os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "cams" / "train.h5").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ folders replaced whole, links, stale temporaries

MASKS = FolderContents(files=("*.png", "provenance.json"))


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_atomic_dir_refuses_a_folder_holding_what_the_stage_does_not_write(tmp_path):
    """Issue #22 finding 1: the replacement would delete the foreign entry, so nothing is replaced."""
    final = tmp_path / "data"
    (final / "prepared" / "SegmentationClass").mkdir(parents=True)
    (final / "prepared" / "SegmentationClass" / "a.png").write_bytes(b"gt")
    (final / "x.png").write_bytes(b"old mask")
    before = snapshot(tmp_path)
    with pytest.raises(OutputFolderError) as caught:
        with atomic_dir(final, MASKS, key="pseudo.output_dir") as folder:
            (folder / "y.png").write_bytes(b"new")
    assert str(caught.value) == (
        f"pseudo.output_dir: {final} holds prepared/, which this stage does not write; the stage replaces this "
        "folder whole when it finishes, which would delete it: move it away or choose an empty folder")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # nested descriptions: an unknown file two levels down is named by its path inside the folder
    prepared = FolderContents(files=("labels.json",), folders=(("ImageSets", FolderContents(folders=(
        ("Segmentation", FolderContents(files=("*.txt",))),))),))
    (tmp_path / "p" / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "p" / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (tmp_path / "p" / "labels.json").write_text("{}")
    assert check_output_dir(tmp_path / "p", prepared) == (tmp_path / "p").resolve()
    (tmp_path / "p" / "ImageSets" / "Main").mkdir()
    with pytest.raises(OutputFolderError, match=r"p holds ImageSets/Main/, which this stage does not write"):
        check_output_dir(tmp_path / "p", prepared)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputFolderError, match=r"f is a file, not a folder"):
        check_output_dir(tmp_path / "f")


def test_atomic_dir_refuses_an_output_that_is_or_holds_an_input_or_the_project(tmp_path, monkeypatch):
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    reads = {"dataset.prepared_dir": "data/prepared"}
    for output, message in (
            ("data", "k: data contains data/prepared (dataset.prepared_dir), which this stage reads"),
            ("data/prepared", "k: data/prepared is data/prepared (dataset.prepared_dir), which this stage reads"),
            (".", f"k: . is {tmp_path.resolve()} (the project folder), which this stage reads"),
            (str(tmp_path.parent), f"k: {tmp_path.parent} contains {tmp_path.resolve()} (the project folder)"),
            # Inside an input folder: its PNGs (a dataset's images, imported masks) are files the mask folder
            # may hold, so only this rule keeps them from being replaced by the stage's output.
            ("data/prepared/JPEGImages", "k: data/prepared/JPEGImages is inside data/prepared "
                                         "(dataset.prepared_dir), which this stage reads")):
        with pytest.raises(OutputFolderError) as caught:
            with atomic_dir(output, MASKS, key="k", reads=reads):
                raise AssertionError("no work may start")
        assert str(caught.value).startswith(message)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(OutputFolderError, match="other holds dvc.yaml: it is a project folder"):
        check_output_dir("other", FolderContents(files=("*",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other", "params.yaml"]
    # The project folder is the one read folder an output may lie inside (every output does).
    assert check_output_dir("data/pseudo", MASKS, reads=reads) == (tmp_path / "data" / "pseudo").resolve()
    # A project cloned inside the dataset's own folder: its outputs lie inside that read folder too, and only
    # those outside the project are refused there.
    around = {"dataset.source": str(tmp_path.parent)}
    assert check_output_dir("data/pseudo", MASKS, reads=around) == (tmp_path / "data" / "pseudo").resolve()
    with pytest.raises(OutputFolderError, match=f"is inside {tmp_path.parent} \\(dataset.source\\)"):
        check_output_dir(str(tmp_path.parent / "images"), MASKS, reads=around)


def test_atomic_dir_writes_through_a_symlinked_folder(tmp_path):
    """Issue #22 finding 4: the link stays, its target is replaced atomically, nothing is left behind."""
    target = tmp_path / "elsewhere" / "masks"
    target.mkdir(parents=True)
    (target / "old.png").write_bytes(b"old")
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep me")
    (tmp_path / "data").mkdir()
    link = tmp_path / "data" / "pseudo_masks"
    link.symlink_to(target, target_is_directory=True)
    for round_ in range(2):
        with atomic_dir(link, MASKS, key="pseudo.output_dir") as folder:
            (folder / f"new{round_}.png").write_bytes(b"new")
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert sorted(p.name for p in target.iterdir()) == [f"new{round_}.png"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["pseudo_masks"]
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["keep.txt", "masks"]
    # what the old code left (the link renamed to ``.pseudo_masks.old``, a real folder in its place) is repaired
    link.unlink()
    link.mkdir()
    (tmp_path / "data" / ".pseudo_masks.old").symlink_to(target, target_is_directory=True)
    with atomic_dir(link, MASKS) as folder:
        (folder / "again.png").write_bytes(b"again")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["pseudo_masks"]
    assert sorted(p.name for p in link.iterdir()) == ["again.png"]
    assert sorted(p.name for p in target.iterdir()) == ["new1.png"]  # the stale target was not touched


def test_atomic_writers_remove_a_killed_writers_temporaries_of_their_own_name_only(tmp_path):
    """Issue #22 finding 7: every atomic writer (not only cam_infer and pseudo_masks) removes the temporaries
    of its own final name whose writer is gone; a live writer's temporary and every other file stay."""
    dead, live = dead_pid(), os.getppid()
    stale_file = tmp_path / f".model.pt.{dead}.abcd1234.tmp"
    stale_dir = tmp_path / f".reports.{dead}.abcd1234.tmp"
    kept = [tmp_path / f".model.pt.{live}.abcd1234.tmp", tmp_path / f".other.pt.{dead}.abcd1234.tmp",
            tmp_path / ".model.pt.notes", tmp_path / "model.pt.tmp"]
    stale_file.write_bytes(b"x" * 1000)
    stale_dir.mkdir()
    (stale_dir / "half.png").write_bytes(b"half")
    for path in kept:
        path.write_text("keep me")
    with atomic_path(tmp_path / "model.pt") as temporary:
        temporary.write_bytes(b"model")
    with atomic_dir(tmp_path / "reports") as folder:
        (folder / "a.png").write_bytes(b"a")
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(path.read_text() == "keep me" for path in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in kept), "model.pt", "reports"])


def test_stale_temporaries_are_removed_in_a_big_folder_without_relisting_it_per_write(tmp_path, monkeypatch):
    import weakclip_core.artifacts.atomic as atomic
    for index in range(1200):
        (tmp_path / f"{index:04d}.png").write_bytes(b"")
    dead = dead_pid()
    stale = [tmp_path / f".0007.png.{dead}.abcd1234.tmp.png", tmp_path / f".0900.png.{dead}.abcd1234.tmp.png"]
    for path in stale:
        path.write_bytes(b"half")
    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr(atomic.os, "scandir", lambda folder: listings.append(folder) or real_scandir(folder))
    for index in (7, 8, 900):
        with atomic_path(tmp_path / f"{index:04d}.png", suffix=".png") as temporary:
            temporary.write_bytes(b"new")
    assert not any(path.exists() for path in stale)
    assert len(listings) == 1  # one listing served the three writes


def test_code_digests_are_each_source_files_sha256():
    """The record a checkpoint keeps of its code: every .py file of both packages, each one's sha256 of its
    bytes (hashlib on the file here, independently of the walk)."""
    from weakclip_core.training import checkpoint
    import pipeline.seg_train

    digests = checkpoint.code_digests()
    root = Path(checkpoint.__file__).parents[2]  # the folder holding both packages
    for module in (checkpoint, pipeline.seg_train):
        source = Path(module.__file__)
        assert digests[source.relative_to(root).as_posix()] == hashlib.sha256(source.read_bytes()).hexdigest()
    package_files = [path for package in ("weakclip_core", "pipeline") for path in (root / package).rglob("*.py")]
    assert len(digests) == len(package_files)


def test_a_checkpoint_that_other_code_wrote_is_refused_naming_the_files(tmp_path, monkeypatch, capsys):
    """Same config, other code (a run killed, the code edited, the stage re-run): refused in one error naming
    the checkpoint and the files that differ among those this process runs (imported here: checkpoint.py and
    layout.py; a file no module of this process was loaded from, changed, added or removed, is no reason), the
    file left as it was; ``WEAKCLIP_RESUME_OTHER_CODE=1`` resumes it with a note. A checkpoint without a code
    record (written before) is other code too."""
    from weakclip_core.training.checkpoint import CheckpointCodeError

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    same, runs, never = ("weakclip_core/errors.py", "weakclip_core/training/checkpoint.py", "pipeline/never_imported.py")
    layout = "weakclip_core/data/layout.py"
    old_code = {same: "1" * 64, runs: "2" * 64, layout: "3" * 64, never: "4" * 64}
    Checkpointer("toy", {"lr": 0.1}, root=tmp_path, code=old_code).save(model, optimizer, step=5)
    only_unrun = Checkpointer("toy", {"lr": 0.1}, root=tmp_path, code={**old_code, never: "5" * 64,
                                                                        "pipeline/added.py": "6" * 64})
    assert only_unrun.load()["step"] == 5  # edits this process does not run: resumed
    edited = Checkpointer("toy", {"lr": 0.1}, root=tmp_path,
                          code={same: "1" * 64, runs: "7" * 64, never: "5" * 64})  # layout.py removed
    saved_bytes = edited.path.read_bytes()
    monkeypatch.delenv("WEAKCLIP_RESUME_OTHER_CODE", raising=False)
    with pytest.raises(CheckpointCodeError) as refused:
        edited.resume(torch.nn.Linear(3, 2), torch.optim.AdamW(model.parameters(), lr=0.1))
    message = str(refused.value)
    assert message.startswith(f"{edited.path}: a checkpoint of this config at step 5 was written by other code "
                              f"(differing files: {layout}, {runs}); delete {tmp_path / 'toy'} to start over")
    assert "WEAKCLIP_RESUME_OTHER_CODE=1" in message
    assert edited.path.read_bytes() == saved_bytes

    monkeypatch.setenv("WEAKCLIP_RESUME_OTHER_CODE", "1")
    fresh = torch.nn.Linear(3, 2)
    assert edited.resume(fresh, torch.optim.AdamW(fresh.parameters(), lr=0.1)) == (5, {})
    assert torch.equal(fresh.weight, model.weight)
    assert "resuming it anyway" in capsys.readouterr().err

    monkeypatch.delenv("WEAKCLIP_RESUME_OTHER_CODE")
    state = torch.load(edited.path, weights_only=True)
    del state["code"]  # as a checkpoint written before checkpoints recorded their code
    torch.save(state, edited.path)
    with pytest.raises(CheckpointCodeError, match="unknown \\(written before checkpoints recorded their code\\)"):
        edited.load()


def test_checkpoints_are_plain_data_and_resume_every_rng_exactly(tmp_path):
    """A checkpoint loads with ``weights_only=True`` (no ndarray, no pickled object: issue #22, finding 2) and
    resuming restores python's, numpy's and torch's RNG bit for bit."""
    import random

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    random.gauss(0, 1), np.random.standard_normal()  # cached gaussians are part of the state too
    checkpointer = Checkpointer("toy", {"lr": 0.1, "sizes": [1, 2]}, root=tmp_path)
    checkpointer.save(model, optimizer, step=3)
    expected = (random.random(), random.gauss(0, 1), np.random.random(3), np.random.standard_normal(), torch.rand(2))
    saved = torch.load(checkpointer.path, map_location="cpu", weights_only=True)
    assert saved["step"] == 3 and saved["config"] == {"lr": 0.1, "sizes": [1, 2]}

    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    assert checkpointer.resume(model, optimizer) == (3, {})
    resumed = (random.random(), random.gauss(0, 1), np.random.random(3), np.random.standard_normal(), torch.rand(2))
    assert resumed[:2] == expected[:2] and resumed[3] == expected[3]
    assert np.array_equal(resumed[2], expected[2]) and torch.equal(resumed[4], expected[4])


def test_a_resume_restores_its_own_gpus_generator_from_rank_0s_state(monkeypatch):
    """A checkpoint holds the saving process's own CUDA generator; each process restores it on its own device
    (torchrun sets that to its GPU). Restoring rank 0's list of every visible GPU's state, as before, set the other
    ranks' generators to rank 0's untouched copies of their GPUs and raised an IndexError where fewer GPUs were
    visible at resume. A fake CUDA with generators kept in a dict stands in for the GPUs."""
    from weakclip_core.training import checkpoint

    generators = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}
    current = {"device": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generators[current["device"]].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": generators.__setitem__(
        current["device"], state.clone()))
    saved = checkpoint.capture_rng_state()  # rank 0, on GPU 0
    assert torch.equal(saved["cuda"], torch.tensor([10], dtype=torch.uint8))
    current["device"] = 1  # rank 1 resumes on GPU 1: it continues rank 0's stream, GPU 0 untouched
    generators[0] = torch.tensor([99], dtype=torch.uint8)
    checkpoint.restore_rng_state(saved)
    assert generators[1].item() == 10 and generators[0].item() == 99
    # A checkpoint written before (a list: every GPU rank 0 saw) gives rank 0's own, its first.
    checkpoint.restore_rng_state({**saved, "cuda": [torch.tensor([20], dtype=torch.uint8),
                                                    torch.tensor([21], dtype=torch.uint8)]})
    assert generators[1].item() == 20
    checkpoint.restore_rng_state({**saved, "cuda": []})  # saved without CUDA: the generator is left alone
    assert generators[1].item() == 20


def test_a_checkpoint_holding_code_is_refused_naming_it(tmp_path):
    """Whatever its config, a checkpoint that needs more than plain data to load is refused unread."""
    from weakclip_core.artifacts.model_file import UnsafeTorchFileError
    from weakclip_core.errors import InputError

    class Planted:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w')",))

    checkpointer = Checkpointer("toy", {"lr": 0.1}, root=tmp_path)
    checkpointer.path.parent.mkdir(parents=True)
    with open(checkpointer.path, "wb") as stream:
        torch.save({"config": {"another": "config"}, "x": Planted()}, stream)
    with pytest.raises(UnsafeTorchFileError) as caught:
        checkpointer.load()
    assert isinstance(caught.value, InputError) and not (tmp_path / "ran").exists()
    message = str(caught.value)
    assert message.startswith(f"{checkpointer.path}: refused to load this training checkpoint: it holds more than "
                              "plain tensors and data (Unsupported global: GLOBAL exec")
    assert "tampered with or made by another version" in message and "\n" not in message
    checkpointer.path.write_bytes(b"truncated")
    with pytest.raises(UnsafeTorchFileError, match=r"last\.pt: not a readable torch training checkpoint"):
        checkpointer.load()


def test_final_model_files_keep_their_bytes_and_load_with_weights_only(tmp_path):
    """``save_final_model`` writes what it wrote before (DVC compares the bytes), and it loads safely."""
    import hashlib
    import io

    from weakclip_core.artifacts.model_file import load_torch_file, save_final_model

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    config, metadata = {"arch": {"width": 3, "scales": [1.0, 0.5]}, "n_classes": 2}, {"seed": 0, "val": 0.5}
    save_final_model(tmp_path / "model.pt", model, config, **metadata)
    stream = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": config, **metadata}, stream)
    assert (tmp_path / "model.pt").read_bytes() == stream.getvalue()
    saved = load_torch_file(tmp_path / "model.pt", "model file")
    assert saved["config"] == config and saved["seed"] == 0 and torch.equal(saved["model"]["weight"], model.weight)
    assert hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()  # untouched by the load


def test_a_final_model_replaces_the_not_trained_record_an_earlier_run_left(tmp_path):
    """A stage that had nothing to train wrote ``not_trained.json`` (and removed any model); trained again
    directly (no ``dvc repro`` to clear the folder), the folder must hold the model only, as DVC's run would."""
    from weakclip_core.artifacts.model_file import NOT_TRAINED_FILE, save_final_model

    folder = tmp_path / "artifacts" / "seg" / "gt"
    folder.mkdir(parents=True)
    (folder / NOT_TRAINED_FILE).write_text('{"trained": false, "not_trained": "no GT masks"}\n')
    save_final_model(folder / "model.pt", torch.nn.Linear(2, 2), {"n_classes": 2})
    assert sorted(path.name for path in folder.iterdir()) == ["model.pt"]


def test_atomic_dir_removes_the_previous_output_a_kill_between_its_two_renames_left(tmp_path):
    """A kill after ``final -> .final.old`` and before ``temporary -> final`` left only ``.final.old``; the next
    successful write removes it (a failed one keeps it: it holds the last complete output)."""
    old = tmp_path / ".reports.old"
    old.mkdir()
    (old / "a.png").write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "reports"):
            raise RuntimeError("failed")
    assert (old / "a.png").read_bytes() == b"previous"
    with atomic_dir(tmp_path / "reports") as folder:
        (folder / "b.png").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]
