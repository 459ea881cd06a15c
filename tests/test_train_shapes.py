"""The procedural dataset: determinism, the held-out split, and captions / labels / pixels telling the same story."""

import numpy as np
import pytest

from diffrt.train import shapes

SEEDS = range(3000)


def test_same_seed_same_sample_and_seeds_differ():
    a, b = shapes.sample(12345), shapes.sample(12345)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.labels == b.labels
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    others = [shapes.sample(s) for s in range(20)]
    assert len({o.image.tobytes() for o in others}) == 20
    assert shapes.sample(7, size=32).image.shape == (32, 32, 3)
    assert shapes.labels_of(77, "held_out") == shapes.sample(77, 16, "held_out").labels


def test_known_sample_is_stable_across_machines():
    """A str-seeded random.Random is the same on every platform and Python version: pin one caption."""
    assert shapes.sample(7).caption == "a large green triangle in the center, black background"


def test_held_out_split_logic():
    train = [shapes.labels_of(s, "train") for s in SEEDS]
    held = [shapes.labels_of(s, "held_out") for s in range(1000)]
    every = [shapes.labels_of(s, "all") for s in SEEDS]
    assert not any(shapes.is_held_out(x) for x in train)
    assert all(shapes.is_held_out(x) for x in held)
    share = np.mean([shapes.is_held_out(x) for x in every])
    assert 0.08 < share < 0.25, share  # one shape: 4/32 pairs; two shapes: ~23%
    # Every color and every shape is still seen in training; only the held-out pairings are not.
    seen = {pair for x in train for pair in zip(x.colors, x.shapes, strict=True)}
    assert {c for c, _ in seen} == set(shapes.COLORS) and {s for _, s in seen} == set(shapes.SHAPES)
    assert seen == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES} - shapes.HELD_OUT_PAIRS
    assert {s for _, s in shapes.HELD_OUT_PAIRS} == set(shapes.SHAPES)  # each shape held out with one color
    assert shapes.is_held_out(shapes.parse_caption("a yellow circle above a red star, blue background"))
    assert not shapes.is_held_out(shapes.parse_caption("a large red circle on the left, blue background"))


def test_captions_and_labels_invert_each_other():
    for s in SEEDS:
        x = shapes.sample(s, 16, "all") if s < 50 else None
        labels = x.labels if x else shapes.labels_of(s, "all")
        text = shapes.caption(labels)
        assert shapes.parse_caption(text) == labels
        assert labels_from_indices(shapes.label_indices(labels)) == labels
        assert labels.background not in labels.colors
    assert shapes.caption(shapes.parse_caption("an orange star above a blue square, white background")) == (
        "an orange star above a blue square, white background"
    )
    assert shapes.parse_caption("a large red circle on the left, blue background") == shapes.Labels(
        "left", ("red",), ("circle",), "blue", "large"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a large red circle on the left",
        "a large red circle on the left, teal background",
        "a red circle on the left, blue background",
        "a large red hexagon at the top, blue background",
        "a orange star above a blue square, white background",
        "a red circle below a blue star, white background",
    ],
)
def test_text_outside_the_grammar_is_refused(text):
    with pytest.raises(ValueError, match="caption"):
        shapes.parse_caption(text)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        shapes.sample(0, split="test")
    with pytest.raises(ValueError, match="too small"):
        shapes.sample(0, size=8)


def _mask(image: np.ndarray, color: str) -> np.ndarray:
    """Pixels within anti-aliasing distance of a palette color."""
    return np.abs(image.astype(int) - shapes.PALETTE[color]).sum(-1) < 30


def test_pixels_show_what_the_labels_say():
    """Background at the corners; each shape's color where its position says; small shapes smaller than large."""
    areas = {"small": [], "large": []}
    for seed in range(400):
        x = shapes.sample(seed, 64, "all")
        img, lab = x.image, x.labels
        for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
            assert tuple(corner) == shapes.PALETTE[lab.background], x.caption
        ys, xs = np.mgrid[0:64, 0:64] / 64
        if lab.count == 1:
            m = _mask(img, lab.colors[0])
            cx, cy = xs[m].mean(), ys[m].mean()
            expect = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
            expect["center"] = abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1
            assert expect[lab.layout], (x.caption, cx, cy)
            areas[lab.size].append(m.sum())
        elif lab.colors[0] != lab.colors[1]:
            c = [(xs[_mask(img, k)].mean(), ys[_mask(img, k)].mean()) for k in lab.colors]
            axis = 1 if lab.layout == "above" else 0
            assert c[0][axis] + 0.3 < c[1][axis], (x.caption, c)
    assert max(areas["small"]) < min(areas["large"]), (max(areas["small"]), min(areas["large"]))


def test_batch_matches_samples():
    images, captions, labels = shapes.batch(range(5, 9), 32, "all")
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4, len(shapes.HEADS))
    for i, s in enumerate(range(5, 9)):
        x = shapes.sample(s, 32, "all")
        assert np.array_equal(images[i], x.image) and captions[i] == x.caption
        assert labels[i].tolist() == shapes.label_indices(x.labels)
    no_images, captions_2, labels_2 = shapes.batch(range(5, 9), 32, "all", images=False)
    assert no_images is None and captions_2 == captions and np.array_equal(labels_2, labels)


def labels_from_indices(indices) -> shapes.Labels:
    """Inverse of `label_indices`."""
    v = {h: shapes.HEADS[h][int(i)] for h, i in zip(shapes.HEADS, indices, strict=True)}
    two = v["layout"] in shapes.RELATIONS
    colors = (v["color1"], v["color2"]) if two else (v["color1"],)
    kinds = (v["shape1"], v["shape2"]) if two else (v["shape1"],)
    size = None if v["size"] == "none" else v["size"]
    return shapes.Labels(v["layout"], colors, kinds, v["background"], size)
