"""The shipped adherence judge: its recorded hash, its accuracy on fresh procedural images, and the metric."""

import hashlib
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffrt.train import judge as judge_lib
from diffrt.train import shapes

FRESH = 4 * 10**9  # neither the training seeds nor the README's evaluation range (10**9 ...)
README = os.path.join(os.path.dirname(judge_lib.JUDGE_FILE), "README.md")


@pytest.fixture(scope="module")
def judge():
    return judge_lib.load_judge()


def test_shipped_file_is_small_and_its_hash_is_recorded():
    size = os.path.getsize(judge_lib.JUDGE_FILE)
    assert size < 2 * 2**20, size
    with open(judge_lib.JUDGE_FILE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(README) as f:
        recorded = re.findall(r"judge\.safetensors.*sha256 `([0-9a-f]{64})`", f.read())
    assert recorded == [digest]


@pytest.mark.parametrize("split,count", [("all", 1500), ("held_out", 500)])
def test_accuracy_on_fresh_images_is_at_least_99_percent(judge, split, count):
    result = judge_lib.evaluate(judge, count, split, start=FRESH)
    assert result["accuracy"] >= 0.99, result


def test_adherence_is_all_attributes_and_catches_one_wrong_attribute(judge):
    samples = [shapes.sample(FRESH + 10_000 + i, 64, "all") for i in range(40)]
    images = np.stack([s.image for s in samples])
    right = judge_lib.adherence(judge, images, [s.labels for s in samples])
    assert right["all"] >= 0.97 and len(right["matches"]) == 40
    # One attribute changed per prompt (background, then a color, then the layout): no image adheres to those.
    wrong = []
    for i, s in enumerate(samples):
        lab = s.labels
        other = next(c for c in shapes.COLORS if c != lab.background and c not in lab.colors)
        if i % 3 == 0:
            wrong.append(shapes.Labels(lab.layout, lab.colors, lab.shapes, other, lab.size))
        elif i % 3 == 1:
            wrong.append(shapes.Labels(lab.layout, (other, *lab.colors[1:]), lab.shapes, lab.background, lab.size))
        else:
            flip = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left",
                    "above": "left_of", "left_of": "above"}  # fmt: skip
            wrong.append(shapes.Labels(flip[lab.layout], lab.colors, lab.shapes, lab.background, lab.size))
    result = judge_lib.adherence(judge, images, wrong)
    assert result["all"] == 0.0
    assert result["per_head"]["background"] < 0.7 and result["per_head"]["shape1"] >= 0.97


def test_predict_takes_uint8_and_float_images_of_other_sizes(judge):
    s = shapes.sample(FRESH + 99, 128, "all")
    as_uint8 = judge.predict(s.image[None])
    as_float = judge.predict(torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 255)
    assert as_uint8.tolist() == as_float.tolist() == [shapes.label_indices(s.labels)]
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(s.image[None].astype(np.float32))


def test_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="diffrt train judge"):
        judge_lib.load_judge(str(tmp_path / "missing.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="judge_config"):
        judge_lib.load_judge(str(tmp_path / "other.safetensors"))


def test_augment_keeps_images_in_range():
    x = torch.rand(8, 3, 64, 64)
    y = judge_lib.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
