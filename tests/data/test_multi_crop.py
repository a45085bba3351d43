"""DINO's multi-crop views (pure numpy): shapes, value ranges, crop areas and the resize itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.transforms import (
    MultiCrop,
    TransformParams,
    augment_batch,
    batch_rng,
    crop_box,
    multi_crop,
    resize_crop,
)

SPEC = MultiCrop(
    global_crops=2,
    local_crops=3,
    global_size=64,
    local_size=32,
    global_scale=(0.4, 1.0),
    local_scale=(0.05, 0.4),
)


def images(n: int = 4, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def test_shapes_dtypes_and_ranges():
    pixels = images()
    global_crops, local_crops = multi_crop(pixels, SPEC, 0.5, batch_rng(0, 1))
    assert global_crops.shape == (2, 4, 3, 64, 64) and local_crops.shape == (3, 4, 3, 32, 32)
    assert global_crops.dtype == local_crops.dtype == np.float32
    for views in (global_crops, local_crops):
        for i in range(4):  # every value is a convex mix of its own image's values, channel by channel
            lo = pixels[i].min(axis=(1, 2))[None, :, None, None]
            hi = pixels[i].max(axis=(1, 2))[None, :, None, None]
            assert (views[:, i] >= lo - 1e-5).all() and (views[:, i] <= hi + 1e-5).all()
    assert not np.allclose(global_crops[0], global_crops[1])  # two different views


def test_crop_boxes_cover_their_scale_of_the_area():
    rng = np.random.default_rng(0)
    for scale in ((0.4, 1.0), (0.05, 0.4)):
        for _ in range(200):
            top, left, h, w = crop_box(64, scale, rng)
            assert top >= 0 and top + h <= 64 and left >= 0 and left + w <= 64
            area = h * w / 64**2
            assert scale[0] * 0.85 <= area <= scale[1] * 1.15 or (h, w) == (64, 64)


def test_resize_matches_torch_bilinear_and_is_the_identity_at_full_size():
    image = images(1, 16)[0]
    np.testing.assert_array_equal(resize_crop(image, (0, 0, 16, 16), 16), image)
    box = (2, 3, 10, 12)
    crop = torch.from_numpy(image[:, 2:12, 3:15].copy())[None]
    expected = F.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(resize_crop(image, box, 8), expected, atol=1e-5)


def test_flips_mirror_the_crop():
    pixels = images(1, 64)
    spec = MultiCrop(1, 0, 64, 32, (1.0, 1.0), (0.1, 0.1))  # the whole image: only the flip is random
    flipped, _ = multi_crop(pixels, spec, 1.0, batch_rng(0))
    kept, _ = multi_crop(pixels, spec, 0.0, batch_rng(0))
    np.testing.assert_allclose(kept[0, 0], pixels[0], atol=1e-6)
    np.testing.assert_allclose(flipped[0, 0], pixels[0][..., ::-1], atol=1e-6)


@pytest.mark.parametrize("dino", [True, False])
def test_a_dino_image_batch_carries_views_instead_of_mim_targets(dino):
    params = TransformParams(
        64, 8, 0.15, 0.4, 0.25, 0.5, 4, (0, 1, 2, 3, 4), 64, multi_crop=SPEC if dino else None
    )
    rows = {
        "pixels": np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8),
        "dvae_codes": np.zeros((2, 16), np.int16),
        "dvae_codes_flipped": np.zeros((2, 16), np.int16),
    }
    batch = augment_batch("image", rows, params, batch_rng(0))
    keys = {"global_crops", "local_crops"} if dino else {"pixel_values", "bool_masked_pos", "mim_labels"}
    assert set(batch) == {"kind", *keys}
