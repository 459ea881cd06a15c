"""The harness's check on each timed generation (`diffrt.latency.image_check`): issue 11 asks for no NaN and no black
image at any size, so every end-to-end row says whether its last image was finite and how flat its flattest was."""

import torch

from diffrt.latency import image_check


def test_a_noisy_batch_passes_and_names_its_flattest_image():
    images = torch.rand(2, 3, 8, 8, dtype=torch.float16)
    images[1] = images[1] * 0.01 + 0.5  # nearly flat, still an image
    check = image_check(images)
    assert check["image_finite"] is True
    assert 0 < check["image_min_std"] < 0.01


def test_a_nan_or_a_black_image_is_flagged():
    images = torch.rand(2, 3, 8, 8)
    images[0, 1, 2, 3] = float("nan")
    assert image_check(images)["image_finite"] is False
    black = torch.rand(3, 3, 8, 8)
    black[2] = 0
    assert image_check(black)["image_min_std"] == 0
