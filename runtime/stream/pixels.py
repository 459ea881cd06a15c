"""Frames as the stream takes and gives them: 8-bit RGB [H, W, 3] on the host, converted on the device (inside the
captured graph) to and from the codec's [1, 3, H, W] in [0, 1]."""

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def frame_array(frame: "Image.Image | np.ndarray | Tensor", height: int, width: int) -> np.ndarray | Tensor:
    """A frame as uint8 [height, width, 3]: a PIL image is converted to RGB and resized (Lanczos, as the pipeline
    resizes an init image); an array or CPU tensor must already be uint8 [height, width, 3]."""
    if isinstance(frame, Image.Image):
        frame = frame.convert("RGB")
        if frame.size != (width, height):
            frame = frame.resize((width, height), resample=Image.LANCZOS)
        return np.asarray(frame)
    shape, dtype = tuple(frame.shape), frame.dtype
    if shape != (height, width, 3) or dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"a frame must be uint8 [{height}, {width}, 3] (RGB, the stream's size) or a PIL image; "
                         f"got {dtype} {list(shape)}")  # fmt: skip
    return frame


def to_unit(pixels: Tensor) -> Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [0, 1] (the same values as diffrt.images.image_to_tensor)."""
    return pixels.permute(2, 0, 1)[None].float() / 255.0


def to_uint8(images: Tensor) -> Tensor:
    """[1, 3, H, W] in [0, 1] -> uint8 [H, W, 3], rounded as diffrt.images.to_pil rounds."""
    return (images[0].float() * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
