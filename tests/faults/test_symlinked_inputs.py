"""``prepare`` with symlinked source images (issue #22, finding 6).

``os.link`` hard-linked the symlink itself: an absolute link in the prepared folder kept pointing outside
the dataset, a relative one dangled there. ``prepare`` then swapped the broken folder over the previous
good one, and only after that failed on the preview, so the previous folder was lost (against row 27 of
docs/RELIABILITY.md). Now links are followed (the prepared folder holds the target's bytes, never a link),
and everything, the preview included, is checked before the swap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipeline import prepare
from pipeline._stage import run_stage_cli
from weakclip_core.data.layout import DatasetError
from weakclip_core.data.voc import link_or_copy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_real_datasets import _voc_tree  # noqa: E402
from tiny_chain import params_text  # noqa: E402

LINKED = "2007_000002"  # a train image: the preview shows it


def every_file(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def voc_params(workspace: Path, source: Path) -> Path:
    (workspace / "params.yaml").write_text(
        params_text({"dataset": {"name": "voc", "source": str(source), "prepared_dir": "data/prepared/voc"}}))
    return workspace / "params.yaml"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A VOC tree, a workspace that prepared it once (the *previous good folder*), the workspace as cwd."""
    source = _voc_tree(tmp_path / "VOC2012")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    voc_params(workspace, source)
    monkeypatch.chdir(workspace)
    assert prepare.main(["--params", "params.yaml", "--no-progress"]) is None
    return workspace


def link_image(source: Path, target: Path, relative: bool) -> bytes:
    """Move ``LINKED``'s JPEG to ``target`` and leave a symlink to it in ``JPEGImages``; returns its bytes."""
    image = source / "JPEGImages" / f"{LINKED}.jpg"
    content = image.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    image.rename(target)
    image.symlink_to(os.path.relpath(target, image.parent) if relative else target)
    return content


@pytest.mark.parametrize("relative", [True, False], ids=["relative_link", "absolute_link_outside_the_dataset"])
def test_symlinked_image_is_prepared_as_its_target(workspace: Path, tmp_path: Path, relative: bool,
                                                   capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "VOC2012"
    outside = tmp_path / ("VOC2012/originals" if relative else "elsewhere") / f"{LINKED}.jpg"
    content = link_image(source, outside, relative)
    prepared = workspace / "data/prepared/voc"
    before = every_file(prepared)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_stage_cli(lambda: prepare.main(["--params", "params.yaml", "--no-progress"]), "prepare")
    assert exited.value.code == 0, capsys.readouterr().err
    image = prepared / "JPEGImages" / f"{LINKED}.jpg"
    assert not image.is_symlink() and image.read_bytes() == content
    assert every_file(prepared) == before  # the same dataset, now without a link to outside it
    assert [path for path in workspace.rglob("*") if path.is_symlink()] == []
    outside.unlink()  # the prepared folder does not depend on the link's target
    assert image.read_bytes() == content


def test_a_failure_after_the_checks_keeps_the_previous_folder(workspace: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """The preview is drawn before the swap: when it fails, the previous prepared folder keeps every byte
    and no temporary folder is left (row 27 for every failure, not only the source checks)."""
    (tmp_path / "VOC2012/ImageSets/Segmentation/train.txt").write_text("2007_000001\n")  # the source changed
    prepared = workspace / "data/prepared/voc"
    before = every_file(prepared)
    preview_before = (workspace / "reports/dataset_preview.png").read_bytes()

    def failing_preview(dataset, split, out_path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise DatasetError(f"{dataset.root}/JPEGImages/{LINKED}.jpg: unreadable image (preview)")

    monkeypatch.setattr(prepare, "write_dataset_preview", failing_preview)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_stage_cli(lambda: prepare.main(["--params", "params.yaml", "--no-progress"]), "prepare")
    assert exited.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prepare: error: ") and "unreadable image (preview)" in lines[0]
    assert every_file(prepared) == before
    assert (workspace / "reports/dataset_preview.png").read_bytes() == preview_before
    assert sorted(path.name for path in prepared.parent.iterdir()) == ["voc"]  # no temporary or .old folder


def test_a_dangling_symlink_is_one_line_naming_it(workspace: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "VOC2012"
    outside = tmp_path / "elsewhere" / f"{LINKED}.jpg"
    link_image(source, outside, relative=False)
    outside.unlink()
    prepared = workspace / "data/prepared/voc"
    before = every_file(prepared)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_stage_cli(lambda: prepare.main(["--params", "params.yaml", "--no-progress"]), "prepare")
    assert exited.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"JPEGImages/{LINKED}.jpg" in lines[0], lines
    assert every_file(prepared) == before


def test_link_or_copy_follows_links_and_names_a_dangling_one(tmp_path: Path) -> None:
    """The helper VOC and COCO share: the destination is a file with the target's bytes, never a link."""
    target = tmp_path / "real.jpg"
    target.write_bytes(b"jpeg bytes")
    (tmp_path / "links").mkdir()
    relative_link = tmp_path / "links" / "relative.jpg"
    relative_link.symlink_to("../real.jpg")
    for index, link in enumerate((relative_link, tmp_path / "absolute.jpg")):
        if not link.is_symlink():
            link.symlink_to(target)
        destination = tmp_path / "prepared" / f"{index}.jpg"
        link_or_copy(link, destination)
        assert not destination.is_symlink() and destination.read_bytes() == b"jpeg bytes"
    dangling = tmp_path / "dangling.jpg"
    dangling.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(DatasetError, match="dangling.jpg: a symlink to .*gone.jpg, which is not a file"):
        link_or_copy(dangling, tmp_path / "prepared" / "2.jpg")
