"""The canonical image and the codebook input, as pure functions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from raw_fixtures import image_bytes, small_prep

from pipeline.shards.codebook import LOGIT_LAPLACE_EPS, codebook_pixels, decode_image
from pipeline.shards.prepare import canonical_image


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_shorter_side_is_resized_and_the_centre_kept():
    pixels = np.zeros((40, 120, 3), dtype=np.uint8)
    pixels[:, 40:80] = 255  # a white middle third between black sides
    data, reason = canonical_image(_encode(Image.fromarray(pixels)), small_prep(image_size=32))
    assert reason == ""
    out = decode_image(data)
    assert out.shape == (32, 32, 3) and out.min() > 200  # only the middle survives the centre crop


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    out = decode_image(canonical_image(_encode(rgba), small_prep(image_size=32))[0])
    assert (out == 255).all()


def test_exif_orientation_is_applied():
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(canonical_image(data, small_prep(image_size=32, min_image_size=16))[0])
    assert out[:8].mean() > 200 and out[-8:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8")])
def test_stored_format(fmt, magic):
    data, _ = canonical_image(image_bytes(3), small_prep(image_format=fmt))
    assert data.startswith(magic)


def test_codebook_input_range_is_flava_map_pixels():
    black_white = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    black_white[1] = 255
    pixels = codebook_pixels(black_white, 16)
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0], LOGIT_LAPLACE_EPS)
    np.testing.assert_allclose(pixels[1], 1 - LOGIT_LAPLACE_EPS)
