"""Issue #7's end-to-end test: the project's real ``dvc.yaml`` run by ``dvc repro`` on a tiny config.

The project is a tmp folder holding copies of ``dvc.yaml``, ``pipeline/`` and
``weakclip_core/`` and a ``params.yaml`` from ``tests/faults/tiny_chain.py``
(32-px synthetic images, 12 train / 4 val, 3 classes, models of a few thousand
weights), made a git + DVC repository. ``dvc repro`` runs the whole chain once
per session (about a minute; ``tiny_chain_project`` in tests/conftest.py); the
tests then check it against references the chain does not produce itself:

- ``dvc.yaml`` (read here as YAML, interpolations resolved by hand) for which
  paths every stage must have written, and ``dvc.lock`` for which it says it did;
- numpy: the pseudo masks' mIoU recomputed from the PNGs and the GT masks;
- the dataset's own split lists and ``labels.json`` for the ids, sizes and classes
  of the pseudo masks and the CAM store;
- DVC's CLI (``dvc repro``, ``dvc status``) for what is up to date and what a
  change of ``seg.model`` re-runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "faults"))

from tiny_chain import params_text, tiny_params, unreadable_final_files  # noqa: E402

from weakclip_core.config import Params  # noqa: E402

DVC = [sys.executable, "-m", "dvc"]
# metrics/ablations_*.json: the committed tables, deps of summary; imports/none: the placeholder path params'
# deps point at
COPIED = ("dvc.yaml", "pipeline", "weakclip_core", "imports/none",
          *sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "metrics").glob("ablations_*.json")))
REPRO_TIMEOUT_S = 1200
SUMMARY_KEYS = {"cam_miou", "weakclip_miou", "pseudo_miou", "seg_pseudo_miou", "seg_gt_miou", "wsss_fsss_ratio"}
# summary key -> (its stage's metrics file, the split that figure must be scored on)
FIGURE_FILES = {
    "cam_miou": ("metrics/cam.json", "train"),
    "weakclip_miou": ("metrics/weakclip.json", "train"),
    "pseudo_miou": ("metrics/pseudo.json", "train"),
    "seg_pseudo_miou": ("metrics/seg_pseudo.json", "val"),
    "seg_gt_miou": ("metrics/seg_gt.json", "val"),
}
UPSTREAM_OF_SEG = ("prepare", "clip", "cam_train", "cam_infer", "weakclip_train", "pseudo_masks")
SEG_AND_AFTER = {"seg_train@pseudo", "seg_train@gt", "seg_eval@pseudo", "seg_eval@gt", "summary"}
INTERPOLATION = re.compile(r"\$\{([^}]+)\}")
LOOP_NAMES = ("key", "item")  # foreach variables, not params


# --------------------------------------------------------------------------- helpers


def tool_env() -> dict[str, str]:
    """git and DVC in the project: the venv's ``python`` first on PATH (dvc.yaml's cmds say ``python``)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        GIT_AUTHOR_NAME="end-to-end test",
        GIT_AUTHOR_EMAIL="e2e@example.invalid",
        GIT_COMMITTER_NAME="end-to-end test",
        GIT_COMMITTER_EMAIL="e2e@example.invalid",
    )
    return env


def run(command: list[str], cwd: Path, timeout: float = 120) -> str:
    completed = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, \
        f"{command} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout + completed.stderr


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """``tree['a']['b']`` for ``'a.b'``; ``KeyError`` naming the key when any level is missing."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def has_key(tree: dict[str, Any], dotted: str) -> bool:
    try:
        lookup(tree, dotted)
    except KeyError:
        return False
    return True


def stage_bodies(dvc_yaml: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each stage's definition (``do`` for a foreach stage), keyed by the name in dvc.yaml."""
    return {name: stage.get("do", stage) for name, stage in dvc_yaml["stages"].items()}


def params_dvc_yaml_names(dvc_yaml_text: str) -> set[str]:
    """Every params key dvc.yaml needs: its ``${...}`` interpolations and its stages' ``params:`` entries."""
    needed = {name for name in INTERPOLATION.findall(dvc_yaml_text) if name.split(".")[0] not in LOOP_NAMES}
    for body in stage_bodies(yaml.safe_load(dvc_yaml_text)).values():
        for entry in body.get("params", []):
            if isinstance(entry, str):
                needed.add(entry)
            else:  # {params file: [keys]}
                for keys in entry.values():
                    needed.update(keys)
    return needed


def project_params(dvc_yaml_text: str) -> dict[str, Any]:
    """The tiny params, plus the typed config's default for any key dvc.yaml names that they lack."""
    params = tiny_params()
    defaults = dataclasses.asdict(Params())
    for dotted in sorted(params_dvc_yaml_names(dvc_yaml_text)):
        if not has_key(params, dotted):
            *parents, leaf = dotted.split(".")
            node = params
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = lookup(defaults, dotted)
    return params


def declared_paths(dvc_yaml: dict[str, Any], params: dict[str, Any]) -> dict[str, set[str]]:
    """``{stage address: {out, metrics and plots paths}}`` resolved by hand from dvc.yaml and the params."""

    def resolve(text: str, loop: dict[str, Any]) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            return resolve(str(lookup(loop, name) if name.split(".")[0] in LOOP_NAMES else lookup(params, name)), loop)

        return INTERPOLATION.sub(value, text)

    def paths(body: dict[str, Any], loop: dict[str, Any]) -> set[str]:
        found = set()
        for section in ("outs", "metrics", "plots"):
            for entry in body.get(section, []):
                found.update(resolve(path, loop) for path in ([entry] if isinstance(entry, str) else entry))
        return found

    declared = {}
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" not in stage:
            declared[name] = paths(stage, {})
            continue
        items = stage["foreach"]
        pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
        for key, item in pairs:
            declared[f"{name}@{key}"] = paths(stage["do"], {"key": key, "item": item})
    return declared


def ran_stages(repro_output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", repro_output))


def lock_stages(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_png(path: Path) -> np.ndarray:
    """(H, W) class indices of a palette / greyscale PNG."""
    with Image.open(path) as picture:
        assert picture.mode in ("P", "L"), f"{path}: mode {picture.mode}, expected a palette or greyscale PNG"
        return np.array(picture)


def numpy_miou(pairs: list[tuple[np.ndarray, np.ndarray]], n_classes: int) -> float:
    """VOC mIoU by hand: one confusion over all images, GT 255 ignored, classes with empty union left out."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for ground_truth, prediction in pairs:
        keep = ground_truth != 255
        np.add.at(confusion, (ground_truth[keep].astype(np.int64), prediction[keep].astype(np.int64)), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    return float(np.mean(true_positive[union > 0] / union[union > 0]))


# --------------------------------------------------------------------------- the project, run once


def build_tiny_project(project: Path, message: str = "tiny end-to-end project") -> dict[str, Any]:
    """A git + DVC repository at ``project`` (created) holding the repo's dvc.yaml and code with the tiny
    params; returns those params. Also used by bench/prefect_overhead.py."""
    project.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, project / name)
    params = project_params((project / "dvc.yaml").read_text())
    (project / "params.yaml").write_text(params_text(params))
    run(["git", "init", "-q"], project)
    run([*DVC, "init", "-q"], project)
    run(["git", "add", "."], project)
    run(["git", "commit", "-q", "-m", message], project)
    return params


@pytest.fixture
def chain(tiny_chain_project: tuple[Path, dict[str, Any], str]) -> tuple[Path, dict[str, Any], str]:
    """(project folder, its params, the first ``dvc repro``'s output) after one full ``dvc repro``: the
    session's ``tiny_chain_project`` (tests/conftest.py), which the multi-machine tests also compare with."""
    return tiny_chain_project


# --------------------------------------------------------------------------- tests


def test_tiny_params_hold_every_key_dvc_yaml_names() -> None:
    dvc_yaml_text = (REPO_ROOT / "dvc.yaml").read_text()
    needed = params_dvc_yaml_names(dvc_yaml_text)
    # The interpolated paths and the stage sections of dvc.yaml at the time of writing must all be found.
    assert {"dataset.prepared_dir", "pseudo.output_dir", "dataset", "clip", "cam.arch", "cam.train", "cam.infer",
            "runtime", "weakclip", "pseudo", "seg.model", "seg.encoder", "seg.train", "seg.eval"} <= needed
    params = project_params(dvc_yaml_text)
    assert [key for key in sorted(needed) if not has_key(params, key)] == []
    # The tiny sizes survive: nothing was filled in from the full-size defaults for these.
    assert lookup(params, "dataset.synthetic.image_size") == 32
    assert lookup(params, "dataset.prepared_dir") == "data/prepared/tiny"


@pytest.mark.slow
def test_every_stage_ran_and_wrote_what_dvc_yaml_declares(chain: tuple[Path, dict[str, Any], str]) -> None:
    project, params, output = chain
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    declared = declared_paths(dvc_yaml, params)
    assert ran_stages(output) == set(declared)
    lock = lock_stages(project)
    assert set(lock) == set(declared)
    for stage, entry in lock.items():
        locked = {out["path"] for out in entry.get("outs", [])}
        assert locked == declared[stage], \
            f"{stage}: dvc.lock outs {sorted(locked)} != dvc.yaml {sorted(declared[stage])}"
        for relative in locked:
            path = project / relative
            assert path.exists(), f"{stage}: {relative} is in dvc.lock but missing"
            if path.is_dir():
                assert any(path.iterdir()), f"{stage}: {relative} is empty"
                # every .json parses, every .png/.pt/.h5/.csv opens (a reader per extension)
                assert unreadable_final_files(path) == []
            elif path.suffix == ".json":
                read_json(path)
            elif path.suffix == ".png":
                with Image.open(path) as picture:
                    picture.load()
            elif path.suffix == ".csv":  # dvc.yaml plots it with x: threshold, y: miou
                rows = [line.split(",") for line in path.read_text().splitlines()]
                assert {"threshold", "miou"} <= set(rows[0]) and len(rows) > 1, relative
                assert all(len(row) == len(rows[0]) for row in rows), relative


@pytest.mark.slow
def test_summary_keys_and_values_from_the_metrics_files(chain: tuple[Path, dict[str, Any], str]) -> None:
    project, _, _ = chain
    summary = read_json(project / "metrics/summary.json")
    assert set(summary) == SUMMARY_KEYS
    for key, value in summary.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, f"{key}: {value!r}"
    figures = {key: read_json(project / relative) for key, (relative, _) in FIGURE_FILES.items()}
    for key, (relative, split) in FIGURE_FILES.items():
        assert summary[key] == figures[key]["miou"], key
        assert figures[key]["split"] == split, relative
    # by hand from the two segmenter metrics files
    assert math.isclose(summary["wsss_fsss_ratio"], figures["seg_pseudo_miou"]["miou"] / figures["seg_gt_miou"]["miou"],
                        rel_tol=1e-12)
    # docs/RESULTS.md renders each mIoU in percent with one decimal and the ratio with three
    results = (project / "docs/RESULTS.md").read_text()
    for key in FIGURE_FILES:
        assert f"| {100 * summary[key]:.1f} |" in results, key
    assert f"| {summary['wsss_fsss_ratio']:.3f} |" in results


@pytest.mark.slow
def test_heldout_scorer_reads_the_chains_model_as_the_stage_scored_it(
        chain: tuple[Path, dict[str, Any], str]) -> None:
    """bench.heldout loads the trained WeakCLIP and its CLIP through DVC and runs its own scoring loop: on the
    train split with the labels given it must reproduce the figure weakclip_train wrote for the same model, and
    over all classes on val (no label help) it is a fraction of its own."""
    from bench.heldout import score_revision

    project, _, _ = chain
    stage_figure = read_json(project / "metrics/weakclip.json")
    on_train = score_revision(project, None, split="train")
    assert on_train.labelled_miou == pytest.approx(stage_figure["miou"], abs=1e-3)
    assert on_train.n_images == stage_figure["n_images"]
    on_val = score_revision(project, None)
    assert on_val.split == "val" and on_val.n_images > 0
    assert on_val.unrestricted_miou is not None and 0.0 <= on_val.unrestricted_miou <= 1.0
    # The text matching map alone (`--map matching`, selection tested in test_heldout): the chain's own model
    # loads and scores through that path too.
    matching = score_revision(project, None, scored_map="matching")
    assert matching.n_images == on_val.n_images and matching.unrestricted_miou is not None
    assert 0.0 <= matching.unrestricted_miou <= 1.0
    with pytest.raises(ValueError, match="scored_map: expected one of logits, matching, got 'cam'"):
        score_revision(project, None, scored_map="cam")


@pytest.mark.slow
def test_pseudo_masks_and_cam_store_match_the_dataset(chain: tuple[Path, dict[str, Any], str]) -> None:
    project, params, _ = chain
    dataset_root = project / params["dataset"]["prepared_dir"]
    train_ids = [line.strip() for line in (dataset_root / "ImageSets/Segmentation/train.txt").read_text().splitlines()
                 if line.strip()]
    assert len(train_ids) == params["dataset"]["synthetic"]["n_train"]
    labels = read_json(dataset_root / "labels.json")
    n_classes = len(labels["class_names"])
    assert n_classes == params["dataset"]["synthetic"]["n_classes"] + 1  # + background

    masks_dir = project / params["pseudo"]["output_dir"]
    assert sorted(path.stem for path in masks_dir.glob("*.png")) == sorted(train_ids)
    pairs = []
    for image_id in train_ids:
        mask = read_png(masks_dir / f"{image_id}.png")
        with Image.open(dataset_root / "JPEGImages" / f"{image_id}.jpg") as image:
            width, height = image.size
        assert mask.shape == (height, width), image_id
        assert set(np.unique(mask).tolist()) <= set(range(n_classes)) | {255}, image_id
        pairs.append((read_png(dataset_root / "SegmentationClass" / f"{image_id}.png"), mask))
    # pseudo.json's mIoU (train split: score_split is empty) recomputed with numpy from the PNGs
    pseudo_metrics = read_json(project / "metrics/pseudo.json")
    assert pseudo_metrics["n_images"] == len(train_ids)
    assert math.isclose(pseudo_metrics["miou"], numpy_miou(pairs, n_classes), rel_tol=1e-9)

    with h5py.File(project / "artifacts/cams/train.h5", "r") as store:
        assert int(store.attrs["complete"]) == 1
        assert json.loads(store.attrs["class_names"]) == labels["class_names"]
        assert sorted(store.keys()) == sorted(train_ids)
        for image_id in train_ids:
            cams = store[image_id]["cams"][()]
            present = [int(c) for c in store[image_id].attrs["classes"]]
            assert present == sorted(labels["labels"][image_id]), image_id
            assert cams.shape == (len(present), *pairs[train_ids.index(image_id)][0].shape), image_id
            assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0, image_id


@pytest.mark.slow
def test_second_repro_is_up_to_date(chain: tuple[Path, dict[str, Any], str]) -> None:
    project, _, _ = chain
    output = run([*DVC, "repro"], project)
    assert "Data and pipelines are up to date" in output
    assert ran_stages(output) == set()
    assert "Data and pipelines are up to date" in run([*DVC, "status"], project)
    assert json.loads(run([*DVC, "status", "--json"], project)) == {}


@pytest.mark.slow
def test_changing_seg_model_reruns_only_the_seg_stages(chain: tuple[Path, dict[str, Any], str],
                                                       tmp_path: Path) -> None:
    source, params, _ = chain
    project = tmp_path / "project"  # a copy, so the other tests see the first run whatever the order
    shutil.copytree(source, project, symlinks=True)
    before = lock_stages(project)
    segformer = json.loads(json.dumps(params))
    segformer["seg"].update(model="segformer", encoder="mit_b0")  # crop 32: a multiple of 32, as SegFormer needs
    (project / "params.yaml").write_text(params_text(segformer))

    # `dvc status` compares each stage with its own dvc.lock entry only: the seg_train stages' `seg.model` and
    # `seg.encoder` params changed, while seg_eval's and summary's deps (the seg artifacts, the metrics files) are still the
    # locked ones until seg_train re-runs. So DVC lists exactly the two seg_train stages, none upstream.
    status = json.loads(run([*DVC, "status", "--json"], project))
    assert set(status) == {"seg_train@pseudo", "seg_train@gt"}
    for stage in status.values():
        assert {"changed deps": {"params.yaml": {"seg.model": "modified", "seg.encoder": "modified"}}} in stage

    # Re-running (about 30 s) shows the cascade: the seg stages and everything after them, nothing before.
    output = run([*DVC, "repro"], project, timeout=REPRO_TIMEOUT_S)
    assert ran_stages(output) == SEG_AND_AFTER
    after = lock_stages(project)
    for stage in UPSTREAM_OF_SEG:
        assert after[stage] == before[stage], stage
    for source_name in ("pseudo", "gt"):
        seg_metrics = read_json(project / f"metrics/seg_{source_name}.json")
        assert (seg_metrics["model"], seg_metrics["encoder"]) == ("segformer", "mit_b0")
    summary = read_json(project / "metrics/summary.json")
    assert set(summary) == SUMMARY_KEYS
    assert math.isclose(summary["wsss_fsss_ratio"], summary["seg_pseudo_miou"] / summary["seg_gt_miou"], rel_tol=1e-12)
    assert json.loads(run([*DVC, "status", "--json"], project)) == {}
