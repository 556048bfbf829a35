"""Atomic writes, the VOC layout readers/writers, and the shared training schedules/checkpoints."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from weakclip_core.artifacts.atomic import atomic_dir, atomic_path, write_json
from weakclip_core.data.layout import (DatasetError, PreparedDataset, labels_from_mask, read_image, read_mask,
                                       read_split, voc_palette, write_image, write_labels, write_mask, write_split)
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
    """mkstemp/mkdtemp create 0o600/0o700; final outputs get what open()/mkdir() would give."""
    import os
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as folder:
            (folder / "x").write_text("1")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
