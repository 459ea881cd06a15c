"""Images in and out of the pipeline: PIL or tensors in [0, 1] -> model input; decoded tensors -> the output type."""

import numpy as np
import torch
from PIL import Image


def image_to_tensor(image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A PIL image (resized to width x height, Lanczos, as diffusers' VaeImageProcessor) or a [B, 3, H, W] tensor in
    [0, 1] -> float32 [B, 3, H, W] in [0, 1]."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (image if image.ndim == 4 else image[None]).float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit RGB images (rounded as diffusers' numpy_to_pil)."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def to_output(images: torch.Tensor, output_type: str):
    """Decoded images [B, 3, H, W] in [0, 1] as "pt" (the tensor itself), "np" ([B, H, W, 3] float32) or "pil"."""
    if output_type == "pt":
        return images
    if output_type == "np":
        return images.permute(0, 2, 3, 1).float().cpu().numpy()
    return to_pil(images)
