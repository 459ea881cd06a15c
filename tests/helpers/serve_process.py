"""The serving tests' server process (benchmarks/serve_process.py, shared with the load benchmark) and the judge's
reading of a returned picture."""

import io

import numpy as np
from PIL import Image

from benchmarks.serve_process import free_port, rss_bytes, server_process

__all__ = ["free_port", "judge_reads", "picture", "rss_bytes", "server_process"]


def picture(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 of an image file's bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def judge_reads(pixels: np.ndarray, prompt: str) -> dict:
    """The adherence judge's verdict on one 64x64 picture against its prompt ({"all": 1.0} when it matches)."""
    from diffrt.train import judge as judge_lib
    from diffrt.train import shapes

    return judge_lib.adherence(judge_lib.load_judge(), pixels[None], [shapes.parse_caption(prompt)])
