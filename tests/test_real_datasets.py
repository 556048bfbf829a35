"""VOC 2012 and COCO 2014 readers on tiny trees written here, checked against hand-built masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.prepare import run
from weakclip_core.config import params_from_dict
from weakclip_core.data.coco import prepare_coco
from weakclip_core.data.layout import DatasetError, PreparedDataset, voc_palette
from weakclip_core.data.voc import VOC_CLASS_NAMES, prepare_voc

# ------------------------------------------------------------------------------------------------ VOC


def _save_jpeg(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _save_palette_png(path: Path, mask: np.ndarray, mode: str = "P") -> None:
    """VOC's palette PNG (mode P) or SBD-aug's greyscale PNG (mode L) of class indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode=mode)
    if mode == "P":
        image.putpalette(voc_palette())
    image.save(path, format="PNG")


VOC_MASKS = {
    "2007_000001": [(slice(2, 8), slice(1, 6), 15), (slice(9, 12), slice(10, 14), 12)],  # person, dog
    "2007_000002": [(slice(0, 5), slice(0, 5), 1)],                                       # aeroplane
    "2007_000003": [(slice(4, 10), slice(4, 12), 7), (slice(3, 4), slice(3, 13), 255)],  # car + ignore
}


def _voc_mask(image_id: str) -> np.ndarray:
    mask = np.zeros((12, 16), dtype=np.uint8)
    for rows, columns, value in VOC_MASKS[image_id]:
        mask[rows, columns] = value
    return mask


def _voc_tree(root: Path, mask_dir: str = "SegmentationClass") -> Path:
    for number, image_id in enumerate(VOC_MASKS):
        _save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", 12, 16, number)
        _save_palette_png(root / mask_dir / f"{image_id}.png", _voc_mask(image_id),
                          "P" if mask_dir == "SegmentationClass" else "L")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("2007_000001\n2007_000002\n")
    (lists / "val.txt").write_text("2007_000003\n")
    return root


def test_voc_tree_is_copied_with_labels_from_masks(tmp_path: Path) -> None:
    source = _voc_tree(tmp_path / "VOC2012")
    out = tmp_path / "prepared"
    splits = prepare_voc(source, out, ["train", "val"], progress=False)
    assert splits == {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    dataset = PreparedDataset.open(out)
    assert dataset.class_names == VOC_CLASS_NAMES and len(VOC_CLASS_NAMES) == 21
    assert dataset.labels == {"2007_000001": [12, 15], "2007_000002": [1], "2007_000003": [7]}
    for image_id in VOC_MASKS:
        assert dataset.image_path(image_id).read_bytes() == (source / "JPEGImages" / f"{image_id}.jpg").read_bytes()
        np.testing.assert_array_equal(dataset.mask(image_id), _voc_mask(image_id))
        assert Image.open(dataset.mask_path(image_id)).mode == "P"


def test_voc_sbd_train_aug_list_beside_the_tree(tmp_path: Path) -> None:
    source = _voc_tree(tmp_path / "VOC2012", mask_dir="SegmentationClassAug")
    (source / "train_aug.txt").write_text("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n"
                                          "/JPEGImages/2007_000003.jpg /SegmentationClassAug/2007_000003.png\n")
    out = tmp_path / "prepared"
    splits = prepare_voc(source, out, ["train_aug", "val"], mask_dir="SegmentationClassAug", progress=False)
    assert splits["train_aug"] == ["2007_000001", "2007_000003"]
    np.testing.assert_array_equal(PreparedDataset.open(out).mask("2007_000003"), _voc_mask("2007_000003"))
    assert Image.open(out / "SegmentationClass" / "2007_000003.png").mode == "P"  # greyscale aug -> palette


def test_voc_split_list_ids_holding_a_dot_are_kept_whole(tmp_path: Path) -> None:
    """A plain id is the whole token: ``frame.0002`` used to become ``frame`` (reading the decoy frame.jpg) and
    ``a.1``, ``a.2`` one id "listed twice". A path or an image file name (any case) still gives its stem."""
    source = _voc_tree(tmp_path / "VOC2012")
    dotted = {"frame.0002": 1, "frame": 2, "a.1": 3, "a.2": 4}  # id -> its only class (frame: the decoy)
    for number, (image_id, class_index) in enumerate(dotted.items()):
        _save_jpeg(source / "JPEGImages" / f"{image_id}.jpg", 12, 16, 10 + number)
        _save_palette_png(source / "SegmentationClass" / f"{image_id}.png", np.full((12, 16), class_index, np.uint8))
    (source / "ImageSets" / "Segmentation" / "train.txt").write_text("frame.0002\na.1\na.2\n")
    (source / "pairs.txt").write_text("/JPEGImages/frame.0002.jpg /SegmentationClass/frame.0002.png\n"
                                      "2007_000001.JPG\na.2.jpeg\n")
    out = tmp_path / "prepared"
    splits = prepare_voc(source, out, ["train", "pairs", "val"], progress=False)
    assert splits == {"train": ["frame.0002", "a.1", "a.2"], "pairs": ["frame.0002", "2007_000001", "a.2"],
                      "val": ["2007_000003"]}
    dataset = PreparedDataset.open(out)
    for image_id in ("frame.0002", "a.1", "a.2"):
        assert dataset.labels[image_id] == [dotted[image_id]]
        assert dataset.image_path(image_id).read_bytes() == (source / "JPEGImages" / f"{image_id}.jpg").read_bytes()
    assert not dataset.image_path("frame").exists()


def _break_missing_dir(source: Path) -> Path:
    for path in (source / "JPEGImages").iterdir():
        path.unlink()
    (source / "JPEGImages").rmdir()
    return source / "JPEGImages"


def _break_absent_image(source: Path) -> Path:
    (source / "JPEGImages" / "2007_000002.jpg").unlink()
    return source / "JPEGImages" / "2007_000002.jpg"


def _break_size(source: Path) -> Path:
    path = source / "SegmentationClass" / "2007_000002.png"
    _save_palette_png(path, np.zeros((12, 15), dtype=np.uint8))
    return path


def _truncate(path: Path, n_bytes: int) -> Path:
    """Cut a file short, as an interrupted download leaves it."""
    path.write_bytes(path.read_bytes()[:n_bytes])
    return path


def _break_jpeg(source: Path) -> Path:
    return _truncate(source / "JPEGImages" / "2007_000001.jpg", 200)


def _break_png(source: Path) -> Path:
    return _truncate(source / "SegmentationClass" / "2007_000003.png", 60)


def _break_class_id(source: Path) -> Path:
    path = source / "SegmentationClass" / "2007_000001.png"
    mask = _voc_mask("2007_000001")
    mask[0, 0] = 30
    _save_palette_png(path, mask)
    return path


def _break_absent_mask(source: Path) -> Path:
    (source / "SegmentationClass" / "2007_000002.png").unlink()
    return source / "SegmentationClass" / "2007_000002.png"


def _break_empty_split(source: Path) -> Path:
    path = source / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text("\n")
    return path


@pytest.mark.parametrize("breaker, words", [
    (_break_missing_dir, "not found"), (_break_absent_image, "absent"), (_break_size, "12"),
    (_break_jpeg, "unreadable image"), (_break_png, "unreadable mask"), (_break_class_id, "class id 30"),
    (_break_empty_split, "empty"),
    (_break_absent_mask, "GT mask of image 2007_000002 (listed in split 'train') not found in dataset.voc_mask_dir "
                         "'SegmentationClass'; train_aug's images need SBD's SegmentationClassAug")])
def test_voc_bad_input_names_the_file(tmp_path: Path, breaker, words: str) -> None:
    source = _voc_tree(tmp_path / "VOC2012")
    bad_path = breaker(source)
    with pytest.raises(DatasetError) as caught:
        prepare_voc(source, tmp_path / "prepared", ["train", "val"], progress=False)
    assert str(bad_path) in str(caught.value)
    assert words in str(caught.value)


def test_failed_prepare_keeps_the_previous_prepared_folder(tmp_path: Path) -> None:
    source = _voc_tree(tmp_path / "VOC2012")
    prepared_dir = tmp_path / "prepared"
    params = params_from_dict({"dataset": {"name": "voc", "source": str(source), "prepared_dir": str(prepared_dir)}})
    run(params, preview_path=tmp_path / "preview.png", progress=False)
    before = {p.relative_to(prepared_dir): p.read_bytes() for p in prepared_dir.rglob("*") if p.is_file()}
    assert len(before) == 1 + 3 + 3 + 2  # labels.json, 3 images, 3 masks, 2 split lists
    _break_png(source)
    with pytest.raises(DatasetError, match="2007_000003.png"):
        run(params, preview_path=tmp_path / "preview.png", progress=False)
    after = {p.relative_to(prepared_dir): p.read_bytes() for p in prepared_dir.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOC2012", "prepared", "preview.png"]  # no temp left


# ------------------------------------------------------------------------------------------------ COCO

CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]  # ids with gaps, unsorted


def _rectangle(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """A COCO polygon covering columns x0..x1-1 and rows y0..y1-1 (pycocotools' rasterisation)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run_length = [], 0, 0
    for value in flat:
        if value == current:
            run_length += 1
        else:
            counts.append(run_length)
            current, run_length = value, 1
    counts.append(run_length)
    return {"counts": counts, "size": list(mask.shape)}


def _coco_tree(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two train images and one val image; returns the hand-computed semantic masks."""
    height, width = 10, 12
    crowd = np.zeros((height, width), dtype=np.uint8)
    crowd[6:10, 0:6] = 1
    train_annotations = [
        # image 1: a big person (class 1), a small car on it (class 3), a crowd of dogs partly under the car
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rectangle(1, 1, 9, 8), "area": 56.0,
         "bbox": [1, 1, 8, 7], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "segmentation": _rectangle(3, 5, 6, 8), "area": 9.0,
         "bbox": [3, 5, 3, 3], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 18, "segmentation": _uncompressed_rle(crowd), "area": 24.0,
         "bbox": [0, 6, 6, 4], "iscrowd": 1},
        # image 2: one dog (COCO ids 1, 3, 18 sorted -> classes 1, 2, 3, so dog is class 3)
        {"id": 4, "image_id": 2, "category_id": 18, "segmentation": _rectangle(0, 0, 4, 3), "area": 12.0,
         "bbox": [0, 0, 4, 3], "iscrowd": 0},
    ]
    expected_one = np.zeros((height, width), dtype=np.uint8)
    expected_one[6:10, 0:6] = 255
    expected_one[1:8, 1:9] = 1
    expected_one[5:8, 3:6] = 2
    expected_two = np.zeros((height, width), dtype=np.uint8)
    expected_two[0:3, 0:4] = 3
    expected_val = np.zeros((height, width), dtype=np.uint8)
    expected_val[2:4, 2:10] = 2
    files = {"train2014": [(1, "COCO_train2014_000000000001.jpg"), (2, "COCO_train2014_000000000002.jpg")],
             "val2014": [(7, "COCO_val2014_000000000007.jpg")]}
    annotations = {"train2014": train_annotations,
                   "val2014": [{"id": 9, "image_id": 7, "category_id": 3, "segmentation": _rectangle(2, 2, 10, 4),
                                "area": 16.0, "bbox": [2, 2, 8, 2], "iscrowd": 0}]}
    for folder, images in files.items():
        for number, (identifier, file_name) in enumerate(images):
            _save_jpeg(root / folder / file_name, height, width, identifier + number)
        document = {"images": [{"id": i, "file_name": f, "height": height, "width": width} for i, f in images],
                    "annotations": annotations[folder], "categories": CATEGORIES}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(document))
    masks = {"COCO_train2014_000000000001": expected_one, "COCO_train2014_000000000002": expected_two,
             "COCO_val2014_000000000007": expected_val}
    return root, masks


def test_coco_masks_match_hand_computed_with_contiguous_ids(tmp_path: Path) -> None:
    source, expected = _coco_tree(tmp_path / "coco")
    out = tmp_path / "prepared"
    splits = prepare_coco(source, out, ["train", "val"], progress=False)
    assert splits == {"train": ["COCO_train2014_000000000001", "COCO_train2014_000000000002"],
                      "val": ["COCO_val2014_000000000007"]}
    dataset = PreparedDataset.open(out)
    assert dataset.class_names == ["background", "person", "car", "dog"]
    labels_file = json.loads((out / "labels.json").read_text())
    assert labels_file["coco_category_ids"] == [None, 1, 3, 18]
    for image_id, mask in expected.items():
        np.testing.assert_array_equal(dataset.mask(image_id), mask)
        assert dataset.labels[image_id] == sorted(set(np.unique(mask).tolist()) - {0, 255})
    assert dataset.labels["COCO_train2014_000000000001"] == [1, 2]  # the crowd of dogs is ignore, not a label


def test_coco_images_with_nothing_to_learn_are_left_out_of_train_and_said(tmp_path: Path) -> None:
    """An image with no annotation, and one whose only annotation is a crowd (painted 255), carry no class: they
    leave the train split (val keeps every image, as MCTformer's coco/val_id.txt lists all 40,504), and the
    summary says how many, where it used to say nothing."""
    source, _ = _coco_tree(tmp_path / "coco")
    document_path = source / "annotations" / "instances_train2014.json"
    document = json.loads(document_path.read_text())
    for identifier, file_name in ((3, "COCO_train2014_000000000003.jpg"), (4, "COCO_train2014_000000000004.jpg")):
        _save_jpeg(source / "train2014" / file_name, 10, 12, identifier)
        document["images"].append({"id": identifier, "file_name": file_name, "height": 10, "width": 12})
    crowd = np.zeros((10, 12), dtype=np.uint8)
    crowd[0:5, 0:5] = 1
    document["annotations"].append({"id": 20, "image_id": 4, "category_id": 1, "segmentation": _uncompressed_rle(crowd),
                                    "area": 25.0, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    document_path.write_text(json.dumps(document))
    dataset = {"name": "coco", "source": str(source), "prepared_dir": str(tmp_path / "prepared")}
    summary = run(params_from_dict({"dataset": dataset}), preview_path=tmp_path / "preview.png", progress=False)
    assert summary.split_counts == {"train": 2, "val": 1}
    assert summary.left_out == ("COCO_train2014_000000000003", "COCO_train2014_000000000004")
    assert summary.left_out_line() == ("left out: 2 image(s) with no class label (nothing annotated, or only crowd / "
                                       "ignore regions: nothing for a weakly supervised model to learn from), e.g. "
                                       "COCO_train2014_000000000003")


def test_a_coco_subset_for_a_smoke_run_prepares_its_images_as_the_full_tree_does(tmp_path: Path) -> None:
    """COCO has no split lists to shorten: ``python -m weakclip_core.data.coco subset`` writes a tree of the first
    images of each split. Prepared, it holds those images with the full tree's masks and all the classes."""
    from weakclip_core.data.coco import main as coco_main

    source, expected = _coco_tree(tmp_path / "coco")
    coco_main(["subset", str(source), str(tmp_path / "small"), "--images", "1"])
    splits = prepare_coco(tmp_path / "small", tmp_path / "prepared", ["train", "val"], progress=False)
    assert splits == {"train": ["COCO_train2014_000000000001"], "val": ["COCO_val2014_000000000007"]}
    dataset = PreparedDataset.open(tmp_path / "prepared")
    assert dataset.class_names == ["background", "person", "car", "dog"]
    for image_id in ("COCO_train2014_000000000001", "COCO_val2014_000000000007"):
        np.testing.assert_array_equal(dataset.mask(image_id), expected[image_id])
    with pytest.raises(SystemExit):  # the folder is not empty now
        coco_main(["subset", str(source), str(tmp_path / "small"), "--images", "1"])


def _coco_break_category(source: Path) -> Path:
    path = source / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    document["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(document))
    return path


def _coco_break_absent_image(source: Path) -> Path:
    path = source / "train2014" / "COCO_train2014_000000000002.jpg"
    path.unlink()
    return path


def _coco_break_size(source: Path) -> Path:
    path = source / "train2014" / "COCO_train2014_000000000001.jpg"
    _save_jpeg(path, 10, 13, 0)
    return path


def _coco_break_jpeg(source: Path) -> Path:
    return _truncate(source / "val2014" / "COCO_val2014_000000000007.jpg", 150)


def _coco_break_empty(source: Path) -> Path:
    path = source / "annotations" / "instances_val2014.json"
    document = json.loads(path.read_text())
    document["images"], document["annotations"] = [], []
    path.write_text(json.dumps(document))
    return path


def _coco_break_missing_annotations(source: Path) -> Path:
    path = source / "annotations" / "instances_val2014.json"
    path.unlink()
    return path


def _coco_break_missing_dir(source: Path) -> Path:
    path = source / "val2014"
    for file in path.iterdir():
        file.unlink()
    path.rmdir()
    return path


def _coco_break_repeated_file(source: Path) -> Path:
    """A second images entry naming the same file: its (absent) annotations replaced the first's mask and
    labels, and the image was left out as unlabelled without a word."""
    path = source / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    document["images"].append({**document["images"][0], "id": 99})
    path.write_text(json.dumps(document))
    return path


def _coco_break_same_stem(source: Path) -> Path:
    """A second image whose file differs only in its suffix: both became the prepared id
    COCO_train2014_000000000001, the later's pixels, mask and labels silently replacing the first's."""
    path = source / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    twin = source / "train2014" / "COCO_train2014_000000000001.png"
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(twin)
    document["images"].append({**document["images"][0], "id": 5, "file_name": "COCO_train2014_000000000001.png"})
    path.write_text(json.dumps(document))
    return path


def _coco_break_empty_polygon(source: Path) -> Path:
    path = source / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    polygon = next(a for a in document["annotations"] if isinstance(a["segmentation"], list))
    polygon["segmentation"] = [[]]  # pycocotools raises a bare Exception("input type is not supported.")
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("breaker, words", [
    (_coco_break_category, "category_id 99"), (_coco_break_absent_image, "absent"),
    (_coco_break_size, "image is 13x10"),
    (_coco_break_jpeg, "unreadable image"), (_coco_break_empty, "empty"),
    (_coco_break_missing_annotations, "not found"), (_coco_break_missing_dir, "not found"),
    (_coco_break_repeated_file, "both name the file COCO_train2014_000000000001.jpg"),
    (_coco_break_same_stem, "images 1 (COCO_train2014_000000000001.jpg) and 5 (COCO_train2014_000000000001.png) "
                            "share the file stem COCO_train2014_000000000001"),
    (_coco_break_empty_polygon, "undecodable segmentation")])
def test_coco_bad_input_names_the_file(tmp_path: Path, breaker, words: str) -> None:
    source, _ = _coco_tree(tmp_path / "coco")
    bad_path = breaker(source)
    with pytest.raises(DatasetError) as caught:
        prepare_coco(source, tmp_path / "prepared", ["train", "val"], progress=False)
    assert str(bad_path) in str(caught.value)
    assert words in str(caught.value)


def test_coco_one_file_stem_in_both_splits_is_refused_naming_both_annotation_files(tmp_path: Path) -> None:
    """train2014/x.jpg and val2014/x.jpg (a COCO-format export of one's own data) are one prepared image id: the
    val image's pixels, mask and labels replaced the train image's without a word."""
    source, _ = _coco_tree(tmp_path / "coco")
    val_path = source / "annotations" / "instances_val2014.json"
    document = json.loads(val_path.read_text())
    _save_jpeg(source / "val2014" / "COCO_train2014_000000000002.jpg", 10, 12, 50)
    document["images"].append({"id": 8, "file_name": "COCO_train2014_000000000002.jpg", "height": 10, "width": 12})
    val_path.write_text(json.dumps(document))
    with pytest.raises(DatasetError) as caught:
        prepare_coco(source, tmp_path / "prepared", ["train", "val"], progress=False)
    train_path = source / "annotations" / "instances_train2014.json"
    assert str(caught.value) == (f"{val_path}: images 2 (COCO_train2014_000000000002.jpg in {train_path}) and 8 "
                                 "(COCO_train2014_000000000002.jpg) share the file stem COCO_train2014_000000000002, "
                                 "the prepared image id; the second's image, mask and labels would replace the "
                                 "first's (rename one file)")


def test_coco_string_image_ids_are_read_as_pycocotools_reads_them(tmp_path: Path) -> None:
    """A COCO-format export may give ``"id": "img7"``; ``int()`` of it stopped prepare and the subset tool with a
    bare ValueError. Integer ids come first in numeric order (digit strings with them), then the rest by text."""
    from weakclip_core.data.coco import main as coco_main

    source, expected = _coco_tree(tmp_path / "coco")
    path = source / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    new_id = {1: "img-a", 2: 40}  # image 1 (person, car, crowd) gets a string id; image 2 (dog) stays an integer
    for image in document["images"]:
        image["id"] = new_id[image["id"]]
    for annotation in document["annotations"]:
        annotation["image_id"] = new_id[annotation["image_id"]]
    path.write_text(json.dumps(document))

    splits = prepare_coco(source, tmp_path / "prepared", ["train", "val"], progress=False)
    assert splits["train"] == ["COCO_train2014_000000000002", "COCO_train2014_000000000001"]
    dataset = PreparedDataset.open(tmp_path / "prepared")
    for image_id, mask in expected.items():
        np.testing.assert_array_equal(dataset.mask(image_id), mask)
    coco_main(["subset", str(source), str(tmp_path / "small"), "--images", "1"])
    subset = json.loads((tmp_path / "small" / "annotations" / "instances_train2014.json").read_text())
    assert [image["id"] for image in subset["images"]] == [40]
    assert {annotation["image_id"] for annotation in subset["annotations"]} == {40}
    from weakclip_core.data.coco import image_order

    ordered = sorted([{"id": "img7"}, {"id": 10}, {"id": "9"}, {"id": "b"}, {"id": 2}], key=image_order)
    assert [info["id"] for info in ordered] == [2, "9", 10, "b", "img7"]


# ------------------------------------------------------------------------------------------------ score split


def test_voc_prepare_writes_the_score_split_inside_train_aug(tmp_path: Path) -> None:
    """``dataset.score_split: train`` with ``train_split: train_aug``: both lists land in the prepared folder;
    a score split with an image outside the train split is refused, naming its list."""
    source = _voc_tree(tmp_path / "VOC2012", mask_dir="SegmentationClassAug")
    (source / "train_aug.txt").write_text("2007_000001\n2007_000002\n")
    (source / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000002\n")
    prepared_dir = tmp_path / "prepared"
    dataset = {"name": "voc", "source": str(source), "prepared_dir": str(prepared_dir),
               "voc_mask_dir": "SegmentationClassAug", "train_split": "train_aug", "score_split": "train"}
    run(params_from_dict({"dataset": dataset}), preview_path=tmp_path / "preview.png", progress=False)
    prepared = PreparedDataset.open(prepared_dir)
    assert prepared.split("train_aug") == ["2007_000001", "2007_000002"]
    assert prepared.scored_ids("train_aug", "train") == ["2007_000002"]

    (source / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000002\n2007_000003\n")  # 3 is val
    with pytest.raises(DatasetError) as refused:
        run(params_from_dict({"dataset": dataset}), preview_path=tmp_path / "preview.png", progress=False)
    # The keys and the source, not the staging copy prepare deletes as it stops (it used to name .../.err.*.tmp/...).
    assert str(refused.value) == (f"dataset.score_split 'train' must lie inside dataset.train_split 'train_aug' "
                                  f"(their lists in {source}): 1 image(s) of score split 'train' are not in train "
                                  "split 'train_aug', e.g. 2007_000003")

    # A stage reading a prepared folder whose lists were edited by hand names the keys and that folder's lists.
    lists = prepared_dir / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("2007_000002\n2007_000009\n")
    with pytest.raises(DatasetError) as refused:
        PreparedDataset.open(prepared_dir).scored_ids("train_aug", "train")
    assert str(refused.value) == (f"dataset.score_split 'train' must lie inside dataset.train_split 'train_aug' "
                                  f"(their lists in {lists}): 1 image(s) of score split 'train' are not in train "
                                  "split 'train_aug', e.g. 2007_000009")


def test_synthetic_prepare_refuses_a_score_split_outside_train_naming_the_generator(tmp_path: Path) -> None:
    """``dataset.score_split: val`` on the synthetic set: refused before anything is written, the message naming
    the generator (it named ``imports/none``, the unset ``dataset.source``, as if the lists were there)."""
    from tests.faults.tiny_chain import tiny_params

    params = tiny_params(0, {"dataset": {"prepared_dir": str(tmp_path / "prepared"), "score_split": "val"}})
    with pytest.raises(DatasetError) as refused:
        run(params_from_dict(params), preview_path=tmp_path / "preview.png", progress=False)
    assert str(refused.value).startswith("dataset.score_split 'val' must lie inside dataset.train_split 'train' "
                                         "(their lists in the synthetic generator's output: its train and val are "
                                         "disjoint): 4 image(s) of score split 'val' are not in train split 'train'")
    assert not (tmp_path / "prepared").exists()


SCORE_IDS = ["train_001", "train_004", "train_006"]


@pytest.fixture(scope="module")
def scored_on_a_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project trained on ``train_aug`` (8 images) and scored on ``train`` (3 of them), the VOC
    arrangement: cam_train, cam_infer, weakclip_train and pseudo_masks run through their ``main``."""
    import os

    import torch

    from pipeline import cam_infer, cam_train, pseudo_masks, weakclip_train
    from tests.faults.tiny_chain import TINY_PARAMS, params_text, tiny_params
    from tiny_voc import write_tiny_voc
    from weakclip_core.models.clip import build_clip, save_clip_artifact
    from weakclip_core.config import ClipConfig, build_dataclass
    from weakclip_core.data.layout import write_split

    project = tmp_path_factory.mktemp("score_split")
    write_tiny_voc(project / "data", n_train=8, n_val=4, size=32, cam_path=project / "artifacts/cams/train.h5")
    write_split(project / "data", "train_aug", [f"train_{index:03d}" for index in range(8)])
    write_split(project / "data", "train", SCORE_IDS)
    params = tiny_params(0, {"dataset": {"prepared_dir": "data", "train_split": "train_aug", "score_split": "train"},
                             "pseudo": {"output_dir": "pseudo_masks"}})
    (project / "params.yaml").write_text(params_text(params))
    clip_cfg = build_dataclass(ClipConfig, {"source": "random", "arch": dict(TINY_PARAMS["clip"]["arch"])})
    torch.manual_seed(0)
    save_clip_artifact(project / "artifacts/clip", build_clip(clip_cfg), clip_cfg)
    previous = Path.cwd()
    os.chdir(project)
    try:
        for stage in (cam_train, cam_infer, weakclip_train, pseudo_masks):
            stage.main(["--params", "params.yaml"])
    finally:
        os.chdir(previous)
    return project


def _miou(pairs: list[tuple[np.ndarray, np.ndarray]], n_classes: int) -> float:
    from weakclip_core.evaluation.metrics import confusion_matrix, iou_report
    return iou_report(sum(confusion_matrix(gt, prediction, n_classes) for gt, prediction in pairs)).miou


@pytest.mark.slow
def test_pseudo_masks_are_made_for_train_aug_and_scored_on_train_only(scored_on_a_subset: Path) -> None:
    from weakclip_core.data.layout import read_mask

    project = scored_on_a_subset
    dataset = PreparedDataset.open(project / "data")
    metrics = json.loads((project / "metrics/pseudo.json").read_text())
    assert metrics["split"] == "train" and metrics["predicted_split"] == "train_aug"
    assert metrics["n_images"] == 8 and metrics["n_scored"] == 3
    masks = {image_id: read_mask(project / "pseudo_masks" / f"{image_id}.png")
             for image_id in dataset.split("train_aug")}
    assert len(masks) == 8  # every train_aug image has its pseudo mask
    on_subset = _miou([(dataset.mask(i), masks[i]) for i in SCORE_IDS], dataset.n_classes)
    on_all = _miou([(dataset.mask(i), masks[i]) for i in masks], dataset.n_classes)
    assert metrics["miou"] == pytest.approx(on_subset, abs=1e-12)
    assert abs(on_all - on_subset) > 1e-3  # the subset is a real restriction here


@pytest.mark.slow
def test_cam_and_weakclip_scores_are_on_the_score_split_only(scored_on_a_subset: Path) -> None:
    """cam_infer stores CAMs of all 8 train_aug images but scores the 3 ``train`` ones: its mIoU equals a
    hand-made one over those ids from the stored CAMs at its best threshold (float16 storage moves at most
    a few pixels across the threshold, hence the tolerance); weakclip_train scores the same 3."""
    from weakclip_core.artifacts.cam_store import CamStoreReader

    project = scored_on_a_subset
    dataset = PreparedDataset.open(project / "data")
    cam = json.loads((project / "metrics/cam.json").read_text())
    assert cam["split"] == "train" and cam["predicted_split"] == "train_aug" and cam["n_images"] == 3
    store = CamStoreReader(project / "artifacts/cams/train.h5")
    assert all(image_id in store for image_id in dataset.split("train_aug"))

    def seed_at(image_id: str) -> np.ndarray:
        classes, cams = store.read(image_id)
        cams = cams.astype(np.float64)
        return np.where(cams.max(axis=0) > cam["best_threshold"], np.asarray(classes)[cams.argmax(axis=0)], 0)

    on_subset = _miou([(dataset.mask(i), seed_at(i)) for i in SCORE_IDS], dataset.n_classes)
    on_all = _miou([(dataset.mask(i), seed_at(i)) for i in dataset.split("train_aug")], dataset.n_classes)
    assert cam["miou"] == pytest.approx(on_subset, abs=2e-3)  # (equal to the last bit on this data)
    assert abs(on_all - on_subset) > 1e-2  # scoring all 8 would be told apart (0.013 here)
    weakclip = json.loads((project / "metrics/weakclip.json").read_text())
    assert weakclip["split"] == "train" and weakclip["n_images"] == 3
