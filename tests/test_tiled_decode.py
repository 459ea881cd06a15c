"""Decoding in parts (diffrt.tiled_decode): tile placement, exactness where the decoder is local or per image, the
error of tiles against a whole decode on the embedded model's trained VAE, and the memory check choosing a tile
instead of refusing a request whose UNet fits but whose decode does not."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrt import memory
from diffrt.cli_generate import DEFAULT_MODEL
from diffrt.pipeline import Pipeline
from diffrt.request import GenerationRequest
from diffrt.tiled_decode import decode_in_parts, tile_starts
from diffrt.train import shapes


@pytest.mark.parametrize("size", [1, 7, 32, 33, 63, 64, 100, 257])
@pytest.mark.parametrize("tile,overlap", [(32, 8), (16, 4), (64, 16)])
def test_tiles_cover_every_pixel_with_one_size_and_their_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    length = min(tile, size)
    assert starts[0] == 0 and starts[-1] + length == size
    covered = np.zeros(size, bool)
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + length - b >= overlap  # consecutive tiles share at least the overlap
    for s in starts:
        covered[s : s + length] = True
    assert covered.all()


def _local_decoder(z: torch.Tensor) -> torch.Tensor:
    """A decoder that sees only each latent pixel (x8 nearest upsampling of a fixed channel mix): tiles must equal
    the whole decode exactly, whatever the blending weights."""
    mix = torch.linspace(-1, 1, 3 * z.shape[1]).reshape(3, z.shape[1], 1, 1)
    return F.interpolate(F.conv2d(z, mix), scale_factor=8, mode="nearest")


@pytest.mark.parametrize("shape,tile", [((2, 4, 40, 72), 256), ((1, 4, 33, 47), 256), ((3, 4, 16, 16), 512)])
def test_tiles_of_a_local_decoder_equal_the_whole_decode(shape, tile):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    whole = _local_decoder(z)
    parts = decode_in_parts(_local_decoder, z, tile, scale=8)
    assert parts.shape == whole.shape
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def embedded():
    return Pipeline.from_pretrained(DEFAULT_MODEL, backend="torch")


def _picture(seed: int, size: int = 256) -> torch.Tensor:
    """A fresh shapes picture: [1, 3, size, size] in [0, 1]."""
    image = shapes.sample(10_000 + seed, size, split="all").image
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def test_image_by_image_equals_the_whole_decode():
    codec = Pipeline.from_pretrained("tiny-sd15", backend="torch").roles.codec
    latents = torch.randn((3, 4, 24, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole, per_image = codec.decode(latents), decode_in_parts(codec.decode, latents, 320, scale=8)
    torch.testing.assert_close(per_image, whole, atol=1e-5, rtol=0)  # the decoder treats images independently


def test_tiles_stay_close_to_the_whole_decode_on_a_trained_vae(embedded):
    """The embedded model's VAE (trained at 64²) reconstructs a 256² picture at about 37 dB; 128-px tiles of it
    stay within 35 dB of the whole decode (41 dB seen), so the seams cost less than the VAE itself."""
    codec = embedded.roles.codec
    with torch.inference_mode():
        latents = codec.encode(_picture(0), None)
        whole, tiled = codec.decode(latents), decode_in_parts(codec.decode, latents, 128, scale=8)
    error = (tiled - whole).abs()
    psnr = 10 * torch.log10(1 / error.pow(2).mean()).item()
    print(f"128-px tiles against the whole 256² decode: max abs {error.max():.4f}, PSNR {psnr:.1f} dB")
    assert psnr > 35  # GroupNorm statistics and attention per tile shift tones slightly; the ramps hide the seams


def _pretend_free(monkeypatch, free_bytes: int) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: free_bytes)
    import diffrt.request

    monkeypatch.setattr(diffrt.request, "available_bytes", lambda device: free_bytes)


def test_a_decode_too_large_for_memory_is_tiled_not_refused(embedded, monkeypatch):
    m = embedded.spec.memory
    request = GenerationRequest("a red circle", height=1024, width=1024, steps=1, batch=2, output_type="pt")
    unet = m.unet_bytes(2, 1024, 1024, 8, torch.float32, cfg=False)
    one_image = m.decoder_bytes(1, 1024, 1024, 8, torch.float32)
    assert m.decoder_bytes(2, 1024, 1024, 8, torch.float32) > max(unet, one_image)
    _pretend_free(monkeypatch, max(unet, one_image))  # room for one image's decode, not two
    assert embedded.resolve(request).vae_tile == 1024  # image by image
    _pretend_free(monkeypatch, max(unet, m.decoder_bytes(1, 512, 512, 8, torch.float32)))
    assert embedded.resolve(request).vae_tile == 512  # tiles of 512
    with pytest.raises(ValueError, match="needs about .* the largest 1:1 size that fits is"):
        embedded.resolve(GenerationRequest("a red circle", height=1024, width=1024, vae_tile=0))
    _pretend_free(monkeypatch, unet // 2)  # not even the UNet fits
    with pytest.raises(ValueError, match="the largest 1:1 size that fits is"):
        embedded.resolve(request)


@pytest.mark.parametrize("tile,message", [(100, "multiple of 8 pixels >= 256"), (-8, "must be 0"), (True, "must")])
def test_a_bad_vae_tile_is_named(embedded, tile, message):
    with pytest.raises(ValueError, match=message):
        embedded.resolve(GenerationRequest("a red circle", vae_tile=tile))


def test_a_tiled_generation_matches_the_whole_one(embedded):
    kw = {"height": 320, "width": 320, "steps": 1, "seed": 5, "output_type": "pt"}
    whole = embedded("a large red circle on the left, blue background", **kw)
    tiled = embedded.generate(GenerationRequest("a large red circle on the left, blue background", vae_tile=256, **kw))
    error = (tiled.images - whole).abs()
    assert tiled.images.shape == whole.shape and torch.isfinite(tiled.images).all()
    assert 0 < error.max() and 10 * torch.log10(1 / error.pow(2).mean()) > 30
