"""Issue #18: the real ``dvc.yaml`` run by ``dvc repro`` on a label-only custom dataset with no GT mask anywhere.

The dataset is written here in the plain layout of README "Your own data" (images, ``classes.txt``,
``labels.csv``, split lists; no ``masks/``), from the tiny synthetic images (their masks are dropped). The
chain must end with a pseudo mask per train image and a segmenter trained on them; every scoring stage
records ``not scored: no GT`` and the summary shows it; nothing fails, and DVC sees the project up to date.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "faults"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from test_end_to_end import DVC, build_tiny_project, ran_stages, run  # noqa: E402
from tiny_chain import params_text, run_stage, write_project  # noqa: E402

NOT_SCORED = "not scored: no GT"
TIMEOUT_S = 900


def write_label_only_dataset(scratch: Path, destination: Path) -> dict[str, Any]:
    """The tiny synthetic set re-laid as a custom dataset without masks; returns its labels by id."""
    write_project(scratch)
    run_stage(scratch, "prepare")
    prepared = scratch / "data" / "prepared" / "tiny"
    labels = json.loads((prepared / "labels.json").read_text())
    class_names = labels["class_names"]
    (destination / "images").mkdir(parents=True)
    (destination / "splits").mkdir()
    for image in sorted((prepared / "JPEGImages").iterdir()):
        shutil.copyfile(image, destination / "images" / image.name)
    for split in ("train", "val"):
        shutil.copyfile(prepared / "ImageSets" / "Segmentation" / f"{split}.txt", destination / "splits" / f"{split}.txt")
    (destination / "classes.txt").write_text("".join(f"{name}\n" for name in class_names[1:]))
    named = {image_id: [class_names[c] for c in classes] for image_id, classes in labels["labels"].items()}
    (destination / "labels.csv").write_text("image_id,classes\n" + "".join(
        f"{image_id},{';'.join(names)}\n" for image_id, names in sorted(named.items())))
    return named


@pytest.fixture(scope="module")
def label_only_chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("own_data")
    named = write_label_only_dataset(root / "scratch", root / "my_dataset")
    project = root / "project"
    build_tiny_project(project, "label-only project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"].update(name="custom", source=str(root / "my_dataset"), prepared_dir="data/prepared/mine")
    # External files at paths outside the project (item 5): ImageNet encoder weights the segmenter loads, and a
    # CLIP weights file and a CAM dump folder that this run's sources (random CLIP, trained CAMs) do not read
    # but that dvc.yaml declares all the same.
    external = root / "external"
    external.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), external / "resnet18.pth")
    (external / "clip.pt").write_bytes(b"clip weights v1")
    (external / "cam_npy").mkdir()
    (external / "cam_npy" / "a.npy").write_bytes(b"dump v1")
    # And a DeiT init for the MCTformer (the presets' DeiT-S), which cam_train does load: a timm ViT of the tiny
    # chain's cam.arch, saved as DeiT's release is ({"model": state dict}).
    deit = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0,
                                         num_classes=10)
    torch.save({"model": deit.state_dict()}, external / "deit_tiny.pth")
    params["cam"]["arch"]["pretrained"] = str(external / "deit_tiny.pth")
    params["seg"]["encoder_weights"] = str(external / "resnet18.pth")
    params["clip"]["weights"] = str(external / "clip.pt")
    params["cam"]["npy_folder"] = str(external / "cam_npy")
    (project / "params.yaml").write_text(params_text(params))
    output = run([*DVC, "repro"], project, timeout=TIMEOUT_S)
    return project, output, named


@pytest.mark.slow
def test_label_only_chain_ends_with_pseudo_masks_and_a_trained_segmenter(label_only_chain) -> None:
    project, output, named = label_only_chain
    assert {"prepare", "clip", "cam_train", "cam_infer", "weakclip_train", "pseudo_masks", "seg_train@pseudo",
            "seg_train@gt", "seg_eval@pseudo", "seg_eval@gt", "summary"} <= ran_stages(output)
    prepared = project / "data" / "prepared" / "mine"
    assert [path.name for path in (prepared / "SegmentationClass").iterdir()] == ["NO_GT_MASKS.txt"]  # no GT
    train_ids = (prepared / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for image_id in train_ids:
        with Image.open(project / "data" / "pseudo_masks" / f"{image_id}.png") as mask, \
                Image.open(prepared / "JPEGImages" / f"{image_id}.jpg") as image:
            assert mask.size == image.size
            present = set(np.unique(np.array(mask)).tolist()) - {0, 255}
            class_names = ["background", *(project.parent / "my_dataset" / "classes.txt").read_text().split()]
            assert {class_names[c] for c in present} <= set(named[image_id])  # only labelled classes
    saved = torch.load(project / "artifacts" / "seg" / "pseudo" / "model.pt", map_location="cpu", weights_only=True)
    assert saved["steps"] > 0 and saved["model"]
    assert not (project / "artifacts" / "seg" / "gt" / "model.pt").exists()
    assert "not trained: no GT" in (project / "artifacts" / "seg" / "gt" / "not_trained.json").read_text()


@pytest.mark.slow
def test_scoring_stages_say_not_scored_and_the_summary_shows_it(label_only_chain) -> None:
    project, _, _ = label_only_chain
    for stem in ("cam", "weakclip", "pseudo", "seg_pseudo"):
        data = json.loads((project / "metrics" / f"{stem}.json").read_text())
        assert data["miou"] is None and data["not_scored"] == NOT_SCORED, stem
    seg_gt = json.loads((project / "metrics" / "seg_gt.json").read_text())
    assert seg_gt["miou"] is None and seg_gt["not_scored"].startswith("not trained: no GT")
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    assert summary == dict.fromkeys(["cam_miou", "weakclip_miou", "pseudo_miou", "seg_pseudo_miou", "seg_gt_miou",
                                     "wsss_fsss_ratio"])
    results = (project / "docs" / "RESULTS.md").read_text()
    assert results.count(NOT_SCORED) >= 5 and "Dataset: **custom**" in results
    status = run([*DVC, "status"], project)
    assert "changed" not in status and "modified" not in status, status


@pytest.mark.slow
def test_a_fresh_clone_of_the_label_only_run_is_up_to_date(label_only_chain, tmp_path: Path) -> None:
    """The run committed to git and pushed to a DVC remote, then cloned as another machine would (its own clone,
    its own cache, `dvc pull`): every stage is up to date there. `seg_train@gt` trains nothing without GT and left
    its dvclive plots folder empty; git holds no empty folder, so in the clone that `cache: false` output was
    missing and `dvc status` called it deleted (and a Prefect coordinator refused the chain as unclean)."""
    project, _, _ = label_only_chain
    remote = tmp_path / "remote"
    run([*DVC, "remote", "add", "--local", "-d", "store", str(remote)], project)
    run([*DVC, "push", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "the label-only run"], project)
    plots = Path("dvclive") / "seg_train_gt" / "plots" / "metrics"
    assert (project / plots).is_dir() and list((project / plots).iterdir()), "seg_train@gt's plots folder is empty"
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run([*DVC, "remote", "add", "--local", "-d", "store", str(remote)], clone)
    run([*DVC, "pull", "-q"], clone, timeout=TIMEOUT_S)
    status = run([*DVC, "status"], clone)
    assert "deleted" not in status and "changed" not in status and "modified" not in status, status


def stale_stages(project: Path) -> set[str]:
    """The stages ``dvc status`` reports as changed (its ``<stage>:`` lines)."""
    status = run([*DVC, "status"], project)
    return {line.strip().rstrip(":") for line in status.splitlines()
            if line.endswith(":") and not line.startswith(("\t", " "))}


@pytest.mark.slow
def test_replacing_an_external_file_at_the_same_path_makes_its_readers_stale(label_only_chain) -> None:
    """Issue #18, item 5: the dataset source, the CLIP weights, an imported folder, the MCTformer's DeiT init and the
    encoder weights are DVC deps; each is changed in place (same path) and ``dvc status`` must name the stages that
    read it."""
    project, _, _ = label_only_chain
    external = project.parent / "external"
    assert stale_stages(project) == set()
    (external / "clip.pt").write_bytes(b"clip weights v2")
    assert stale_stages(project) == {"clip"}
    (external / "clip.pt").write_bytes(b"clip weights v1")
    (external / "cam_npy" / "a.npy").write_bytes(b"dump v2")
    assert stale_stages(project) == {"cam_infer"}
    (external / "cam_npy" / "a.npy").write_bytes(b"dump v1")
    original_deit = (external / "deit_tiny.pth").read_bytes()
    deit = torch.load(external / "deit_tiny.pth", weights_only=True)
    deit["model"]["cls_token"] += 1.0
    torch.save(deit, external / "deit_tiny.pth")
    assert stale_stages(project) == {"cam_train"}  # cam.arch.pretrained (was no dep: a new DeiT file left it "up to date")
    (external / "deit_tiny.pth").write_bytes(original_deit)
    state = torch.load(external / "resnet18.pth", weights_only=True)
    state["conv1.weight"] += 1.0
    torch.save(state, external / "resnet18.pth")
    assert stale_stages(project) == {"seg_train@pseudo", "seg_train@gt"}
    labels = project.parent / "my_dataset" / "labels.csv"
    labels.write_text(labels.read_text() + "\n")  # the dataset source, one file edited in place
    assert "prepare" in stale_stages(project)


@pytest.fixture(scope="module")
def imported_masks_chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """The same label-only dataset, WeakCLIP trained on an imported folder of pseudo masks (here the synthetic
    generator's masks, copied out), ``cam.source: none``: the CAM stages train and infer nothing."""
    root = tmp_path_factory.mktemp("imported_masks")
    write_label_only_dataset(root / "scratch", root / "my_dataset")
    masks = root / "pseudo_masks_from_elsewhere"
    shutil.copytree(root / "scratch" / "data" / "prepared" / "tiny" / "SegmentationClass", masks)
    project = root / "project"
    build_tiny_project(project, "imported pseudo masks project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"].update(name="custom", source=str(root / "my_dataset"), prepared_dir="data/prepared/mine")
    params["cam"]["source"] = "none"
    params["weakclip"]["seeds"].update(source="mask_folder", mask_folder=str(masks))
    (project / "params.yaml").write_text(params_text(params))
    output = run([*DVC, "repro"], project, timeout=TIMEOUT_S)
    return project, output, masks


@pytest.mark.slow
def test_a_chain_from_imported_pseudo_masks_skips_the_cam_stages(imported_masks_chain) -> None:
    project, output, masks = imported_masks_chain
    assert "not trained: cam.source is 'none'" in (project / "artifacts" / "mctformer" / "not_trained.json").read_text()
    assert not (project / "artifacts" / "mctformer" / "model.pt").exists()
    cam = json.loads((project / "metrics" / "cam.json").read_text())
    assert cam["miou"] is None and cam["not_scored"] == "not scored: no CAMs (cam.source: none)"
    assert cam["n_images"] == 0
    weakclip = json.loads((project / "metrics" / "weakclip.json").read_text())
    assert weakclip["seeds_source"] == "mask_folder" and weakclip["steps"] > 0
    train_ids = (project / "data" / "prepared" / "mine" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(p.stem for p in (project / "data" / "pseudo_masks").glob("*.png")) == sorted(train_ids)
    assert (project / "artifacts" / "seg" / "pseudo" / "model.pt").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert str(masks) in {dep["path"] for dep in lock["weakclip_train"]["deps"]}  # the imported folder is a dep
    # Replacing one imported mask at the same path makes weakclip_train (and what follows) stale.
    first = sorted(masks.iterdir())[0]
    first.write_bytes(first.read_bytes())  # same bytes: still up to date
    assert "weakclip_train" not in run([*DVC, "status"], project)
    with Image.open(first) as picture:
        changed = np.array(picture)
    changed[0, 0] = 255
    Image.fromarray(changed, mode="L").save(first)
    status = run([*DVC, "status"], project)
    assert "weakclip_train" in status and "cam_infer" not in status, status
