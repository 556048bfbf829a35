"""The synthetic WSSS benchmark: labels agree with masks, determinism, ignore band, captions, sizes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.prepare import run
from weakclip_core.config import params_from_dict
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.data.synthetic import BODY_STYLES, CLASS_WORDS, class_designs, ignore_band, render_sample
from weakclip_core.config.dataset import SyntheticConfig

TINY = {"image_size": 64, "n_train": 10, "n_val": 4, "workers": 1}


def _prepare(tmp_path: Path, name: str, seed: int = 0, **synthetic: object) -> Path:
    root = tmp_path / name
    params = params_from_dict({"dataset": {"name": "synthetic", "seed": seed, "prepared_dir": str(root),
                                           "synthetic": {**TINY, **synthetic}}})
    run(params, preview_path=tmp_path / f"{name}_preview.png", progress=False)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("synthetic"), "seed0")


def test_counts_sizes_ids_follow_params(prepared: Path) -> None:
    dataset = PreparedDataset.open(prepared)
    assert dataset.split("train") == [f"syn_train_{i:06d}" for i in range(10)]
    assert dataset.split("val") == [f"syn_val_{i:06d}" for i in range(4)]
    assert len(list((prepared / "JPEGImages").glob("*.jpg"))) == 14
    assert len(list((prepared / "SegmentationClass").glob("*.png"))) == 14
    for image_id in dataset.split("train") + dataset.split("val"):
        with Image.open(dataset.image_path(image_id)) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
        with Image.open(dataset.mask_path(image_id)) as mask:
            assert (mask.format, mask.mode, mask.size) == ("PNG", "P", (64, 64))


def test_at_least_eleven_distinct_classes_background_first(prepared: Path) -> None:
    names = PreparedDataset.open(prepared).class_names
    assert len(names) >= 11 and names[0] == "background"
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z]+", name) for name in names)


def test_labels_are_exactly_the_classes_visible_in_each_mask(prepared: Path) -> None:
    dataset = PreparedDataset.open(prepared)
    for image_id, classes in dataset.labels.items():
        mask = np.array(Image.open(dataset.mask_path(image_id)))
        present = sorted(int(v) for v in np.unique(mask) if v not in (0, 255))
        assert classes == present, image_id
        assert classes, f"{image_id}: an image without objects"
        assert set(np.unique(mask).tolist()) <= set(range(dataset.n_classes)) | {255}


def test_captions_name_exactly_the_labelled_classes(prepared: Path) -> None:
    dataset = PreparedDataset.open(prepared)
    captions = dataset.captions()
    assert set(captions) == set(dataset.labels)
    for image_id, caption in captions.items():
        words = set(re.findall(r"[a-z]+", caption))
        named = {index for index, name in enumerate(dataset.class_names)
                 if index > 0 and (name in words or f"{name}s" in words)}
        assert named == set(dataset.labels[image_id]), (image_id, caption)


def test_each_labelled_object_shows_its_class_part_colour(prepared: Path) -> None:
    """The class-deciding part must be visible: pixels of the part colour inside the class's mask."""
    dataset = PreparedDataset.open(prepared)
    designs = class_designs(dataset.n_classes - 1)
    for image_id, classes in dataset.labels.items():
        image = dataset.image(image_id).astype(np.int32)
        mask = dataset.mask(image_id)
        for class_index in classes:
            part_colour = np.asarray(designs[class_index - 1].part_colour)
            close = np.linalg.norm(image - part_colour, axis=-1) < 45
            assert int((close & (mask == class_index)).sum()) >= 4, (image_id, class_index)


def test_ignore_band_hand_worked_square() -> None:
    instances = np.zeros((10, 10), dtype=np.int32)
    instances[3:7, 3:7] = 1
    assert not ignore_band(instances, 0).any()
    # width 1: a 2x2 window (offsets -1..0) -> the object's top/left edge and the pixels below/right of it
    expected_one = np.zeros((10, 10), dtype=bool)
    expected_one[3:8, 3:8] = True
    expected_one[4:7, 4:7] = False
    np.testing.assert_array_equal(ignore_band(instances, 1), expected_one)
    # width 2: a 3x3 window -> one pixel on each side of every edge
    expected_two = np.zeros((10, 10), dtype=bool)
    expected_two[2:8, 2:8] = True
    expected_two[4:6, 4:6] = False
    np.testing.assert_array_equal(ignore_band(instances, 2), expected_two)


def test_ignore_band_separates_regions_and_stays_on_boundaries(prepared: Path) -> None:
    dataset = PreparedDataset.open(prepared)
    width = TINY.get("ignore_band", 2)
    for image_id in dataset.labels:
        mask = dataset.mask(image_id).astype(np.int32)
        ignored = mask == 255
        assert ignored.any(), image_id
        # no labelled pixel touches (4-neighbour) a non-ignored pixel of another label: the band encloses objects
        for shifted_a, shifted_b in ((mask[1:, :], mask[:-1, :]), (mask[:, 1:], mask[:, :-1])):
            both_valid = (shifted_a != 255) & (shifted_b != 255)
            assert not np.any(both_valid & (shifted_a != shifted_b)), image_id
        # none deep inside: every ignored pixel has a non-ignored pixel within 2 * width (Chebyshev)
        padded = np.pad(~ignored, 2 * width, constant_values=False)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (4 * width + 1, 4 * width + 1))
        assert windows.any(axis=(-1, -2))[ignored].all(), image_id
        # objects keep a non-ignored interior
        for class_index in dataset.labels[image_id]:
            assert int((mask == class_index).sum()) > 0


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path, prepared: Path) -> None:
    again = _prepare(tmp_path, "again", seed=0)
    other = _prepare(tmp_path, "other", seed=1)
    assert _digests(again) == _digests(prepared)
    reference, changed = _digests(prepared), _digests(other)
    assert set(reference) == set(changed)
    images = [name for name in reference if name.startswith("JPEGImages/")]
    assert sum(reference[name] != changed[name] for name in images) == len(images)


def test_workers_do_not_change_a_byte(tmp_path: Path, prepared: Path) -> None:
    parallel = _prepare(tmp_path, "parallel", seed=0, workers=2)
    assert _digests(parallel) == _digests(prepared)


def test_image_depends_only_on_seed_split_index() -> None:
    small = SyntheticConfig(image_size=64, n_train=4)
    large = SyntheticConfig(image_size=64, n_train=400)
    for index in (0, 3):
        first, second = render_sample(small, 7, "train", index), render_sample(large, 7, "train", index)
        np.testing.assert_array_equal(first.image, second.image)
        np.testing.assert_array_equal(first.mask, second.mask)
    assert not np.array_equal(render_sample(small, 7, "train", 0).image, render_sample(small, 7, "val", 0).image)


def test_class_words_cover_the_largest_allowed_config() -> None:
    assert len(set(CLASS_WORDS)) == len(CLASS_WORDS) == 20
    designs = class_designs(20)
    signatures = {(d.part_colour_name, d.part_shape, d.part_position) for d in designs}
    assert len(signatures) == 20  # every class has its own part
    assert all(d.companion != d.index for d in designs)


def test_context_backgrounds_never_blend_into_a_body_colour() -> None:
    """Every colour a two-colour background can take stays far from every body colour (sharp body edges)."""
    blend = np.linspace(0.0, 1.0, 201)[:, None]
    for design in class_designs(20):
        first, second = (np.asarray(colour, dtype=np.float64) for colour in design.context_colours)
        colours = first * (1 - blend) + second * blend
        for style in BODY_STYLES:
            assert np.linalg.norm(colours - np.asarray(style.colour), axis=1).min() >= 89.0, design.name


def test_tinted_bodies_keep_a_sharp_edge_against_their_background() -> None:
    """With body_tint a body takes its class colour; the background around every object still differs from it.

    Measured on the rendered pixels: the median colour of each object's body against the median colour of the
    background ring just outside it (independent of how the generator picks colours)."""
    config = SyntheticConfig(image_size=96, n_classes=10, min_objects=1, max_objects=3, body_tint=0.8,
                             context_prob=0.5, distractors=0)
    distances = []
    for index in range(60):
        sample = render_sample(config, 5, "train", index)
        for class_index in sample.classes:
            body = sample.mask == class_index
            near = np.zeros_like(body)
            rows, cols = np.nonzero(body | (sample.mask == 255))
            for d_row in range(-5, 6):  # a 5-px ring by shifting: no scipy in the reference
                for d_col in range(-5, 6):
                    near[np.clip(rows + d_row, 0, 95), np.clip(cols + d_col, 0, 95)] = True
            ring = near & (sample.mask == 0)
            if ring.sum() < 10:
                continue
            body_colour = np.median(sample.image[body].astype(np.float64), axis=0)
            ring_colour = np.median(sample.image[ring].astype(np.float64), axis=0)
            distances.append(float(np.linalg.norm(body_colour - ring_colour)))
    assert len(distances) > 60
    assert min(distances) > 60.0, sorted(distances)[:5]


def test_body_tint_moves_the_whole_object_to_its_class_colour() -> None:
    """body_tint 1: every object pixel sits near its class's part colour; 0: the body keeps a shared style colour."""
    designs = class_designs(10)
    for tint, expect_near in ((1.0, True), (0.0, False)):
        config = SyntheticConfig(image_size=96, n_classes=10, min_objects=1, max_objects=1, body_tint=tint,
                                 body_colour_jitter=0.0, distractors=0, companion_prob=0.0)
        for index in range(6):
            sample = render_sample(config, 3, "train", index)
            (class_index,) = sample.classes
            part = np.asarray(designs[class_index - 1].part_colour, dtype=np.float64)
            pixels = sample.image[sample.mask == class_index].astype(np.float64)
            median_distance = float(np.median(np.linalg.norm(pixels - part, axis=1)))
            if expect_near:
                assert median_distance < 30.0, (index, median_distance)
            else:
                styles = np.array([style.colour for style in BODY_STYLES], dtype=np.float64)
                body_distance = float(np.median(np.min(np.linalg.norm(pixels[:, None] - styles[None], axis=2), axis=1)))
                assert body_distance < 30.0 < median_distance, (index, body_distance, median_distance)


_ANCHOR_COLOURS = {"red": (255, 0, 0), "green": (0, 180, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
                   "magenta": (255, 0, 255), "cyan": (0, 255, 255), "orange": (255, 140, 0),
                   "purple": (128, 0, 128), "white": (255, 255, 255), "black": (0, 0, 0)}
"""Textbook RGB of the part colours' names, for naming a measured colour independently of the generator."""


def _single_object_colours(part_colours: str, count: int) -> list[tuple[int, str, str]]:
    """(class, nearest anchor name of the object's median pixel, caption) for ``count`` one-object images whose
    whole object takes its part colour (body_tint 1, no jitter)."""
    config = SyntheticConfig(image_size=96, n_classes=10, min_objects=1, max_objects=1, body_tint=1.0,
                             body_colour_jitter=0.0, distractors=0, companion_prob=0.0, part_colours=part_colours)
    names, anchors = list(_ANCHOR_COLOURS), np.array(list(_ANCHOR_COLOURS.values()), dtype=np.float64)
    measured = []
    for index in range(count):
        sample = render_sample(config, 11, "train", index)
        (class_index,) = sample.classes
        median = np.median(sample.image[sample.mask == class_index].astype(np.float64), axis=0)
        measured.append((class_index, names[int(np.argmin(np.linalg.norm(anchors - median, axis=1)))],
                         sample.caption))
    return measured


def test_random_part_colours_say_nothing_about_the_class() -> None:
    """part_colours random, measured on the pixels: every class shows many colours and every colour is worn by
    several classes, so only the part's shape and position and the body outline tell a class; per_class keeps one
    colour per class. Each caption names the colour the object shows."""
    random_colours = _single_object_colours("random", 200)
    colours_of_class: dict[int, set[str]] = {}
    classes_of_colour: dict[str, set[int]] = {}
    for class_index, colour, caption in random_colours:
        colours_of_class.setdefault(class_index, set()).add(colour)
        classes_of_colour.setdefault(colour, set()).add(class_index)
        assert re.search(rf"\b{colour}-(headed|tailed|marked)\b", caption), (colour, caption)
    assert len(colours_of_class) == 10
    assert min(len(colours) for colours in colours_of_class.values()) >= 4, colours_of_class
    assert len(classes_of_colour) == 10
    assert min(len(classes) for classes in classes_of_colour.values()) >= 4, classes_of_colour
    per_class: dict[int, set[str]] = {}
    for class_index, colour, _ in _single_object_colours("per_class", 60):
        per_class.setdefault(class_index, set()).add(colour)
    assert all(len(colours) == 1 for colours in per_class.values()), per_class
    assert len(set().union(*per_class.values())) == len(per_class)


def test_random_part_colours_keep_every_class_its_own_part_shape_and_position() -> None:
    """Without colour, (part shape, part position) must tell the classes apart: distinct for up to the limit the
    config enforces, not beyond it, and a larger n_classes is refused naming the key."""
    from weakclip_core.config.dataset import RANDOM_PART_COLOURS_MAX_CLASSES
    from weakclip_core.config.schema import ConfigError

    def distinct_parts(n_classes: int) -> int:
        return len({(design.part_shape, design.part_position) for design in class_designs(n_classes)})

    assert distinct_parts(RANDOM_PART_COLOURS_MAX_CLASSES) == RANDOM_PART_COLOURS_MAX_CLASSES
    assert distinct_parts(RANDOM_PART_COLOURS_MAX_CLASSES + 1) < RANDOM_PART_COLOURS_MAX_CLASSES + 1
    with pytest.raises(ConfigError, match="n_classes"):
        params_from_dict({"dataset": {"synthetic": {"n_classes": 11, "part_colours": "random"}}})
    params_from_dict({"dataset": {"synthetic": {"n_classes": 11, "part_colours": "per_class"}}})
