"""Issue #18, item 2 (+ item 6 for seeds): CAMs imported from MCTformer's ``--cam-npy-dir`` dump and pseudo masks
imported from a PNG folder, on fixture trees written here in the reference's formats."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_voc import CLASS_NAMES, _blurred_cam, write_tiny_voc  # noqa: E402

from pipeline.cam_infer import CamInferPaths, infer_cams  # noqa: E402
from pipeline.weakclip_train import imported_seed_masks  # noqa: E402
from weakclip_core.artifacts.cam_store import CamStoreReader  # noqa: E402
from weakclip_core.config import params_from_dict  # noqa: E402
from weakclip_core.config.schema import ConfigError  # noqa: E402
from weakclip_core.data.imports import ImportedSeedError  # noqa: E402
from weakclip_core.data.layout import PreparedDataset, read_mask, write_mask  # noqa: E402


def write_mctformer_dump(dataset: PreparedDataset, folder: Path) -> dict[str, dict[int, np.ndarray]]:
    """One ``<id>.npy`` per train image as the reference's engine.py writes it: ``np.save`` of a dict
    0-based foreground class index -> (H, W) float32 map, min-max normalised, labelled classes only."""
    folder.mkdir(parents=True, exist_ok=True)
    dumps = {}
    for image_id in dataset.split("train"):
        gt = dataset.mask(image_id)
        cam_dict = {}
        for class_index in dataset.labels[image_id]:
            cam = _blurred_cam(gt == class_index).astype(np.float32)
            cam_dict[class_index - 1] = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
        np.save(folder / f"{image_id}.npy", cam_dict)
        dumps[image_id] = cam_dict
    return dumps


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, PreparedDataset]:
    root = tmp_path / "data"
    write_tiny_voc(root, n_train=6, n_val=2, size=32)
    return tmp_path, PreparedDataset.open(root)


def _params(tmp_path: Path, folder: Path) -> object:
    return params_from_dict({"runtime": {"device": "cpu"},
                             "dataset": {"prepared_dir": str(tmp_path / "data")},
                             "cam": {"source": "npy_folder", "npy_folder": str(folder),
                                     "infer": {"threshold_start": 0.0, "threshold_stop": 0.5,
                                               "threshold_step": 0.1}}})


def _paths(tmp_path: Path) -> CamInferPaths:
    return CamInferPaths(model=tmp_path / "absent_model.pt", store=tmp_path / "cams" / "train.h5",
                         metrics=tmp_path / "metrics" / "cam.json", curve=tmp_path / "plots" / "curve.csv")


def test_an_mctformer_dump_goes_into_the_cam_store_and_threshold_curve(tiny) -> None:
    tmp_path, dataset = tiny
    dumps = write_mctformer_dump(dataset, tmp_path / "cam_npy")
    paths = _paths(tmp_path)
    metrics = infer_cams(_params(tmp_path, tmp_path / "cam_npy"), paths, show_progress=False)  # no model needed
    store = CamStoreReader(paths.store)
    for image_id, cam_dict in dumps.items():
        classes, cams = store.read(image_id)
        assert classes == [key + 1 for key in sorted(cam_dict)]
        np.testing.assert_allclose(cams, np.stack([cam_dict[key] for key in sorted(cam_dict)]), atol=1e-3)
    assert metrics["variant"] == "imported" and metrics["source"] == "npy_folder"
    assert metrics["n_images"] == 6 and metrics["threshold_chosen_with_gt"] is True and metrics["miou"] > 0.5
    with paths.curve.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["threshold"] for row in rows] == ["0.0000", "0.1000", "0.2000", "0.3000", "0.4000", "0.5000"]
    assert max(float(row["miou"]) for row in rows) == pytest.approx(metrics["miou"], abs=1e-6)


def _wrong_shape(folder: Path, image_id: str, dump: dict) -> str:
    key = next(iter(dump))
    np.save(folder / f"{image_id}.npy", {**dump, key: np.zeros((5, 7), dtype=np.float32)})
    return f"class {key} map is (5, 7), the image is (32, 32) (H, W)"


def _wrong_keys(folder: Path, image_id: str, dump: dict) -> str:
    extra = next(c for c in range(len(CLASS_NAMES) - 1) if c not in dump)
    np.save(folder / f"{image_id}.npy", {**dump, extra: np.zeros((32, 32), dtype=np.float32)})
    return "but the image's labels are the 0-based classes"


def _an_array_not_a_dict(folder: Path, image_id: str, dump: dict) -> str:
    np.save(folder / f"{image_id}.npy", np.zeros((3, 32, 32), dtype=np.float32))
    return "expected MCTformer's CAM dump"


def _missing(folder: Path, image_id: str, dump: dict) -> str:
    (folder / f"{image_id}.npy").unlink()
    return "CAM dump not found"


def _not_normalised(folder: Path, image_id: str, dump: dict) -> str:
    key = next(iter(dump))
    np.save(folder / f"{image_id}.npy", {**dump, key: (dump[key] * 255).astype(np.uint8)})  # a uint8 CAM
    return "not [0, 1]: MCTformer's dumps are min-max normalised per class"


def _a_key_that_is_not_a_class(folder: Path, image_id: str, dump: dict) -> str:
    np.save(folder / f"{image_id}.npy", {**dump, "high_res": np.zeros((32, 32), dtype=np.float32)})
    return "key 'high_res' is not a 0-based class index"


def _a_map_that_is_not_numbers(folder: Path, image_id: str, dump: dict) -> str:
    key = next(iter(dump))
    np.save(folder / f"{image_id}.npy", {**dump, key: "not a map"})
    return f"class {key} map is not an array of numbers"


@pytest.mark.parametrize("breaker", [_wrong_shape, _wrong_keys, _an_array_not_a_dict, _missing, _not_normalised,
                                     _a_key_that_is_not_a_class, _a_map_that_is_not_numbers])
def test_a_bad_cam_dump_is_one_line_naming_the_file_and_writes_nothing(tiny, breaker) -> None:
    tmp_path, dataset = tiny
    dumps = write_mctformer_dump(dataset, tmp_path / "cam_npy")
    image_id = dataset.split("train")[3]
    words = breaker(tmp_path / "cam_npy", image_id, dumps[image_id])
    paths = _paths(tmp_path)
    with pytest.raises(ImportedSeedError) as caught:
        infer_cams(_params(tmp_path, tmp_path / "cam_npy"), paths, show_progress=False)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "cam_npy" / f"{image_id}.npy")) and words in message
    assert "\n" not in message
    assert not paths.store.exists() and not paths.metrics.exists()
    assert [p.name for p in paths.store.parent.iterdir()] == []  # no temporary left either


def test_npy_folder_needs_a_folder() -> None:
    with pytest.raises(ConfigError, match="cam.npy_folder: required when source is 'npy_folder'"):
        params_from_dict({"cam": {"source": "npy_folder"}})
    with pytest.raises(ConfigError, match="weakclip.seeds.mask_folder: required"):
        params_from_dict({"weakclip": {"seeds": {"source": "mask_folder"}}})


def test_imported_pseudo_masks_are_the_seeds(tiny) -> None:
    tmp_path, dataset = tiny
    folder = tmp_path / "pseudo"
    image_ids = dataset.split("train")
    for image_id in image_ids:
        mask = dataset.mask(image_id).copy()
        mask[0, 0] = 255
        write_mask(folder / f"{image_id}.png", mask)
    seeds = imported_seed_masks(folder, dataset, image_ids, show_progress=False)
    for image_id in image_ids:
        assert seeds[image_id][0, 0] == 255
        np.testing.assert_array_equal(seeds[image_id][1:], dataset.mask(image_id)[1:])


def _masks_of_other_classes(dataset: PreparedDataset, image_ids: list[str], folder: Path) -> list[str]:
    """Write each image's GT mask with its foreground painted in a class the image is not labelled with (the
    lowest such); returns the ids so painted (an image labelled with every class keeps a background mask)."""
    painted = []
    for image_id in image_ids:
        mask = dataset.mask(image_id).copy()
        others = [c for c in range(1, dataset.n_classes) if c not in dataset.image_labels(image_id)]
        foreground = (mask != 0) & (mask != 255)
        mask[foreground] = others[0] if others else 0
        painted += [image_id] if others and foreground.any() else []
        write_mask(folder / f"{image_id}.png", mask)
    return painted


def _masks_off_by_one(dataset: PreparedDataset, image_ids: list[str], folder: Path) -> None:
    """Each image's GT mask with every foreground class k written as k + 1 (wrapping to 1): another class order."""
    for image_id in image_ids:
        mask = dataset.mask(image_id).copy()
        foreground = (mask != 0) & (mask != 255)
        mask[foreground] = mask[foreground] % (dataset.n_classes - 1) + 1
        write_mask(folder / f"{image_id}.png", mask)


@pytest.mark.parametrize("shift", [_masks_of_other_classes, _masks_off_by_one])
def test_masks_in_another_class_order_are_refused_and_a_few_strays_are_said(tiny, capsys, shift) -> None:
    """Imported masks in another class order: every pixel of a class the image is not labelled with became
    unlabelled (255) without a word, so WeakCLIP trained on what was left. Most masks showing such classes (each
    painted in a class its image lacks, or every class off by one, where a shifted class may land on a real label):
    refused, naming the folder and a mask; a few: one warning line on stderr, and those pixels are 255. Only rank 0
    says the warning."""
    tmp_path, dataset = tiny
    folder = tmp_path / "pseudo"
    image_ids = dataset.split("train")
    shift(dataset, image_ids, folder)
    with pytest.raises(ImportedSeedError) as caught:
        imported_seed_masks(folder, dataset, image_ids, show_progress=False)
    message = str(caught.value)
    assert message.startswith(f"weakclip.seeds.mask_folder: {folder}: ") and "\n" not in message
    assert " masks with foreground show classes their image is not labelled with (first: " in message

    for image_id in image_ids[1:]:  # all but the first image's mask agree with the labels again
        write_mask(folder / f"{image_id}.png", dataset.mask(image_id))
    stray = read_mask(folder / f"{image_ids[0]}.png")
    labelled = [0, 255, *dataset.image_labels(image_ids[0])]
    assert not np.isin(stray, labelled).all(), "the first mask shows no stray class: the tiny data changed"
    seeds = imported_seed_masks(folder, dataset, image_ids, show_progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("weakclip_train: warning: 1 of ") and image_ids[0] in err[0], err
    np.testing.assert_array_equal(seeds[image_ids[0]], np.where(np.isin(stray, labelled), stray, 255))
    imported_seed_masks(folder, dataset, image_ids, show_progress=False, say_warnings=False)  # another rank
    assert capsys.readouterr().err == ""


def test_a_pseudo_mask_of_the_wrong_size_names_the_file(tiny) -> None:
    tmp_path, dataset = tiny
    folder = tmp_path / "pseudo"
    image_ids = dataset.split("train")
    for image_id in image_ids:
        write_mask(folder / f"{image_id}.png", dataset.mask(image_id))
    write_mask(folder / f"{image_ids[2]}.png", np.zeros((16, 20), dtype=np.uint8))
    with pytest.raises(ImportedSeedError) as caught:
        imported_seed_masks(folder, dataset, image_ids, show_progress=False)
    assert str(caught.value) == (f"{folder / (image_ids[2] + '.png')}: mask is 20x16 but its image is 32x32 "
                                 "(width x height)")
