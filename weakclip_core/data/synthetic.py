"""The built-in synthetic WSSS benchmark: hard the way PASCAL VOC is, small enough for a 2-core CPU.

Why it is hard for weak supervision (each knob lives in ``dataset.synthetic``):

- Every object is a large **body** plus a small **discriminative part** (a "head",
  "tail" or "emblem", about ``part_fraction`` of the body's area). Bodies come from a
  pool of four styles (shape family + colour + texture) shared by several classes;
  only the part (class-specific colour and shape) decides the class. A classifier's
  CAM therefore fires on the part and misses most of the body, as VOC CAMs fire on
  faces and wheels. The body is one contiguous region of nearly uniform colour with
  a sharp edge (the background keeps 90 RGB from every body style colour and from the
  body and part colours of the image's objects), so a colour-aware dense CRF can grow
  a part seed to the whole object.
- **Body tint** (``body_tint``, 0 = off): the body's colour is blended this far
  towards the class's part colour, so the whole object carries class evidence and
  a colour-aware CRF can grow a part seed over the body (0 keeps the body
  class-neutral: only the part decides the class, and no CRF can cross the
  part/body colour edge).
- **Part colours** (``part_colours``): ``per_class`` (default) paints each class's part, and with body tint its
  body, in the class's own colour, so colour alone tells the class; ``random`` paints each object in a palette
  colour drawn at random, so only the part's shape and position and the body's outline do. A random CLIP then no
  longer suffices for WeakCLIP, but the small CLIP no longer learns its classes in the default's pre-training
  budget either (docs/METHOD_NOTES.md, "The synthetic benchmark and its CLIP").
- **Context**: each class has a preferred background texture (used with probability
  ``context_prob`` when its colours keep clear of the image's objects) and a companion
  class (added with ``companion_prob``), so CAMs leak onto backgrounds and co-occurring
  objects.
- **Clutter**: procedural textured backgrounds (stripes, checks, noise, gradients,
  waves, dots) and up to ``distractors`` unlabelled body-coloured shapes without a
  part (they are background in the mask).
- **Occlusion**: ``min_objects``..``max_objects`` objects, later ones occluding
  earlier ones with probability ``occlusion``; the mask shows what is visible.
- A 255 **ignore band** ``ignore_band`` px wide on every object boundary, as VOC's.

Determinism: the class designs are fixed; every image draws from its own generator
seeded by ``(dataset.seed, split, index)``, so the output is byte-identical whatever
the number of workers. Guarantee: an image's labels are exactly the foreground
classes with at least one visible, non-ignored pixel in its mask (objects occluded
below ``MIN_VISIBLE_PIXELS`` or with their part mostly hidden are dropped).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from weakclip_core.config.dataset import SyntheticConfig
from weakclip_core.data.layout import IGNORE_INDEX, labels_from_mask, write_image, write_mask

MIN_VISIBLE_PIXELS = 20
"""An object must keep this many visible, non-ignored pixels, or it is dropped."""
MIN_PART_VISIBLE = 0.3
"""An object must keep this fraction of its discriminative part visible, or it is dropped."""
_MAX_LAYOUT_ATTEMPTS = 60

CLASS_WORDS = ("heron", "kite", "beetle", "tractor", "otter", "glider", "lizard", "scooter", "falcon", "barge",
               "badger", "rocket", "turtle", "wagon", "parrot", "yacht", "rabbit", "tram", "gecko", "drone")
"""Foreground class names in order (class c is ``CLASS_WORDS[c - 1]``); plural = name + "s"."""

# Saturated, well separated colours for the class-deciding parts.
_PART_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (225, 30, 35)), ("green", (35, 185, 50)), ("blue", (35, 70, 225)), ("yellow", (245, 220, 25)),
    ("magenta", (220, 40, 205)), ("cyan", (30, 215, 225)), ("orange", (250, 135, 20)),
    ("purple", (120, 35, 175)), ("white", (250, 250, 250)), ("black", (15, 15, 15)))
_PART_SHAPES = ("circle", "triangle", "square", "diamond", "star")
_PART_POSITIONS = ("head", "tail", "emblem")
_PART_ADJECTIVE = {"head": "headed", "tail": "tailed", "emblem": "marked"}


@dataclass(frozen=True)
class BodyStyle:
    """One entry of the body pool shared across classes: outline family, base colour, faint texture."""

    shape: str          # ellipse | box | blob | hexagon
    colour_name: str
    colour: tuple[int, int, int]
    texture: str        # plain | mottled | banded


BODY_STYLES = (
    BodyStyle("ellipse", "grey", (128, 128, 128), "plain"),
    BodyStyle("box", "tan", (196, 164, 112), "mottled"),
    BodyStyle("blob", "slate", (84, 104, 146), "banded"),
    BodyStyle("hexagon", "olive", (122, 128, 52), "mottled"),
)

BACKGROUND_KINDS = ("stripes", "checks", "noise", "gradient", "waves", "dots")
_BACKGROUND_ADJECTIVE = {"stripes": "striped", "checks": "checked", "noise": "mottled", "gradient": "shaded",
                         "waves": "wavy", "dots": "dotted"}
_NAMED_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (20, 20, 20)), ("white", (240, 240, 240)), ("red", (200, 40, 40)), ("green", (40, 160, 60)),
    ("blue", (40, 70, 200)), ("yellow", (230, 210, 50)), ("pink", (235, 150, 190)), ("brown", (120, 70, 30)),
    ("purple", (120, 50, 160)), ("cyan", (60, 200, 210)), ("orange", (240, 140, 40)), ("grey", (128, 128, 128)),
    ("navy", (20, 30, 90)), ("beige", (225, 210, 170)), ("maroon", (110, 20, 40)), ("teal", (20, 120, 120)))
_MIN_BACKGROUND_BODY_DISTANCE = 90.0
"""Background colours keep this RGB distance from every body style colour and from the body and part colours
of the image's own objects (tinted bodies take their class's colour), so every object has a sharp edge."""
_MAX_BACKGROUND_ATTEMPTS = 100_000


@dataclass(frozen=True)
class ClassDesign:
    """What makes class ``index`` (1-based) recognisable, and the context it prefers."""

    index: int
    name: str
    part_colour_name: str
    part_colour: tuple[int, int, int]
    part_shape: str
    part_position: str
    body_styles: tuple[int, int]          # indices into BODY_STYLES this class may wear
    context_kind: str                     # preferred background texture
    context_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    companion: int                        # preferred companion class (1-based, never itself)


def colour_name(rgb: np.ndarray | tuple[int, int, int]) -> str:
    """The nearest name in a small colour vocabulary (for captions)."""
    rgb_array = np.asarray(rgb, dtype=np.float64)
    distances = [float(np.sum((rgb_array - np.asarray(value)) ** 2)) for _, value in _NAMED_COLOURS]
    return _NAMED_COLOURS[int(np.argmin(distances))][0]


_BODY_RGB = np.array([style.colour for style in BODY_STYLES], dtype=np.float64)  # (n_styles, 3)


def _segment_distances(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(N,) RGB distances from ``points`` (N, 3) to the segment ``start``-``end`` (every blend of the two)."""
    direction = end - start
    t = np.clip((points - start) @ direction / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.linalg.norm(points - (start[None, :] + t[:, None] * direction[None, :]), axis=1)


def _keeps_clear_of(avoid: np.ndarray, first: np.ndarray, second: np.ndarray) -> bool:
    """Whether every blend of ``first`` and ``second`` stays ``_MIN_BACKGROUND_BODY_DISTANCE`` from each row
    of ``avoid`` (N, 3)."""
    distances = _segment_distances(avoid, first.astype(np.float64), second.astype(np.float64))
    return bool(distances.min() >= _MIN_BACKGROUND_BODY_DISTANCE)


def _background_colours(rng: np.random.Generator,
                        avoid: np.ndarray = _BODY_RGB) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two random colours whose every blend stays ``_MIN_BACKGROUND_BODY_DISTANCE`` from every colour in
    ``avoid`` (gradients and noise pass through the blends), so bodies keep a sharp colour edge."""
    for _ in range(_MAX_BACKGROUND_ATTEMPTS):
        first, second = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        if _keeps_clear_of(avoid, first, second):
            return ((int(first[0]), int(first[1]), int(first[2])), (int(second[0]), int(second[1]), int(second[2])))
    raise RuntimeError(f"no background colour pair keeps {_MIN_BACKGROUND_BODY_DISTANCE} RGB from the colours "
                       f"{avoid.round().astype(int).tolist()} after {_MAX_BACKGROUND_ATTEMPTS} draws")


@functools.cache
def class_designs(n_classes: int) -> tuple[ClassDesign, ...]:
    """The fixed designs of foreground classes 1..n_classes (independent of the dataset seed).

    A pure function of ``n_classes``, memoised because every image needs it.
    """
    if not 2 <= n_classes <= len(CLASS_WORDS):
        raise ValueError(f"n_classes must be in 2..{len(CLASS_WORDS)}, got {n_classes}")
    design_rng = np.random.default_rng(20240917)
    companion_offset = max(1, n_classes // 3)
    designs = []
    for position in range(n_classes):
        colour_index = position % len(_PART_COLOURS)
        first_style = position % len(BODY_STYLES)
        second_style = (first_style + 1 + (position // len(BODY_STYLES)) % (len(BODY_STYLES) - 1)) % len(BODY_STYLES)
        designs.append(ClassDesign(
            index=position + 1,
            name=CLASS_WORDS[position],
            part_colour_name=_PART_COLOURS[colour_index][0],
            part_colour=_PART_COLOURS[colour_index][1],
            part_shape=_PART_SHAPES[(position + position // len(_PART_COLOURS)) % len(_PART_SHAPES)],
            part_position=_PART_POSITIONS[position % len(_PART_POSITIONS)],
            body_styles=(first_style, second_style),
            context_kind=BACKGROUND_KINDS[position % len(BACKGROUND_KINDS)],
            context_colours=_background_colours(design_rng),
            companion=(position + companion_offset) % n_classes + 1,
        ))
    return tuple(designs)


def class_names(n_classes: int) -> list[str]:
    """``["background", <n_classes foreground names>]`` (K = n_classes + 1 entries)."""
    return ["background", *CLASS_WORDS[:n_classes]]


def image_id(split: str, index: int) -> str:
    return f"syn_{split}_{index:06d}"


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The generator seed of one image: a function of (dataset seed, split name, index) only."""
    split_code = int.from_bytes(split.encode("utf-8")[:16].ljust(16, b"\0"), "little")
    return np.random.SeedSequence([seed, split_code & 0xFFFFFFFF, split_code >> 32 & 0xFFFFFFFF,
                                   split_code >> 64 & 0xFFFFFFFF, split_code >> 96 & 0xFFFFFFFF, index])


# --------------------------------------------------------------------------------------------- drawing

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(ys, xs)``, each (size, size) float64."""
    coordinates = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coordinates, coordinates, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth noise in [0, 1]: a random (cells x cells) grid upsampled bicubically."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    fine = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    low, high = float(fine.min()), float(fine.max())
    return ((fine - low) / max(high - low, 1e-6)).astype(np.float64)


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) blend weights in [0, 1] for a two-colour procedural background."""
    ys, xs = _grid(size)
    angle = rng.uniform(0.0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    across = -xs * math.sin(angle) + ys * math.cos(angle)
    scale = size / 128.0
    if kind == "stripes":
        period = rng.uniform(6.0, 18.0) * scale
        return (((along / period + rng.random()) % 1.0) < 0.5).astype(np.float64)
    if kind == "checks":
        period = rng.uniform(8.0, 22.0) * scale
        return ((np.floor(along / period) + np.floor(across / period)) % 2).astype(np.float64)
    if kind == "noise":
        return _smooth_noise(rng, size, int(rng.integers(4, 12)))
    if kind == "gradient":
        return (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    if kind == "waves":
        period = rng.uniform(10.0, 24.0) * scale
        wobble = rng.uniform(2.0, 6.0) * scale
        return (np.sin(2 * math.pi * (along + wobble * np.sin(2 * math.pi * across / (3 * period))) / period)
                > 0).astype(np.float64)
    if kind == "dots":
        period = rng.uniform(9.0, 20.0) * scale
        offset = rng.random(2) * period
        dy = (ys + offset[0]) % period - period / 2
        dx = (xs + offset[1]) % period - period / 2
        return ((dy ** 2 + dx ** 2) < (0.3 * period) ** 2).astype(np.float64)
    raise ValueError(f"unknown background texture {kind!r} (expected one of {BACKGROUND_KINDS})")


def _blend(weights: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(H, W) weights, two RGB colours -> (H, W, 3) float image."""
    return first[None, None, :] * (1.0 - weights[..., None]) + second[None, None, :] * weights[..., None]


def _outline(shape: str, centre: tuple[float, float], semi_major: float, semi_minor: float, angle: float,
             rng: np.random.Generator) -> list[tuple[float, float]]:
    """Polygon vertices ``(x, y)`` of a body outline (ellipse, rounded box, wobbly blob, hexagon)."""
    if shape == "hexagon":
        t = np.arange(6) * (2 * math.pi / 6)
        local_x, local_y = semi_major * np.cos(t), semi_minor * np.sin(t) * 1.1
    else:
        t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        cos_t, sin_t = np.cos(t), np.sin(t)
        if shape == "ellipse":
            local_x, local_y = semi_major * cos_t, semi_minor * sin_t
        elif shape == "box":  # superellipse, exponent 4: a box with rounded corners
            local_x = semi_major * np.sign(cos_t) * np.abs(cos_t) ** 0.5
            local_y = semi_minor * np.sign(sin_t) * np.abs(sin_t) ** 0.5
        elif shape == "blob":
            phases = rng.uniform(0, 2 * math.pi, size=2)
            radius = 1.0 + 0.10 * np.sin(3 * t + phases[0]) + 0.06 * np.sin(5 * t + phases[1])
            local_x, local_y = semi_major * radius * cos_t, semi_minor * radius * sin_t
        else:
            raise ValueError(f"unknown body shape {shape!r}")
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    xs = centre[0] + local_x * cos_a - local_y * sin_a
    ys = centre[1] + local_x * sin_a + local_y * cos_a
    return list(zip(xs.tolist(), ys.tolist()))


def _part_outline(shape: str, centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a discriminative part whose area is about ``pi * radius**2``."""
    if shape == "circle":
        t = np.linspace(0.0, 2 * math.pi, 32, endpoint=False)
        local = radius * np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "triangle":  # equilateral, same area as the circle
        circumradius = radius * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))
        t = np.arange(3) * (2 * math.pi / 3)
        local = circumradius * np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape in ("square", "diamond"):
        half = radius * math.sqrt(math.pi) / 2
        t = np.arange(4) * (math.pi / 2) + (math.pi / 4 if shape == "square" else 0.0)
        local = half * math.sqrt(2) * np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "star":
        t = np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, 1.45 * radius, 0.65 * radius)
        local = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    else:
        raise ValueError(f"unknown part shape {shape!r}")
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    xs = centre[0] + local[:, 0] * cos_a - local[:, 1] * sin_a
    ys = centre[1] + local[:, 0] * sin_a + local[:, 1] * cos_a
    return list(zip(xs.tolist(), ys.tolist()))


def _polygon_mask(vertices: list[tuple[float, float]], size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(vertices, fill=1)
    return np.asarray(canvas, dtype=bool)


def ignore_band(instance_map: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within a ``width``-px band straddling every boundary between regions.

    ``instance_map`` (H, W) int: 0 background, one id per object. A pixel is in the
    band when the (width+1) x (width+1) window at it (scipy's placement: offsets
    ``-(width+1)//2 .. width//2``) holds two ids, so a straight edge gets exactly
    ``width`` band pixels across it (VOC draws such a band around every object).
    """
    if width <= 0:
        return np.zeros(instance_map.shape, dtype=bool)
    window = width + 1
    highest = ndimage.maximum_filter(instance_map, size=window, mode="nearest")
    lowest = ndimage.minimum_filter(instance_map, size=window, mode="nearest")
    return highest != lowest


# --------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class _Object:
    """One labelled object: geometry masks at image size and how to paint it."""

    class_index: int
    style: int
    body: np.ndarray        # (S, S) bool
    part: np.ndarray        # (S, S) bool, the class-deciding part
    body_colour: np.ndarray  # (3,) float
    part_colour: np.ndarray  # (3,) float
    part_colour_name: str
    axis_angle: float


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image: ``image`` (S, S, 3) uint8, ``mask`` (S, S) uint8 with 255 ignore."""

    image: np.ndarray
    mask: np.ndarray
    classes: list[int]
    caption: str


def _object_count(rng: np.random.Generator, config: SyntheticConfig) -> int:
    """min..max objects, fewer more likely (weights halve per extra object), as in VOC."""
    counts = np.arange(config.min_objects, config.max_objects + 1)
    weights = 0.5 ** (counts - config.min_objects)
    return int(rng.choice(counts, p=weights / weights.sum()))


def _draw_classes(rng: np.random.Generator, config: SyntheticConfig, designs: tuple[ClassDesign, ...]) -> list[int]:
    count = _object_count(rng, config)
    primary = int(rng.integers(1, config.n_classes + 1))
    classes = [primary]
    if rng.random() < config.companion_prob and config.max_objects >= 2:
        classes.append(designs[primary - 1].companion)
        count = max(count, 2)
    while len(classes) < count:
        classes.append(int(rng.integers(1, config.n_classes + 1)))
    return classes


def _make_object(rng: np.random.Generator, config: SyntheticConfig, design: ClassDesign, n_objects: int,
                 placed: list[tuple[float, float, float]]) -> _Object:
    """Draw one object's geometry; ``placed`` holds (x, y, radius) of the objects already drawn."""
    size = config.image_size
    shrink = n_objects ** -0.35
    semi_major = rng.uniform(0.18, 0.34) * size * shrink
    semi_minor = semi_major * rng.uniform(0.5, 0.8)
    part_radius = math.sqrt(config.part_fraction * semi_major * semi_minor)
    if design.part_position == "emblem":
        part_radius = min(part_radius, 0.8 * semi_minor)
        reach = semi_major
    else:
        reach = semi_major + 1.2 * part_radius
    low, high = min(reach, size / 2), max(size - reach, size / 2)
    if placed and rng.random() < config.occlusion:
        anchor_x, anchor_y, anchor_radius = placed[int(rng.integers(len(placed)))]
        direction = rng.uniform(0, 2 * math.pi)
        distance = rng.uniform(0.4, 0.9) * (anchor_radius + reach)
        centre = (float(np.clip(anchor_x + distance * math.cos(direction), low, high)),
                  float(np.clip(anchor_y + distance * math.sin(direction), low, high)))
    else:
        candidates = rng.uniform(low, high, size=(8, 2))
        if placed:
            clearance = [min(math.hypot(x - px, y - py) - pr for px, py, pr in placed) for x, y in candidates]
            best = candidates[int(np.argmax(clearance))]
        else:
            best = candidates[0]
        centre = (float(best[0]), float(best[1]))
    angle = rng.uniform(0, 2 * math.pi)
    style_index = design.body_styles[int(rng.integers(2))]
    style = BODY_STYLES[style_index]
    body = _polygon_mask(_outline(style.shape, centre, semi_major, semi_minor, angle, rng), size)
    if design.part_position == "emblem":
        part_centre = centre
    else:
        sign = 1.0 if design.part_position == "head" else -1.0
        offset = sign * (semi_major + 0.3 * part_radius)
        part_centre = (centre[0] + offset * math.cos(angle), centre[1] + offset * math.sin(angle))
    part = _polygon_mask(_part_outline(design.part_shape, part_centre, part_radius, angle), size)
    jitter = rng.uniform(-1.0, 1.0, size=3) * config.body_colour_jitter * 255.0
    if config.part_colours == "random":  # any palette colour: only shape, position and outline tell the class
        base_name, base_colour = _PART_COLOURS[int(rng.integers(len(_PART_COLOURS)))]
    else:
        base_name, base_colour = design.part_colour_name, design.part_colour
    tinted = ((1.0 - config.body_tint) * np.asarray(style.colour, dtype=np.float64)
              + config.body_tint * np.asarray(base_colour, dtype=np.float64))
    body_colour = np.clip(tinted + jitter, 0, 255)
    part_colour = np.clip(np.asarray(base_colour, dtype=np.float64) + rng.uniform(-8, 8, size=3), 0, 255)
    placed.append((centre[0], centre[1], reach))
    return _Object(class_index=design.index, style=style_index, body=body, part=part,
                   body_colour=body_colour, part_colour=part_colour, part_colour_name=base_name, axis_angle=angle)


def _instance_map(objects: list[_Object], size: int) -> np.ndarray:
    """(S, S) int32: 0 background, k+1 where object k is visible (later objects on top)."""
    instances = np.zeros((size, size), dtype=np.int32)
    for number, obj in enumerate(objects, start=1):
        instances[obj.body | obj.part] = number
    return instances


def _visible_objects(objects: list[_Object], config: SyntheticConfig) -> list[_Object]:
    """Drop objects occluded below the visibility rules until every remaining one passes them."""
    while objects:
        instances = _instance_map(objects, config.image_size)
        band = ignore_band(instances, config.ignore_band)
        keep = []
        for number, obj in enumerate(objects, start=1):
            visible = instances == number
            part_pixels = int(obj.part.sum())
            part_visible = int((obj.part & visible).sum()) / max(part_pixels, 1)
            if int((visible & ~band).sum()) >= MIN_VISIBLE_PIXELS and part_visible >= MIN_PART_VISIBLE:
                keep.append(obj)
        if len(keep) == len(objects):
            return objects
        objects = keep
    return objects


def _body_shading(rng: np.random.Generator, style: BodyStyle, size: int, angle: float) -> np.ndarray:
    """(S, S) additive intensity variation of a body: faint, so the body stays nearly uniform."""
    ys, xs = _grid(size)
    along = (xs * math.cos(angle) + ys * math.sin(angle)) / size
    shading = 10.0 * (along - along.mean())
    if style.texture == "mottled":
        shading = shading + 14.0 * (_smooth_noise(rng, size, 6) - 0.5)
    elif style.texture == "banded":
        period = rng.uniform(0.08, 0.14)
        shading = shading + 6.0 * np.sign(np.sin(2 * math.pi * along / period))
    return shading


def _caption(objects: list[_Object], designs: tuple[ClassDesign, ...], background_kind: str,
             background_colour: tuple[int, int, int]) -> str:
    """e.g. "a green-headed grey heron and two red-tailed kites on a wavy blue background"."""
    phrases = []
    order = list(dict.fromkeys(obj.class_index for obj in objects))
    for class_index in order:
        design = designs[class_index - 1]
        members = [obj for obj in objects if obj.class_index == class_index]
        colours = list(dict.fromkeys(obj.part_colour_name for obj in members))  # one per class unless random
        colour_words = "/".join(colours)  # "red/blue-headed" (no " and ": that separates clauses)
        adjective = f"{colour_words}-{_PART_ADJECTIVE[design.part_position]}"
        body_names = list(dict.fromkeys(BODY_STYLES[obj.style].colour_name for obj in members))
        body_word = f" {body_names[0]}" if len(body_names) == 1 else ""
        if len(members) == 1:
            article = "an" if adjective[0] in "aeiou" else "a"
            phrases.append(f"{article} {adjective}{body_word} {design.name}")
        else:
            count_word = {2: "two", 3: "three"}.get(len(members), "several")
            phrases.append(f"{count_word} {adjective}{body_word} {design.name}s")
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return (f"{listing} on a {_BACKGROUND_ADJECTIVE[background_kind]} {colour_name(background_colour)} "
            f"background")


def render_sample(config: SyntheticConfig, seed: int, split: str, index: int) -> SyntheticSample:
    """Generate image ``index`` of ``split``: a pure function of (config, seed, split, index)."""
    rng = np.random.default_rng(image_seed(seed, split, index))
    designs = class_designs(config.n_classes)
    size = config.image_size

    objects: list[_Object] = []
    best: list[_Object] = []
    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        classes = _draw_classes(rng, config, designs)
        placed: list[tuple[float, float, float]] = []
        drawn = [_make_object(rng, config, designs[c - 1], len(classes), placed) for c in classes]
        objects = _visible_objects(drawn, config)
        if len(objects) >= config.min_objects:
            break
        if len(objects) > len(best):
            best = objects
    else:
        objects = best  # no room for min_objects at this size: keep the fullest valid layout
    if not objects:
        raise RuntimeError(f"synthetic image {image_id(split, index)}: no object fits a {size}px image; "
                           f"raise dataset.synthetic.image_size")

    primary = designs[objects[0].class_index - 1]
    # The background stays clear of this image's own body and part colours too: with body_tint a body takes
    # its class's colour, which the style-colour rule alone does not keep off the background.
    avoid = np.vstack([_BODY_RGB, *(obj.body_colour for obj in objects), *(obj.part_colour for obj in objects)])
    context_first, context_second = (np.asarray(colour, dtype=np.float64) for colour in primary.context_colours)
    if rng.random() < config.context_prob and _keeps_clear_of(avoid, context_first, context_second):
        background_kind = primary.context_kind
        first = context_first + rng.uniform(-12, 12, size=3)
        second = context_second + rng.uniform(-12, 12, size=3)
    else:
        background_kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
        first_colour, second_colour = _background_colours(rng, avoid)
        first = np.asarray(first_colour, dtype=np.float64)
        second = np.asarray(second_colour, dtype=np.float64)
    image = _blend(_texture(background_kind, rng, size), first, second)
    dominant = tuple(int(v) for v in np.clip(first if background_kind != "dots" else second, 0, 255))

    n_distractors = int(rng.integers(0, config.distractors + 1))
    for _ in range(n_distractors):
        style = BODY_STYLES[int(rng.integers(len(BODY_STYLES)))]
        semi_major = rng.uniform(0.05, 0.12) * size
        centre = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
        angle = float(rng.uniform(0, 2 * math.pi))
        clutter = _polygon_mask(_outline(style.shape, centre, semi_major, semi_major * rng.uniform(0.4, 0.9),
                                         angle, rng), size)
        colour = np.clip(np.asarray(style.colour) + rng.uniform(-1, 1, 3) * config.body_colour_jitter * 255, 0, 255)
        image[clutter] = colour

    for obj in objects:
        shading = _body_shading(rng, BODY_STYLES[obj.style], size, obj.axis_angle)
        body_pixels = obj.body & ~obj.part
        image[body_pixels] = np.clip(obj.body_colour[None, :] + shading[body_pixels][:, None], 0, 255)
        image[obj.part] = obj.part_colour

    image = image + rng.normal(0.0, 3.0, size=image.shape)
    instances = _instance_map(objects, size)
    class_of_instance = np.array([0] + [obj.class_index for obj in objects], dtype=np.uint8)
    mask = class_of_instance[instances]
    mask[ignore_band(instances, config.ignore_band)] = IGNORE_INDEX
    caption = _caption(objects, designs, background_kind, dominant)
    return SyntheticSample(image=np.clip(np.rint(image), 0, 255).astype(np.uint8), mask=mask,
                           classes=labels_from_mask(mask), caption=caption)


# --------------------------------------------------------------------------------------------- dataset

@dataclass(frozen=True)
class _Job:
    config: SyntheticConfig
    seed: int
    split: str
    index: int
    root: Path


@dataclass(frozen=True)
class SyntheticRecord:
    """What the writer returns per image (the pixels are already on disk)."""

    image_id: str
    split: str
    classes: list[int]
    caption: str


def _write_one(job: _Job) -> SyntheticRecord:
    sample = render_sample(job.config, job.seed, job.split, job.index)
    identifier = image_id(job.split, job.index)
    write_image(job.root / "JPEGImages" / f"{identifier}.jpg", sample.image)
    write_mask(job.root / "SegmentationClass" / f"{identifier}.png", sample.mask)
    return SyntheticRecord(image_id=identifier, split=job.split, classes=sample.classes, caption=sample.caption)


def generate_synthetic(config: SyntheticConfig, seed: int, root: str | Path,
                       split_sizes: dict[str, int], progress: bool = True) -> list[SyntheticRecord]:
    """Render every image of ``split_sizes`` (split name -> count) into ``root``'s JPEGImages/ and
    SegmentationClass/, with ``config.workers`` processes; returns the records in split, index order.

    The caller writes split lists, ``labels.json`` and ``captions.txt`` from the records.
    """
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    jobs = [_Job(config, seed, split, index, root) for split, count in split_sizes.items() for index in range(count)]
    bar = tqdm(total=len(jobs), desc="synthetic", unit="img", disable=not progress)
    records: list[SyntheticRecord] = []
    results: Iterator[SyntheticRecord]
    try:
        if config.workers == 1:
            results = map(_write_one, jobs)
            for record in results:
                records.append(record)
                bar.update()
        else:
            # fork where the OS has it: workers need no re-import of __main__ (spawn breaks for
            # ``python - <script``) and start in milliseconds; they only run numpy/PIL/scipy code.
            start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(start_method).Pool(config.workers) as pool:
                for record in pool.imap(_write_one, jobs, chunksize=16):
                    records.append(record)
                    bar.update()
    finally:
        bar.close()
    return records
