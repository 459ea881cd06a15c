"""Decoding latents in parts, for decodes that do not fit in device memory whole.

The VAE decoder's peak memory is a few tensors at the output resolution times its widest channel count (a 2048²
SD decode holds several GB per image), far more than the UNet's. So a generation whose UNet fits but whose decode
does not is decoded in parts instead of refused: image by image first (exact: the decoder treats each image on its
own), then, where one image is still too large, in overlapping square tiles of latents decoded one at a time and
blended with linear ramps across each overlap. Tiles are not exact: the decoder's GroupNorm statistics and its
mid-block attention see one tile instead of the whole image, so tiles differ slightly in tone, and the ramps hide
the seams (diffusers' `enable_tiling` does the same; the error against a whole decode is in
tests/test_tiled_decode.py and the README). Every tile has the same shape, so a CUDA graph or an engine profile
serves them all.
"""

from collections.abc import Callable

import torch
from torch import Tensor

MIN_TILE = 256  # pixels a side: smaller tiles lose too much context (GroupNorm statistics, attention)


def decode_in_parts(decode: Callable[[Tensor], Tensor], latents: Tensor, tile: int | None, scale: int) -> Tensor:
    """decode(latents) [B, C, h, w] -> images [B, 3, h*scale, w*scale], whole when `tile` is None, else image by
    image in tiles of at most `tile` pixels a side (a tile as large as the image decodes it whole)."""
    if tile is None:
        return decode(latents)
    tile_latent = max(1, tile // scale)
    overlap = tile_latent // 4
    return torch.cat([_tiled(decode, latents[i : i + 1], tile_latent, overlap, scale) for i in range(len(latents))])


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, size), consecutive ones overlapping by at least `overlap`; the
    last one flush with the end, so every tile has the same size."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _tiled(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int, overlap: int, scale: int) -> Tensor:
    _, _, h, w = z.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) == len(xs) == 1:
        return decode(z)
    out = weight = None
    for y in ys:
        for x in xs:
            piece = decode(z[:, :, y : y + th, x : x + tw]).float()
            if out is None:
                out = piece.new_zeros((1, piece.shape[1], h * scale, w * scale))
                weight = piece.new_zeros((1, 1, h * scale, w * scale))
            ramp = _ramp(th, y, h, ys, scale, piece)[:, None] * _ramp(tw, x, w, xs, scale, piece)[None, :]
            rows, cols = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            out[:, :, rows, cols] += piece * ramp
            weight[:, :, rows, cols] += ramp
    return (out / weight).to(piece.dtype)


def _ramp(length: int, start: int, size: int, starts: list[int], scale: int, like: Tensor) -> Tensor:
    """The blending weight of one tile along one axis, in pixels: rising linearly from the start of its overlap with
    the previous tile and falling over its overlap with the next one; 1 where no other tile covers it."""
    n = length * scale
    ramp = torch.ones(n, dtype=torch.float32, device=like.device)
    i = starts.index(start)
    positions = torch.arange(n, dtype=torch.float32, device=like.device) + 0.5
    if i > 0:  # the previous tile ends inside this one
        shared = (starts[i - 1] + length - start) * scale
        ramp = torch.minimum(ramp, positions / shared)
    if i + 1 < len(starts):  # the next tile starts inside this one
        shared = (start + length - starts[i + 1]) * scale
        ramp = torch.minimum(ramp, (n - positions) / shared)
    return ramp.clamp_min(1e-3)
