"""The small CLIP's own "web": a stream of generated captioned images, disjoint from the WSSS splits.

Why a corpus of its own: a real CLIP learns its classes from hundreds of millions of web image/alt-text pairs
that never include the WSSS benchmark's images. Pre-training the synthetic default's small CLIP on the
benchmark's own 800 training captions gave it too little to learn from (144 steps, loss stuck at 2.5, logit
scale unmoved), and a randomly initialised CLIP then did as well in WeakCLIP. The stream here is the
benchmark's generator (``weakclip_core/data/synthetic.py``) run with:

- other seeds: every image draws from ``(dataset.seed, "web", number)``, a split name no WSSS split uses, so no
  web image is a train or val image;
- more compositions: one to ``web_max_objects`` objects per image (the benchmark has fewer);
- never the same image twice: image ``epoch * web_images + index``, so each epoch is new data;
- alt-text captions that name every object present (the generator's caption), with clauses dropped at random
  (``caption_dropout``), as web captions name some of what they show, and object phrases stripped of their
  attributes at random (``attribute_dropout``: "a heron"), so a class word must be matched by the object's look
  and not only by the colour words beside it.

Only images and captions are used; no mask of any split (web or WSSS) reaches the pre-training.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from weakclip_core.config.dataset import SYNTHETIC_WEB_SPLIT, SyntheticConfig
from weakclip_core.data.synthetic import render_sample
from weakclip_core.data.transforms import sample_rng, to_tensor
from weakclip_core.training.clip_pretrain import caption_clauses, drop_clauses, light_augmentation

_COUNT_WORDS = ("a", "an", "two", "three", "several")
"""How the generator's object phrases begin ("a red-headed grey heron", "two green-tailed kites")."""


def bare_object_phrase(clause: str) -> str:
    """An object phrase without its attributes ("two red-tailed kites" -> "two kites", "an orange-marked heron"
    -> "a heron": the article re-chosen); any other clause (the background's) is returned unchanged."""
    words = clause.split()
    if len(words) < 3 or words[0] not in _COUNT_WORDS or words[-1] == "background":
        return clause
    name = words[-1]
    if words[0] in ("a", "an"):
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return f"{words[0]} {name}"


def drop_attributes(caption: str, drop_probability: float, rng: np.random.Generator) -> str:
    """Each clause's object phrase loses its attributes with probability ``drop_probability`` (one uniform draw
    per clause); clauses are re-joined by " and " as ``drop_clauses`` joins them."""
    if drop_probability <= 0.0:
        return caption
    clauses = caption_clauses(caption)
    bare = rng.random(len(clauses)) < drop_probability
    return " and ".join(bare_object_phrase(clause) if strip else clause for clause, strip in zip(clauses, bare))


def web_generator_config(benchmark: SyntheticConfig, max_objects: int) -> SyntheticConfig:
    """The benchmark's generator settings with one to ``max_objects`` objects per image (at least the
    benchmark's own maximum). Workers are irrelevant here (the data loader renders one image per call)."""
    return dataclasses.replace(benchmark, min_objects=1, max_objects=max(max_objects, benchmark.max_objects),
                               workers=1)


class WebCaptionStream(Dataset):
    """``(epoch, index)`` → (augmented image (3, S, S), caption with clauses dropped), rendered on demand.

    ``len`` is the number of images per epoch; key ``(epoch, index)`` renders web image number
    ``epoch * images_per_epoch + index``, so epochs never repeat an image. Everything is drawn from
    ``(seed, epoch, index)``: the stream is the same in every process and every run.
    """

    def __init__(self, generator: SyntheticConfig, seed: int, images_per_epoch: int, image_size: int,
                 caption_dropout: float, attribute_dropout: float = 0.0) -> None:
        self.generator = generator
        self.seed = seed
        self.images_per_epoch = images_per_epoch
        self.image_size = image_size
        self.caption_dropout = caption_dropout
        self.attribute_dropout = attribute_dropout

    def __len__(self) -> int:
        return self.images_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        epoch, index = key
        sample = render_sample(self.generator, self.seed, SYNTHETIC_WEB_SPLIT, epoch * self.images_per_epoch + index)
        rng = sample_rng(self.seed, epoch, index)
        augmented = light_augmentation(sample.image, self.image_size, rng)
        caption = drop_clauses(sample.caption, self.caption_dropout, rng)
        return to_tensor(augmented), drop_attributes(caption, self.attribute_dropout, rng)
