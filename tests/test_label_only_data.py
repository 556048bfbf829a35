"""Issue #18, item 1 (+ item 6 for labels): label-only datasets on fixture trees written here, one in each
real format: VOC with MCTformer's ``cls_labels.npy`` (a pickled dict id -> 20 float32, as the file in
xulianuwa/MCTformer ``voc12/cls_labels.npy``) and the plain custom layout with ``labels.csv`` /
``labels.json``; GT masks present for some images only, or none."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.prepare import ground_truth_line, run
from weakclip_core.config import params_from_dict
from weakclip_core.data.labels_only import prepare_custom, read_cls_labels_npy
from weakclip_core.data.layout import DatasetError, PreparedDataset, voc_palette
from weakclip_core.data.voc import VOC_CLASS_NAMES, prepare_voc

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (12, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path, format="PNG")


def _cls_labels_npy(path: Path, labels: dict[str, list[int]]) -> Path:
    """MCTformer's format: ``np.save`` of a dict id -> float32 multi-hot over the 20 foreground classes."""
    data = {}
    for image_id, classes in labels.items():
        vector = np.zeros(20, dtype=np.float32)
        vector[[c - 1 for c in classes]] = 1.0
        data[image_id] = vector
    np.save(path, data)
    return path


VOC_LABELS = {"2007_000001": [12, 15], "2007_000002": [1], "2007_000003": [7], "2008_000004": [3, 20]}


def _voc_label_only_tree(root: Path) -> Path:
    """JPEGs of four images, a GT mask for one of them only (the other three are label-only)."""
    for number, image_id in enumerate(VOC_LABELS):
        _jpeg(root / "JPEGImages" / f"{image_id}.jpg", number)
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[2:6, 3:9] = 7
    _palette_png(root / "SegmentationClass" / "2007_000003.png", mask)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000001\n2007_000002\n2008_000004\n")
    (lists / "val.txt").write_text("2007_000003\n")
    return root


def test_the_reference_cls_labels_format_reads_as_class_indices(tmp_path: Path) -> None:
    path = _cls_labels_npy(tmp_path / "cls_labels.npy", VOC_LABELS)
    loaded = np.load(path, allow_pickle=True)
    assert loaded.shape == () and loaded.dtype == object  # the reference's 0-d object array
    assert read_cls_labels_npy(path, 20) == VOC_LABELS


def test_irns_integer_keys_read_as_voc_ids(tmp_path: Path) -> None:
    """IRN's cls_labels.npy (and its descendants') key each image by the integer of its id without the underscore
    (2007000001 for 2007_000001): read as the same labels; an integer of another length is refused naming it."""
    path = tmp_path / "irn_cls_labels.npy"
    vectors = np.load(_cls_labels_npy(tmp_path / "ours.npy", VOC_LABELS), allow_pickle=True).item()
    np.save(path, {int(image_id.replace("_", "")): vector for image_id, vector in vectors.items()})
    assert read_cls_labels_npy(path, 20) == VOC_LABELS
    np.save(path, {2007001: vectors["2007_000001"]})
    with pytest.raises(DatasetError, match=r"irn_cls_labels.npy: integer key 2007001 is not IRN's encoding"):
        read_cls_labels_npy(path, 20)


def test_voc_with_cls_labels_keeps_images_without_gt(tmp_path: Path) -> None:
    source = _voc_label_only_tree(tmp_path / "VOC2012")
    labels_file = _cls_labels_npy(tmp_path / "cls_labels.npy", {**VOC_LABELS, "2011_999999": [5]})  # extra: ignored
    prepared_dir = tmp_path / "prepared"
    params = params_from_dict({"dataset": {"name": "voc", "source": str(source), "prepared_dir": str(prepared_dir),
                                           "voc_cls_labels": str(labels_file)}})
    run(params, preview_path=tmp_path / "preview.png", progress=False)
    dataset = PreparedDataset.open(prepared_dir)
    assert dataset.class_names == VOC_CLASS_NAMES
    assert dataset.labels == VOC_LABELS
    assert dataset.split("train") == ["2007_000001", "2007_000002", "2008_000004"]
    assert [image_id for image_id in VOC_LABELS if dataset.has_mask(image_id)] == ["2007_000003"]
    assert (prepared_dir / "SegmentationClass").is_dir()
    assert ground_truth_line(params, dataset) == "GT masks: 1 of 4 images"


def test_a_missing_mask_folder_beside_cls_labels_is_said_at_prepare(tmp_path: Path) -> None:
    """With cls_labels.npy a mask is optional, so `voc_mask_dir: SegmentationClassAug` on a tree without SBD's
    masks prepares fine and no figure is ever scored: prepare's summary says so at once, naming the folder."""
    source = _voc_label_only_tree(tmp_path / "VOC2012")
    labels_file = _cls_labels_npy(tmp_path / "cls_labels.npy", VOC_LABELS)
    params = params_from_dict({"dataset": {"name": "voc", "source": str(source), "voc_cls_labels": str(labels_file),
                                           "prepared_dir": str(tmp_path / "prepared"),
                                           "voc_mask_dir": "SegmentationClassAug"}})
    run(params, preview_path=tmp_path / "preview.png", progress=False)
    assert ground_truth_line(params, PreparedDataset.open(tmp_path / "prepared")) == (
        f"GT masks: 0 of 4 images ({source / 'SegmentationClassAug'} not found: dataset.voc_mask_dir): every score "
        "downstream will say 'not scored: no GT'")


@pytest.mark.parametrize("vector, words", [(np.ones(21, dtype=np.float32), "shape (21,)"),
                                            (np.full(20, 0.5, dtype=np.float32), "0 or 1")])
def test_a_cls_labels_entry_of_the_wrong_shape_names_the_file_and_image(tmp_path: Path, vector, words) -> None:
    path = tmp_path / "cls_labels.npy"
    np.save(path, {"2007_000001": np.zeros(20, dtype=np.float32), "2007_000002": vector})
    with pytest.raises(DatasetError) as caught:
        read_cls_labels_npy(path, 20)
    assert str(path) in str(caught.value) and "2007_000002" in str(caught.value) and words in str(caught.value)


def test_a_listed_voc_image_without_cls_labels_names_the_labels_file(tmp_path: Path) -> None:
    source = _voc_label_only_tree(tmp_path / "VOC2012")
    labels = dict(VOC_LABELS)
    del labels["2008_000004"]
    labels_file = _cls_labels_npy(tmp_path / "cls_labels.npy", labels)
    with pytest.raises(DatasetError) as caught:
        prepare_voc(source, tmp_path / "prepared", ["train", "val"], progress=False,
                    image_labels=read_cls_labels_npy(labels_file, 20), image_labels_file=labels_file)
    assert str(caught.value) == f"{labels_file}: no labels for image 2008_000004 (listed in split 'train')"


# ------------------------------------------------------------------------------------------------ custom

CUSTOM_CLASSES = ["kiwi", "lime", "plum"]
CUSTOM_LABELS = {"a1": ["kiwi"], "a2": ["lime", "plum"], "a3": ["plum"], "b1": ["kiwi", "lime"], "b2": []}


def write_custom_tree(root: Path, labels: dict[str, list[str]] = CUSTOM_LABELS, fmt: str = "csv",
                      masks: dict[str, np.ndarray] | None = None, train: tuple[str, ...] = ("a1", "a2", "a3"),
                      val: tuple[str, ...] = ("b1", "b2"), size: tuple[int, int] = (12, 16)) -> Path:
    """The plain layout of README "Your own data"; ``a2`` is a PNG image, the others JPEGs."""
    for number, image_id in enumerate(labels):
        if image_id == "a2":
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((*size, 3), 90, dtype=np.uint8)).save(root / "images" / "a2.png")
        else:
            _jpeg(root / "images" / f"{image_id}.jpg", number, size)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in CUSTOM_CLASSES))
    if fmt == "csv":
        (root / "labels.csv").write_text("image_id,classes\n" + "".join(
            f"{image_id},{';'.join(names)}\n" for image_id, names in labels.items()))
    else:
        (root / "labels.json").write_text(json.dumps(labels))
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (root / "splits" / "val.txt").write_text("".join(f"{i}\n" for i in val))
    for image_id, mask in (masks or {}).items():
        _palette_png(root / "masks" / f"{image_id}.png", mask)
    return root


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_custom_layout_in_both_label_formats(tmp_path: Path, fmt: str) -> None:
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[1:5, 2:9] = 1
    source = write_custom_tree(tmp_path / "mine", fmt=fmt, masks={"b1": mask})
    prepared = tmp_path / "prepared"
    splits = prepare_custom(source, prepared, ["train", "val"], drop_unlabelled_from=("train",), progress=False)
    assert splits == {"train": ["a1", "a2", "a3"], "val": ["b1", "b2"]}
    dataset = PreparedDataset.open(prepared)
    assert dataset.class_names == ["background", *CUSTOM_CLASSES]
    assert dataset.labels == {"a1": [1], "a2": [2, 3], "a3": [3], "b1": [1, 2], "b2": []}
    assert dataset.image("a2").shape == (12, 16, 3)  # the PNG image became a JPEG of the same size
    assert [i for i in dataset.labels if dataset.has_mask(i)] == ["b1"]
    np.testing.assert_array_equal(dataset.mask("b1"), mask)


def test_camera_suffixes_in_upper_case_are_read(tmp_path: Path) -> None:
    """``IMG.JPG`` and ``mask.PNG`` (cameras, Windows exports) are the images and masks of their ids, not "absent"
    and "no GT": the prepared JPEG is the source file's bytes, the mask its pixels."""
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[3:9, 4:12] = 2
    source = write_custom_tree(tmp_path / "mine")
    (source / "images" / "a1.jpg").rename(source / "images" / "a1.JPG")
    _palette_png(source / "masks" / "b1.PNG", mask)
    prepared = tmp_path / "prepared"
    prepare_custom(source, prepared, ["train", "val"], progress=False)
    assert (prepared / "JPEGImages" / "a1.jpg").read_bytes() == (source / "images" / "a1.JPG").read_bytes()
    dataset = PreparedDataset.open(prepared)
    assert [i for i in dataset.labels if dataset.has_mask(i)] == ["b1"]
    np.testing.assert_array_equal(dataset.mask("b1"), mask)


def test_custom_without_any_mask_prepares_through_the_stage(tmp_path: Path) -> None:
    source = write_custom_tree(tmp_path / "mine")
    prepared_dir = tmp_path / "prepared"
    params = params_from_dict({"dataset": {"name": "custom", "source": str(source),
                                           "prepared_dir": str(prepared_dir)}})
    run(params, preview_path=tmp_path / "preview.png", progress=False)
    assert (prepared_dir / "SegmentationClass").is_dir()
    # no mask, one note: git and DVC keep no empty folder, and seg_train@gt lists this one as a dep
    assert [path.name for path in (prepared_dir / "SegmentationClass").iterdir()] == ["NO_GT_MASKS.txt"]
    dataset = PreparedDataset.open(prepared_dir)
    assert not any(dataset.has_mask(image_id) for image_id in dataset.split("train") + dataset.split("val"))


def _unknown_class(root: Path) -> tuple[Path, str]:
    write_custom_tree(root, labels={**CUSTOM_LABELS, "a3": ["plum", "pear"]})
    return root / "labels.csv", "labels.csv:4: image a3 has unknown class 'pear' (classes.txt lists: kiwi, lime, plum)"


def _unknown_class_json(root: Path) -> tuple[Path, str]:
    write_custom_tree(root, labels={**CUSTOM_LABELS, "a3": ["Plum"]}, fmt="json")
    return root / "labels.json", "labels.json: image a3 has unknown class 'Plum'"


def _image_without_labels(root: Path) -> tuple[Path, str]:
    labels = dict(CUSTOM_LABELS)
    del labels["a2"]
    write_custom_tree(root, labels=labels)
    _jpeg(root / "images" / "a2.jpg", 9)
    return root / "labels.csv", "labels.csv: no labels for image a2 (listed in"


def _image_absent(root: Path) -> tuple[Path, str]:
    write_custom_tree(root)
    (root / "images" / "a3.jpg").unlink()
    return root / "images" / "a3.jpg", "image listed in"


def _mask_of_wrong_size(root: Path) -> tuple[Path, str]:
    write_custom_tree(root, masks={"a1": np.zeros((10, 10), dtype=np.uint8)})
    return root / "masks" / "a1.png", "mask is 10x10 but its image is 16x12"


def _two_label_files(root: Path) -> tuple[Path, str]:
    write_custom_tree(root)
    (root / "labels.json").write_text("{}")
    return root / "labels.csv", "both of labels.csv and labels.json found"


def _id_listed_twice(root: Path) -> tuple[Path, str]:
    write_custom_tree(root, train=("a1", "a2", "a1"))
    return root / "splits" / "train.txt", "train.txt:3: image a1 is listed twice (first on line 1)"


def _blank_line_inside_the_class_list(root: Path) -> tuple[Path, str]:
    write_custom_tree(root)
    (root / "classes.txt").write_text("kiwi\n\nlime\nplum\n\n")  # trailing blank lines are fine, line 2 is not
    return root / "classes.txt", "classes.txt:2: blank line inside the class list"


def _two_images_for_one_id(root: Path) -> tuple[Path, str]:
    write_custom_tree(root)
    _jpeg(root / "images" / "a2.jpg", 7)  # beside a2.png
    return root / "images" / "a2.jpg", "image a2 has 2 files (a2.jpg, a2.png); keep one"


def _jpeg_mask(root: Path) -> tuple[Path, str]:
    write_custom_tree(root)
    _jpeg(root / "masks" / "b1.jpg", 3)
    return root / "masks" / "b1.jpg", "the mask of image b1 must be one PNG of class indices (found b1.jpg"


def _labels_json_with_a_repeated_image(root: Path) -> tuple[Path, str]:
    write_custom_tree(root, fmt="json")
    (root / "labels.json").write_text('{"a1": ["kiwi"], "a2": ["lime"], "a3": ["plum"], "b1": [], "b2": [], '
                                      '"a1": ["plum"]}')  # plain JSON would keep the last a1 silently
    return root / "labels.json", "image 'a1' is listed twice"


def _sixteen_bit_image(root: Path) -> tuple[Path, str]:
    write_custom_tree(root)
    (root / "images" / "a2.png").unlink()
    gradient = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (12, 1))
    Image.fromarray(gradient).save(root / "images" / "a2.png")  # mode I;16: convert("RGB") clips it at 255
    return root / "images" / "a2.png", "a2.png: a I;16 image (more than 8 bits a channel)"


@pytest.mark.parametrize("breaker", [_unknown_class, _unknown_class_json, _image_without_labels, _image_absent,
                                     _mask_of_wrong_size, _two_label_files, _id_listed_twice,
                                     _blank_line_inside_the_class_list, _two_images_for_one_id, _jpeg_mask,
                                     _labels_json_with_a_repeated_image, _sixteen_bit_image])
def test_a_bad_custom_input_is_one_line_naming_the_file(tmp_path: Path, breaker) -> None:
    _assert_refused_naming(tmp_path, *breaker(tmp_path / "mine"))


@pytest.mark.parametrize(("relative", "content", "words"), [
    ("classes.txt", "kiwi\nlime\nplum\ncaf\xe9\n".encode("latin-1"),
     "classes.txt:4: the class list is not UTF-8 (byte 0xe9)"),
    ("splits/train.txt", b"a1\na2\xff\n", "train.txt:2: the split list is not UTF-8 (byte 0xff)"),
    ("classes.txt", b"kiwi\nbackground\nlime\nplum\n",
     "classes.txt:2: 'background' is class 0: it may only be the first line"),
    ("classes.txt", b"background\nkiwi\nlime\nbackground\nplum\n",  # the repeat named, not the legal line 1
     "classes.txt:4: 'background' is class 0: it may only be the first line")])
def test_a_bad_text_file_is_one_line_naming_its_line(tmp_path: Path, relative: str, content: bytes,
                                                     words: str) -> None:
    """A Latin-1 file stopped ``prepare`` in a ``UnicodeDecodeError`` traceback; ``background`` on line 2 was
    read as foreground class 2, shifting every class after it."""
    write_custom_tree(tmp_path / "mine")
    (tmp_path / "mine" / relative).write_bytes(content)
    _assert_refused_naming(tmp_path, tmp_path / "mine" / relative, words)


def _assert_refused_naming(tmp_path: Path, bad_path: Path, words: str) -> None:
    """``prepare`` of ``tmp_path / "mine"`` stops with one line naming ``bad_path`` and ``words``, and writes
    nothing under the prepared folder's final name."""
    prepared_dir = tmp_path / "prepared"
    params = params_from_dict({"dataset": {"name": "custom", "source": str(tmp_path / "mine"),
                                           "prepared_dir": str(prepared_dir)}})
    with pytest.raises(DatasetError) as caught:
        run(params, preview_path=tmp_path / "preview.png", progress=False)
    message = str(caught.value)
    assert "\n" not in message and str(bad_path) in message and words.split(": ", 1)[-1] in message, message
    assert not prepared_dir.exists()  # nothing written under the final name


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_byte_order_marks_are_dropped_not_read_as_part_of_a_name(tmp_path: Path, fmt: str) -> None:
    """Editors on Windows start UTF-8 files with a byte-order mark. Kept, it glued itself to the first name:
    ``\\ufeffbackground`` became a foreground class and shifted every index by one (labels 2 for a kiwi whose
    mask says 1). Every text file of the layout is written with one here: the classes and labels read as
    without it."""
    source = write_custom_tree(tmp_path / "mine", fmt=fmt)
    for text_file in [source / "classes.txt", source / f"labels.{fmt}", *(source / "splits").iterdir()]:
        text_file.write_bytes(b"\xef\xbb\xbf" + text_file.read_bytes())
    (source / "classes.txt").write_bytes(b"\xef\xbb\xbf" + b"background\n" + "".join(
        f"{name}\n" for name in CUSTOM_CLASSES).encode())
    prepared = tmp_path / "prepared"
    prepare_custom(source, prepared, ["train", "val"], progress=False)
    dataset = PreparedDataset.open(prepared)
    assert dataset.class_names == ["background", *CUSTOM_CLASSES]
    assert dataset.labels == {"a1": [1], "a2": [2, 3], "a3": [3], "b1": [1, 2], "b2": []}


def test_a_voc_split_list_naming_an_image_twice_is_refused(tmp_path: Path) -> None:
    """The custom layout refused a repeated id; a VOC list kept it (and cam_infer then failed in h5py)."""
    root = _voc_label_only_tree(tmp_path / "voc")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n2007_000001\n")
    labels = _cls_labels_npy(tmp_path / "cls_labels.npy", VOC_LABELS)
    with pytest.raises(DatasetError, match=r"train.txt:3: image 2007_000001 is listed twice \(first on line 1\)"):
        prepare_voc(root, tmp_path / "prepared", ["train", "val"], progress=False,
                    image_labels=read_cls_labels_npy(labels, 20))


def test_an_image_in_both_the_train_and_the_val_split_is_refused(tmp_path: Path) -> None:
    """Val figures must score images no model trained on: a shared id stops prepare, naming both keys and it."""
    write_custom_tree(tmp_path / "mine", val=("b1", "a2"))
    prepared_dir = tmp_path / "prepared"
    params = params_from_dict({"dataset": {"name": "custom", "source": str(tmp_path / "mine"),
                                           "prepared_dir": str(prepared_dir)}})
    with pytest.raises(DatasetError, match=r"dataset.train_split 'train' and dataset.val_split 'val' share 1 "
                                           r"images \(a2\)"):
        run(params, preview_path=tmp_path / "preview.png", progress=False)
    assert not prepared_dir.exists()


# ------------------------------------------------------------------------------------------------ COCO


def _hustvl_layout(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The COCO fixture of test_real_datasets moved into hustvl/WeakCLIP's ``COCO14/images/<split>2014``."""
    from test_real_datasets import _coco_tree

    source, expected = _coco_tree(tmp_path / "COCO14")
    (source / "images").mkdir()
    for folder in ("train2014", "val2014"):
        (source / folder).rename(source / "images" / folder)
    return source, expected


def test_coco_in_the_hustvl_layout(tmp_path: Path) -> None:
    from weakclip_core.data.coco import prepare_coco

    source, expected = _hustvl_layout(tmp_path)
    prepare_coco(source, tmp_path / "prepared", ["train", "val"], progress=False)
    dataset = PreparedDataset.open(tmp_path / "prepared")
    for image_id, mask in expected.items():
        np.testing.assert_array_equal(dataset.mask(image_id), mask)


CATEGORY_OF_CLASS = {1: 1, 2: 3, 3: 18}  # the fixture's categories: person 1, car 3, dog 18


@pytest.mark.parametrize("encoding", ["contiguous", "category_id"])
def test_coco_pre_rendered_masks_in_either_encoding(tmp_path: Path, encoding: str) -> None:
    from weakclip_core.data.coco import prepare_coco

    source, expected = _hustvl_layout(tmp_path)
    masks_dir = tmp_path / "class_labels"
    for image_id, mask in expected.items():
        rendered = mask.copy()
        if encoding == "category_id":  # the raw COCO ids, as the reference's 91-class masks
            for class_index, category_id in CATEGORY_OF_CLASS.items():
                rendered[mask == class_index] = category_id
        _palette_png(masks_dir / f"{image_id.split('_')[-1]}.png", rendered)  # parse_coco.py's file names
    params = params_from_dict({"dataset": {"name": "coco", "source": str(source), "prepared_dir": str(tmp_path / "p"),
                                           "coco_masks": str(masks_dir), "coco_mask_encoding": encoding}})
    run(params, preview_path=tmp_path / "preview.png", progress=False)
    dataset = PreparedDataset.open(tmp_path / "p")
    for image_id, mask in expected.items():
        np.testing.assert_array_equal(dataset.mask(image_id), mask)
        assert dataset.labels[image_id] == sorted(set(np.unique(mask).tolist()) - {0, 255})


def test_a_pre_rendered_mask_falls_back_only_to_cocos_12_digit_number(tmp_path: Path) -> None:
    """hustvl/WeakCLIP's ``parse_coco.py`` names a mask by the image's 12-digit number (``000000000007.png``); a
    shorter tail of your own ids (``img_1``, ``shot_1``) names no image alone: both used to read one ``1.png``."""
    from weakclip_core.data.coco import pre_rendered_mask

    mask = np.zeros((4, 5), np.uint8)
    _palette_png(tmp_path / "1.png", mask)
    _palette_png(tmp_path / "000000000007.png", mask)
    classes = dict(CATEGORY_OF_CLASS)
    with pytest.raises(DatasetError) as caught:
        pre_rendered_mask(tmp_path, "shot_1", "contiguous", classes, (4, 5))
    assert str(caught.value) == f"{tmp_path / 'shot_1.png'}: mask not found in dataset.coco_masks"
    found = pre_rendered_mask(tmp_path, "COCO_val2014_000000000007", "contiguous", classes, (4, 5))
    np.testing.assert_array_equal(found, mask)


def test_a_pre_rendered_mask_in_the_wrong_encoding_names_the_file(tmp_path: Path) -> None:
    from weakclip_core.data.coco import prepare_coco

    source, expected = _hustvl_layout(tmp_path)
    masks_dir = tmp_path / "masks"
    for image_id, mask in expected.items():
        _palette_png(masks_dir / f"{image_id}.png", mask)  # contiguous 1..3, read as category ids: 2 is no id
    with pytest.raises(DatasetError) as caught:
        prepare_coco(source, tmp_path / "prepared", ["train", "val"], progress=False, masks_dir=masks_dir,
                     mask_encoding="category_id")
    assert str(caught.value).startswith(f"{masks_dir / 'COCO_train2014_000000000001.png'}: value 2 is not a COCO "
                                        "category id")


def test_a_pre_rendered_mask_with_a_class_its_image_has_no_annotation_of_is_refused(tmp_path: Path) -> None:
    """Category-id masks read as ``contiguous`` mostly stay inside 0..80 (id 3, car, reads as class 3), so on a
    COCO subset they used to prepare without a word, every label wrong. A mask class must be one the image's
    annotations name; a value past 80 names the key too."""
    from weakclip_core.data.coco import prepare_coco

    source, expected = _hustvl_layout(tmp_path)
    masks_dir = tmp_path / "masks"
    for image_id, mask in expected.items():
        _palette_png(masks_dir / f"{image_id}.png", mask)
    wrong = expected["COCO_val2014_000000000007"].copy()  # its annotation: one car (class 2)
    wrong[wrong == 2] = 1  # painted as person, which no annotation of the image names
    _palette_png(masks_dir / "COCO_val2014_000000000007.png", wrong)
    with pytest.raises(DatasetError) as caught:
        prepare_coco(source, tmp_path / "prepared", ["train", "val"], progress=False, masks_dir=masks_dir)
    assert str(caught.value) == (f"{masks_dir / 'COCO_val2014_000000000007.png'}: holds class 1, which "
                                 "instances_val2014.json does not annotate in this image (it annotates classes [2]); "
                                 "masks in the other encoding? (dataset.coco_mask_encoding is contiguous; try "
                                 "category_id)")
    wrong[wrong == 1] = 18  # dog's category id, past the 3 classes
    _palette_png(masks_dir / "COCO_val2014_000000000007.png", wrong)
    with pytest.raises(DatasetError, match=r"value 18 is not a class \(dataset.coco_mask_encoding: contiguous expects "
                                           r"0..3 and 255; masks holding the COCO category ids need"):
        prepare_coco(source, tmp_path / "prepared2", ["train", "val"], progress=False, masks_dir=masks_dir)


def test_a_pickled_npy_that_asks_for_more_than_numbers_is_refused_without_running_it(tmp_path: Path) -> None:
    """MCTformer's files are pickles (``np.save`` of a dict): a tampered one must not run code when read."""
    import pickle  # noqa: PLC0415

    from weakclip_core.artifacts.safe_npy import RefusedPickleError, load_pickled_npy  # noqa: PLC0415

    marker = tmp_path / "planted"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 (pickle's protocol)
            return (Path.touch, (marker,))

    poisoned = tmp_path / "cls_labels.npy"
    np.save(poisoned, np.array({"2007_000032": Payload()}, dtype=object), allow_pickle=True)
    with pytest.raises(RefusedPickleError, match="pathlib"):
        load_pickled_npy(poisoned)
    assert not marker.exists()
    plain = tmp_path / "plain.npy"
    np.save(plain, {"2007_000032": np.array([1.0, 0.0], dtype=np.float32), "x": np.float32(2.5)}, allow_pickle=True)
    loaded = load_pickled_npy(plain)
    assert list(loaded) == ["2007_000032", "x"] and loaded["2007_000032"].tolist() == [1.0, 0.0]
    assert float(loaded["x"]) == 2.5
    np.save(tmp_path / "numbers.npy", np.arange(6).reshape(2, 3))
    assert load_pickled_npy(tmp_path / "numbers.npy").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_coco_image_entry_without_its_size_names_the_file_and_image(tmp_path: Path) -> None:
    """A COCO-format export of one's own data that leaves out an image's height: one DatasetError naming the
    annotation file, the image id and its file (was: a bare ``KeyError: 'height'`` traceback)."""
    import json

    from weakclip_core.data.coco import prepare_coco

    source, _ = _hustvl_layout(tmp_path)
    annotations = source / "annotations" / "instances_train2014.json"
    document = json.loads(annotations.read_text())
    del document["images"][0]["height"]
    annotations.write_text(json.dumps(document))
    first = document["images"][0]
    with pytest.raises(DatasetError) as caught:
        prepare_coco(source, tmp_path / "prepared", ["train", "val"], progress=False)
    assert str(caught.value) == (f"{annotations}: image {first['id']} ({first['file_name']}) has no valid "
                                 "height/width (COCO's image entries give both)")


# ------------------------------------------------------------------ masks against the labels given apart from them


def _blob(size: tuple[int, int], value: int) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[2:8, 3:11] = value
    return mask


def _custom_params(source: Path, tmp_path: Path):  # noqa: ANN202 — Params
    return params_from_dict({"dataset": {"name": "custom", "source": str(source),
                                         "prepared_dir": str(tmp_path / "prepared")}})


@pytest.mark.parametrize("first_line", ["background", "Background", "__background__", "_background_"])
def test_a_background_first_line_in_any_spelling_is_class_0(tmp_path: Path, first_line: str) -> None:
    """labelme writes ``_background_``, Detectron ``__background__``: read as a class, the first line made every
    class one more than the masks say (kiwi 2 where its masks draw 1); now it is background in every spelling."""
    masks = {image_id: _blob((12, 16), 1 + CUSTOM_CLASSES.index(names[0]))
             for image_id, names in CUSTOM_LABELS.items() if len(names) == 1}
    source = write_custom_tree(tmp_path / "mine", masks=masks)
    (source / "classes.txt").write_text(f"{first_line}\n" + "".join(f"{name}\n" for name in CUSTOM_CLASSES))
    summary = run(_custom_params(source, tmp_path), preview_path=tmp_path / "preview.png", progress=False)
    dataset = PreparedDataset.open(tmp_path / "prepared")
    assert dataset.class_names == ["background", *CUSTOM_CLASSES]
    assert dataset.labels["a1"] == [1] and summary.mask_label_warning is None


def test_a_background_line_in_the_middle_names_its_line_in_any_spelling(tmp_path: Path) -> None:
    source = write_custom_tree(tmp_path / "mine")
    (source / "classes.txt").write_text("kiwi\n_background_\nlime\nplum\n")
    with pytest.raises(DatasetError, match=r"classes.txt:2: '_background_' is class 0: it may only "):
        run(_custom_params(source, tmp_path), preview_path=tmp_path / "preview.png", progress=False)


def test_masks_drawn_in_another_class_order_than_classes_txt_stop_prepare_naming_both(tmp_path: Path) -> None:
    """Masks drawn with kiwi 1, lime 2, plum 3 but a classes.txt with an extra first line ("unlabelled"): every
    mask shows a class its image is not labelled with, and every GT score downstream would be against the
    wrong classes. Was: prepared without a word. The images' labels by hand: a1 kiwi = 2, a3 plum = 4."""
    masks = {"a1": _blob((12, 16), 1), "a3": _blob((12, 16), 3), "b1": _blob((12, 16), 1)}
    source = write_custom_tree(tmp_path / "mine", masks=masks)
    (source / "classes.txt").write_text("unlabelled\n" + "".join(f"{name}\n" for name in CUSTOM_CLASSES))
    prepared = tmp_path / "prepared"
    with pytest.raises(DatasetError) as caught:
        run(_custom_params(source, tmp_path), preview_path=tmp_path / "preview.png", progress=False)
    assert str(caught.value) == (
        f"{source / 'masks'}: 3 of the 3 GT masks with foreground show classes their image is not labelled with in "
        f"{source / 'labels.csv'} (first: a1's mask shows unlabelled (1), its labels say kiwi (2)): the masks' class "
        "indices and the labels must follow one class order (0 background, class i = line i of classes.txt after "
        "an optional first 'background' line)")
    assert not prepared.exists()  # nothing half-prepared left behind


def test_binary_0_255_masks_stop_prepare_naming_the_mask_folder(tmp_path: Path) -> None:
    """Masks saved binary, 0 background and 255 the object (the usual encoding of single-class mask sets): read as
    class indices, every object pixel is ignore and the GT scores would be taken on background alone. Was:
    prepared without a word ("GT masks: 3 of 3 images"). Image labels by hand: a1 kiwi = 1."""
    masks = {image_id: np.where(_blob((12, 16), 1) > 0, 255, 0).astype(np.uint8) for image_id in ("a1", "a3", "b1")}
    source = write_custom_tree(tmp_path / "mine", masks=masks)
    with pytest.raises(DatasetError) as caught:
        run(_custom_params(source, tmp_path), preview_path=tmp_path / "preview.png", progress=False)
    assert str(caught.value) == (
        f"{source / 'masks'}: 3 of the 3 GT masks of labelled images show no class, only background (0) and ignore "
        "(255) (first: a1, labelled kiwi (1)): binary 0/255 masks? A mask's value is the pixel's class index (0 "
        "background, class i = line i of classes.txt after an optional first 'background' line) and 255 means "
        "ignore: set each object's pixels to its class index")
    assert not (tmp_path / "prepared").exists()


def test_a_few_masks_off_their_labels_are_a_line_of_the_summary(tmp_path: Path) -> None:
    """One mask of three showing a class its image is not labelled with (a real dataset's few annotation slips,
    as VOC's XML labels and SBD masks on some images): prepared, and said on the stage's summary."""
    masks = {"a1": _blob((12, 16), 1), "a3": _blob((12, 16), 3), "b1": _blob((12, 16), 3)}  # b1: kiwi, lime
    source = write_custom_tree(tmp_path / "mine", masks=masks)
    summary = run(_custom_params(source, tmp_path), preview_path=tmp_path / "preview.png", progress=False)
    assert summary.mask_label_warning == (
        f"GT masks: 1 of 3 in {source / 'masks'} show classes their image's labels ({source / 'labels.csv'}) do not "
        "list (first: b1's mask shows plum (3), its labels say kiwi (1), lime (2)); they are scored as they are, "
        "and the labels (what the chain learns from) stay as given")


def test_labels_listing_only_part_of_what_the_masks_show_are_a_summary_line_not_an_error(tmp_path: Path) -> None:
    """Image-level labels that name only some of the classes a mask shows (a tagger's labels), on every mask:
    not the crossed pattern of a shifted index (the mask also lacks a labelled class), so prepared with a line,
    not refused as a class-order error."""
    two = _blob((12, 16), 1)
    two[9:, :] = 3  # kiwi and plum drawn; a1 is labelled kiwi only
    masks = {"a1": two, "a3": two.copy(), "b1": two.copy()}  # a3: plum only, b1: kiwi and lime
    source = write_custom_tree(tmp_path / "mine", masks=masks)
    summary = run(_custom_params(source, tmp_path), preview_path=tmp_path / "preview.png", progress=False)
    assert summary.mask_label_warning is not None and summary.mask_label_warning.startswith("GT masks: 3 of 3 in ")


def test_voc_masks_against_a_shifted_cls_labels_stop_prepare(tmp_path: Path) -> None:
    """``cls_labels.npy`` one class off against the SegmentationClass masks (2007_000003's mask draws car, 7;
    the file says 8): the one mask with foreground disagrees, more than half, so prepare stops naming both."""
    source = _voc_label_only_tree(tmp_path / "VOC2012")
    shifted = {image_id: [c % 20 + 1 for c in classes] for image_id, classes in VOC_LABELS.items()}
    labels_file = _cls_labels_npy(tmp_path / "cls_labels.npy", shifted)
    params = params_from_dict({"dataset": {"name": "voc", "source": str(source),
                                           "prepared_dir": str(tmp_path / "prepared"),
                                           "voc_cls_labels": str(labels_file)}})
    with pytest.raises(DatasetError, match=r"^" + str(source / "SegmentationClass") + r": 1 of the 1 GT masks .* "
                       r"in " + str(labels_file) + r" \(first: 2007_000003's mask shows car \(7\), its labels say cat "
                       r"\(8\)\)"):
        run(params, preview_path=tmp_path / "preview.png", progress=False)


def test_a_turned_camera_photo_is_prepared_upright_with_its_mask(tmp_path: Path) -> None:
    """A phone's portrait photo: stored 16 wide x 12 high with EXIF orientation 6 (turn 90 degrees clockwise to
    view), shown and annotated 12 wide x 16 high. Was: prepare refused its mask as the wrong size (or, square,
    took the mask on sideways pixels). Now the prepared image is the upright view (numpy's rot90 by hand) and
    the mask fits it."""
    source = write_custom_tree(tmp_path / "mine")
    stored = np.zeros((12, 16, 3), dtype=np.uint8)
    stored[:, :8] = (250, 20, 20)  # left half red as stored: the top half once turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(source / "images" / "a1.jpg", format="JPEG", quality=95, exif=exif)
    upright_mask = np.zeros((16, 12), dtype=np.uint8)
    upright_mask[:8] = 1  # the red half, kiwi, as the annotation tool showed it
    _palette_png(source / "masks" / "a1.png", upright_mask)
    run(_custom_params(source, tmp_path), preview_path=tmp_path / "preview.png", progress=False)
    dataset = PreparedDataset.open(tmp_path / "prepared")
    image = dataset.image("a1")
    expected = np.rot90(stored, k=-1)  # clockwise
    assert image.shape == (16, 12, 3)
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 8  # two JPEG encodings (the edge rings)
    np.testing.assert_array_equal(dataset.mask("a1"), upright_mask)
    assert image[:8, :, 0].mean() > 200 and image[8:, :, 0].mean() < 60
