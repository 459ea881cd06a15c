"""Frames as the stream takes and gives them: 8-bit RGB [H, W, 3] on the host, converted on the device (inside the
captured graph) to and from the codec's [F, 3, H, W] in [0, 1], F frames per call."""

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
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W] in [0, 1] (the same values as diffrt.images.image_to_tensor).
    One frame gets image_to_tensor's very strides too: the VAE's first convolution chooses its CPU path by them (a
    batch stride of H*W*3 instead of 3 moved a pixel by one level), and a one-frame stream is the pipeline's call."""
    if pixels.shape[0] == 1:
        return pixels[0].permute(2, 0, 1)[None].float() / 255.0
    return pixels.permute(0, 3, 1, 2).float() / 255.0


def to_uint8(images: Tensor) -> Tensor:
    """[F, 3, H, W] in [0, 1] -> uint8 [F, H, W, 3], rounded as diffrt.images.to_pil rounds."""
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
