"""A procedural captioned dataset: one or two flat shapes on a plain background, with a caption and exact labels.

Every sample is a pure function of its seed (`sample(seed)`): the same seed gives the same image, caption and labels
on any machine. Images are drawn with PIL at SUPERSAMPLE times the size and box-filtered down (anti-aliasing).

The caption grammar (the only phrasings there are, so `parse_caption` inverts `caption` exactly):
    one shape:  "a {small|large} {color} {shape} {on the left|on the right|at the top|at the bottom|in the center},
                 {color} background"
    two shapes: "a|an {color} {shape} {above|to the left of} a|an {color} {shape}, {color} background"
With two shapes the first one named is the upper (above) or the left one (to the left of), so the labels are a
function of the image alone: the judge reads slot 1 as the upper/left shape.

Composition test: the (color, shape) pairs in HELD_OUT_PAIRS never appear in training samples (split "train");
`is_held_out` tells whether a sample contains one; split "held_out" draws only samples that do.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Well separated in hue and lightness, each with a plain English name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 40),
    "green": (30, 160, 60),
    "blue": (35, 80, 225),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")  # one shape
RELATIONS = ("above", "left_of")  # two shapes; slot 1 is the upper / the left one
LAYOUTS = POSITIONS + RELATIONS
# Each shape held out with exactly one color and each of these colors once: every color and every shape is still seen
# in training, only these pairings are not. 4 of the 32 pairs.
HELD_OUT_PAIRS = frozenset({("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square")})
SPLITS = ("train", "held_out", "all")

_POSITION_WORDS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_RELATION_WORDS = {"above": "above", "left_of": "to the left of"}
SUPERSAMPLE = 4
TWO_SHAPE_SHARE = 0.5


@dataclass(frozen=True)
class Labels:
    """The exact attributes of a sample (and of a prompt). Two shapes: slot 0 is the upper/left one, size is None."""

    layout: str  # one of LAYOUTS
    colors: tuple[str, ...]  # one or two, slot order
    shapes: tuple[str, ...]
    background: str
    size: str | None = None  # "small" / "large" for one shape

    @property
    def count(self) -> int:
        return len(self.shapes)


# The label heads a classifier predicts (the judge, the text encoder's pretraining): name -> classes.
HEADS: dict[str, tuple[str, ...]] = {
    "layout": LAYOUTS,
    "size": (*SIZES, "none"),
    "color1": COLORS,
    "shape1": SHAPES,
    "color2": (*COLORS, "none"),
    "shape2": (*SHAPES, "none"),
    "background": COLORS,
}


def label_indices(labels: Labels) -> list[int]:
    """The class index of each head in HEADS order."""
    two = labels.count == 2
    values = {
        "layout": labels.layout,
        "size": labels.size or "none",
        "color1": labels.colors[0],
        "shape1": labels.shapes[0],
        "color2": labels.colors[1] if two else "none",
        "shape2": labels.shapes[1] if two else "none",
        "background": labels.background,
    }
    return [HEADS[h].index(values[h]) for h in HEADS]


def caption(labels: Labels) -> str:
    if labels.count == 1:
        thing = f"a {labels.size} {labels.colors[0]} {labels.shapes[0]} {_POSITION_WORDS[labels.layout]}"
    else:
        first, second = (f"{_article(c)} {c} {s}" for c, s in zip(labels.colors, labels.shapes, strict=True))
        thing = f"{first} {_RELATION_WORDS[labels.layout]} {second}"
    return f"{thing}, {labels.background} background"


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def parse_caption(text: str) -> Labels:
    """The labels a caption of this grammar states; ValueError for text outside the grammar."""
    words = text.strip().lower()
    thing, sep, rest = words.rpartition(", ")
    bg = rest.removesuffix(" background")
    if not sep or bg == rest or bg not in COLORS:
        raise ValueError(f"caption {text!r} does not end in ', COLOR background' with COLOR one of {COLORS}")
    for layout, phrase in _RELATION_WORDS.items():
        first, found, second = thing.partition(f" {phrase} ")
        if found:
            a, b = _noun_phrase(first, text), _noun_phrase(second, text)
            return Labels(layout, (a[0], b[0]), (a[1], b[1]), bg)
    for layout, phrase in _POSITION_WORDS.items():
        if thing.endswith(" " + phrase):
            parts = thing.removesuffix(" " + phrase).split(" ")
            if len(parts) == 4 and parts[0] == "a" and parts[1] in SIZES:
                color, shape = _noun_phrase(" ".join([_article(parts[2]), *parts[2:]]), text)
                return Labels(layout, (color,), (shape,), bg, parts[1])
    raise ValueError(f"caption {text!r} is outside the grammar (see diffrt.train.shapes)")


def _noun_phrase(phrase: str, text: str) -> tuple[str, str]:
    parts = phrase.split(" ")
    if len(parts) != 3 or parts[0] != _article(parts[1]) or parts[1] not in COLORS or parts[2] not in SHAPES:
        raise ValueError(
            f"caption {text!r}: {phrase!r} is not 'a COLOR SHAPE' ('an' before a vowel; colors {COLORS}, "
            f"shapes {SHAPES})"
        )
    return parts[1], parts[2]


def is_held_out(labels: Labels) -> bool:
    """True when any shape of the sample has a held-out (color, shape) pair."""
    return any(pair in HELD_OUT_PAIRS for pair in zip(labels.colors, labels.shapes, strict=True))


def draw_labels(rng: random.Random, split: str = "train") -> Labels:
    """Random labels of the split: "train" never holds a held-out pair, "held_out" always does, "all" either."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    while True:
        two = rng.random() < TWO_SHAPE_SHARE
        n = 2 if two else 1
        colors = tuple(rng.choice(COLORS) for _ in range(n))
        shapes = tuple(rng.choice(SHAPES) for _ in range(n))
        if split == "held_out" and rng.random() < 0.5:  # force one held-out pair, so the draw ends quickly
            i = rng.randrange(n)
            color, shape = rng.choice(sorted(HELD_OUT_PAIRS))
            colors, shapes = _replace(colors, i, color), _replace(shapes, i, shape)
        background = rng.choice([c for c in COLORS if c not in colors])  # the shapes stay visible
        if two:
            labels = Labels(rng.choice(RELATIONS), colors, shapes, background)
        else:
            labels = Labels(rng.choice(POSITIONS), colors, shapes, background, rng.choice(SIZES))
        held = is_held_out(labels)
        if split == "all" or held == (split == "held_out"):
            return labels


def _replace(t: tuple, i: int, value) -> tuple:
    return (*t[:i], value, *t[i + 1 :])


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # [size, size, 3] uint8 RGB
    caption: str
    labels: Labels


def _rng(seed: int) -> random.Random:
    return random.Random(f"shapes:{seed}")  # a str seed is hashed deterministically (sha512), unlike hash()


def sample(seed: int, size: int = 64, split: str = "train") -> Sample:
    """The sample of this seed: labels drawn from the split, then placement jitter, then the image."""
    rng = _rng(seed)
    labels = draw_labels(rng, split)
    return Sample(render(labels, rng, size), caption(labels), labels)


def labels_of(seed: int, split: str = "train") -> Labels:
    """The labels of `sample(seed, split)` without drawing its image."""
    return draw_labels(_rng(seed), split)


def _placements(labels: Labels, rng: random.Random) -> list[tuple[float, float, float]]:
    """(center x, center y, radius) of each shape as fractions of the image side; jitter never crosses a class line:
    small radius <= 0.13 < 0.18 <= large; left/right/top/bottom centers >= 0.13 from the center's; every shape
    stays inside the image (the outermost vertex is 1.35 r from the centre)."""
    u = rng.uniform
    if labels.count == 1:
        r = u(0.10, 0.13) if labels.size == "small" else u(0.18, 0.20)
        near, mid = u(0.29, 0.33), u(0.44, 0.56)
        x, y = {
            "left": (near, mid),
            "right": (1 - near, mid),
            "top": (mid, near),
            "bottom": (mid, 1 - near),
            "center": (u(0.46, 0.54), u(0.46, 0.54)),
        }[labels.layout]
        return [(x, y, r)]
    out = []
    for first in (True, False):
        along = u(0.24, 0.28) if first else u(0.72, 0.76)
        across = u(0.36, 0.64)
        r = u(0.13, 0.16)
        out.append((across, along, r) if labels.layout == "above" else (along, across, r))
    return out


def _polygon(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices for square/triangle/star, sized so their areas are close to a circle of radius r."""
    if shape == "square":
        k, radii = 4, [r * 1.2]
        angle += math.pi / 4
    elif shape == "triangle":
        k, radii = 3, [r * 1.35]
        angle -= math.pi / 2
        y += r * 0.3375  # centre the bounding box (vertices reach 1.35r up, 0.675r down)
    else:  # a five-pointed star, fat enough to stay a star at 14 pixels
        k, radii = 10, [r * 1.35, r * 0.62]
        angle -= math.pi / 2
    theta = angle + np.arange(k) * (2 * math.pi / k)
    rad = np.resize(np.asarray(radii), k)
    return list(zip((x + rad * np.cos(theta)).tolist(), (y + rad * np.sin(theta)).tolist(), strict=True))


def render(labels: Labels, rng: random.Random, size: int = 64) -> np.ndarray:
    """Draw the labels' shapes with random placement from `rng`: [size, size, 3] uint8."""
    if size < 16:
        raise ValueError(f"image size {size} is too small for the shapes to be told apart; use at least 16")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[labels.background])
    draw = ImageDraw.Draw(image)
    for (x, y, r), color, shape in zip(_placements(labels, rng), labels.colors, labels.shapes, strict=True):
        x, y, r = x * big, y * big, r * big
        angle = math.radians(rng.uniform(-12, 12))
        fill = PALETTE[color]
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon(_polygon(shape, x, y, r, angle), fill=fill)
    return np.array(image.resize((size, size), Image.Resampling.BOX))


def batch(
    seeds, size: int = 64, split: str = "train", images: bool = True
) -> tuple[np.ndarray | None, list[str], np.ndarray]:
    """(images [N, size, size, 3] uint8 or None, captions, label indices [N, len(HEADS)] int64) for these seeds."""
    if images:
        samples = [sample(int(s), size, split) for s in seeds]
        pixels, labels = np.stack([s.image for s in samples]), [s.labels for s in samples]
    else:
        pixels, labels = None, [labels_of(int(s), split) for s in seeds]
    indices = np.array([label_indices(x) for x in labels], dtype=np.int64)
    return pixels, [caption(x) for x in labels], indices
