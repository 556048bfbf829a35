"""The small CLIP's "web" corpus (clip.pretrain.corpus: web): disjoint from the WSSS splits, more compositions,
captions that name what is there, and the clip stage trained on it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.clip import run as run_clip_stage
from tiny_voc import TINY_CLIP_ARCH, TINY_WEAKCLIP_TAPS, write_tiny_voc
from weakclip_core.config import params_from_dict
from weakclip_core.config.dataset import SyntheticConfig
from weakclip_core.config.schema import ConfigError
from weakclip_core.data.layout import CAPTIONS_FILE, write_labels, write_split
from weakclip_core.data.synthetic import CLASS_WORDS, class_names, generate_synthetic, render_sample
from weakclip_core.training.web_corpus import WebCaptionStream, drop_attributes, web_generator_config

SMALL = SyntheticConfig(image_size=64, n_train=6, n_val=4, n_classes=4, min_objects=1, max_objects=2, workers=1)


def test_the_web_stream_never_shows_a_wsss_image_and_never_repeats_one() -> None:
    generator = web_generator_config(SMALL, max_objects=4)
    web = [render_sample(generator, 0, "web", number).image for number in range(40)]
    benchmark = [render_sample(SMALL, 0, split, index).image for split in ("train", "val") for index in range(40)]
    web_bytes = {image.tobytes() for image in web}
    assert len(web_bytes) == 40, "two web images are the same"
    assert not web_bytes & {image.tobytes() for image in benchmark}
    # Epoch 1 of a 10-image stream is images 10..19, not epoch 0's again: the stream shows new data every epoch.
    stream = WebCaptionStream(generator, seed=0, images_per_epoch=10, image_size=32, caption_dropout=0.0)
    _, caption_epoch1 = stream[(1, 3)]
    assert caption_epoch1 == render_sample(generator, 0, "web", 13).caption
    image, _ = stream[(0, 0)]
    assert tuple(image.shape) == (3, 32, 32)


def test_the_web_has_more_compositions_and_its_captions_name_every_object() -> None:
    generator = web_generator_config(SMALL, max_objects=4)
    assert (generator.min_objects, generator.max_objects) == (1, 4)
    samples = [render_sample(generator, 1, "web", number) for number in range(150)]
    # Counted from the mask, independently of the generator's own bookkeeping: labelled regions per image.
    from scipy import ndimage
    most_objects = max(sum(ndimage.label(sample.mask == c)[1] for c in np.unique(sample.mask) if c not in (0, 255))
                       for sample in samples)
    assert most_objects > SMALL.max_objects, "the web shows no composition the benchmark lacks"
    for sample in samples:
        present = {CLASS_WORDS[c - 1] for c in np.unique(sample.mask) if c not in (0, 255)}
        named = {word for word in CLASS_WORDS[:SMALL.n_classes] if re.search(rf"\b{word}s?\b", sample.caption)}
        assert named == present, sample.caption


def test_attribute_dropout_leaves_bare_class_names_and_keeps_every_object() -> None:
    """Hand-worked captions: a stripped phrase keeps its count and class word (article re-chosen), the
    background clause and the class words are never lost, and the rate of bare phrases follows the knob."""
    rng = np.random.default_rng(0)
    assert drop_attributes("an orange-marked grey heron and two red/blue-tailed kites on a wavy blue background",
                           1.0, rng) == "a heron and two kites and a wavy blue background"
    assert drop_attributes("a red-headed tan otter", 1.0, rng) == "an otter"
    assert drop_attributes("a red-headed tan otter", 0.0, rng) == "a red-headed tan otter"
    generator = web_generator_config(dataclasses.replace(SMALL, part_colours="random"), max_objects=4)
    stream = WebCaptionStream(generator, seed=0, images_per_epoch=200, image_size=32, caption_dropout=0.0,
                              attribute_dropout=0.5)
    phrases = bare = 0
    for index in range(200):
        caption = stream[(0, index)][1]
        sample = render_sample(generator, 0, "web", index)
        named = {word for word in CLASS_WORDS[:SMALL.n_classes] if re.search(rf"\b{word}s?\b", caption)}
        assert named == set(CLASS_WORDS[c - 1] for c in sample.classes), caption
        for clause in caption.split(" and "):
            if not clause.endswith("background"):
                phrases += 1
                bare += len(clause.split()) == 2
    assert 0.4 < bare / phrases < 0.6, (bare, phrases)


def test_a_web_split_name_and_the_web_corpus_off_synthetic_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.train_split: 'web' is the synthetic generator's CLIP"):
        params_from_dict({"dataset": {"train_split": "web"}})
    params = params_from_dict({"dataset": {"name": "voc", "source": "some/voc"}})
    from pipeline.clip import pretraining_pairs

    class Prepared:  # the one attribute the check reads: where a captions file would be
        root = tmp_path

    with pytest.raises(ConfigError, match=r"clip\.pretrain\.corpus: 'web' streams the synthetic generator's images, "
                                          r"but dataset\.name is 'voc'; use clip\.source: file") as caught:
        pretraining_pairs(params, dataset=Prepared)  # type: ignore[arg-type]
    assert "train_split" not in str(caught.value)  # no captions: that corpus would fail next
    (tmp_path / CAPTIONS_FILE).write_text("x\tsome caption\n")
    with pytest.raises(ConfigError, match=r"or clip\.pretrain\.corpus: train_split"):
        pretraining_pairs(params, dataset=Prepared)  # type: ignore[arg-type]


def _prepared_synthetic(root: Path, config: SyntheticConfig) -> None:
    records = generate_synthetic(config, 0, root, {"train": config.n_train, "val": config.n_val}, progress=False)
    for split in ("train", "val"):
        write_split(root, split, [r.image_id for r in records if r.split == split])
    write_labels(root, "synthetic", class_names(config.n_classes), {r.image_id: r.classes for r in records})
    (root / CAPTIONS_FILE).write_text("".join(f"{r.image_id}\t{r.caption}\n" for r in records))


def test_the_clip_stage_pretrains_on_the_web_stream(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    _prepared_synthetic(data_root, SMALL)
    params = params_from_dict({
        "runtime": {"device": "cpu", "seed": 1},
        "dataset": {"name": "synthetic", "prepared_dir": str(data_root),
                    "synthetic": {"image_size": 64, "n_train": 6, "n_val": 4, "n_classes": 4, "max_objects": 2}},
        "clip": {"source": "pretrain", "arch": dict(TINY_CLIP_ARCH),
                 "pretrain": {"epochs": 2, "batch_size": 4, "lr": 0.001, "warmup_steps": 1, "corpus": "web",
                              "web_images": 8, "web_max_objects": 3}},
        "weakclip": {"taps": TINY_WEAKCLIP_TAPS},
    })
    metrics = run_clip_stage(params, tmp_path / "clip", tmp_path / "clip.json", checkpoint_root=tmp_path / "ckpt")
    assert metrics["pretrain"]["corpus"] == "web"
    assert metrics["pretrain"]["steps"] == 2 * (8 // 4)
    assert metrics["pretrain"]["images_seen"] == 16 and metrics["pretrain"]["images_per_epoch"] == 8

    # The web's classes must be the prepared dataset's: a dataset prepared with other classes is refused.
    other_root = tmp_path / "other"
    write_tiny_voc(other_root, n_train=8, n_val=4)
    other = params_from_dict({"dataset": {"name": "synthetic", "prepared_dir": str(other_root)},
                              "clip": {"source": "pretrain", "arch": dict(TINY_CLIP_ARCH),
                                       "pretrain": {"corpus": "web", "web_images": 8, "batch_size": 4,
                                                    "warmup_steps": 1}},
                              "weakclip": {"taps": TINY_WEAKCLIP_TAPS}})
    with pytest.raises(ConfigError, match=r"clip\.pretrain\.corpus: the web stream's classes \(10 from "
                                          r"dataset\.synthetic\.n_classes\) are not those of .*other \(3\)"):
        run_clip_stage(other, tmp_path / "clip2", tmp_path / "clip2.json", checkpoint_root=tmp_path / "ckpt2")
