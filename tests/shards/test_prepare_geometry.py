"""prepare at the real geometry (224 px, patch 16): a 14 x 14 code grid, and codes checked by an oracle.

The oracle recomputes the dVAE codes from the stored image bytes without any of
``pipeline/shards/codebook.py``: PIL decode, Lanczos downsampling to image_size / 2 and FLAVA's
logit-Laplace pixel mapping written out here, the random-init codebook rebuilt from what the manifest
records, and the flip done with numpy (cross-checked against PIL's own mirror).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from raw_fixtures import image_bytes, small_prep

from pipeline.config import StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.prepare import prepare

LOCAL = StorageConfig()
IMAGE_SIZE, PATCH, SEED, HIDDEN = 224, 16, 3, 16
# non-square, all larger than 224 on both sides, one JPEG (decoded at reduced scale by draft())
INPUTS = {"wide.png": (353, 241), "tall.png": (260, 417), "photo.jpg": (640, 480)}
EPS = 0.1  # FLAVA's logit-Laplace epsilon (transformers: image_processing_flava.LOGIT_LAPLACE_EPS)


@pytest.fixture(scope="module")
def geometry(ray_cluster, tmp_path_factory):
    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("out") / "images"
    for i, (name, size) in enumerate(INPUTS.items()):
        fmt_ = "JPEG" if name.endswith(".jpg") else "PNG"
        (raw / name).write_bytes(image_bytes(40 + i, size=size, fmt=fmt_))
    prep = small_prep(
        source="image_folder",
        inputs=[str(raw)],
        output=str(out),
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        min_image_size=32,
        codebook_seed=SEED,
        codebook_hidden_size=HIDDEN,
    )
    prepare(prep, LOCAL)
    manifest = fmt.verify_dataset(str(out), LOCAL)
    rows = [r for e in manifest.shards for r in fmt.read_shard(str(out), e, LOCAL).to_pylist()]
    return {"out": out, "manifest": manifest, "rows": rows}


def test_grid_is_14_by_14_at_224(geometry):
    manifest, rows = geometry["manifest"], geometry["rows"]
    assert manifest.image_size == IMAGE_SIZE and manifest.patch_size == PATCH
    assert manifest.code_grid == 14
    assert manifest.codebook.input_size == 112 and manifest.codebook.vocab_size == 8192
    assert sorted(r["key"] for r in rows) == sorted(n.rsplit(".", 1)[0] for n in INPUTS)
    schema = pq.read_schema(geometry["out"] / manifest.shards[0].file)
    for column in ("dvae_codes", "dvae_codes_flipped"):
        assert schema.field(column).type.list_size == 196
    for row in rows:
        with Image.open(io.BytesIO(row["image"])) as im:
            assert im.format == "PNG" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert len(row["dvae_codes"]) == len(row["dvae_codes_flipped"]) == 196
        assert all(0 <= c < 8192 for c in row["dvae_codes"] + row["dvae_codes_flipped"])


def _oracle_codebook(identity: fmt.CodebookIdentity, seed: int | None = None):
    """The random-init FlavaImageCodebook the manifest describes (or one of another seed)."""
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    recorded_seed = int(re.fullmatch(r"random-init\((\d+)\)", identity.identity).group(1))
    hidden = int(re.fullmatch(r"flava-image-codebook\(hidden_size=(\d+)\)", identity.name).group(1))
    assert (recorded_seed, hidden) == (SEED, HIDDEN)
    torch.manual_seed(recorded_seed if seed is None else seed)
    return FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=hidden)).eval()


def _oracle_pixels(rgb: np.ndarray, input_size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, s, s) as FlavaImageProcessor prepares codebook pixels: Lanczos resize,
    rescale to [0, 1], map x -> (1 - 2 eps) x + eps. float32 throughout, in that order."""
    small = Image.fromarray(rgb).resize((input_size, input_size), resample=Image.Resampling.LANCZOS)
    x = np.asarray(small, dtype=np.float32) / np.float32(255)
    x = np.float32(1 - 2 * EPS) * x + np.float32(EPS)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _oracle_codes(codebook, rgb: np.ndarray, input_size: int) -> np.ndarray:
    with torch.inference_mode():
        return codebook.get_codebook_indices(_oracle_pixels(rgb, input_size))[0].numpy()


def test_codes_match_an_independent_oracle(geometry):
    manifest, rows = geometry["manifest"], geometry["rows"]
    identity, grid = manifest.codebook, manifest.code_grid
    codebook = _oracle_codebook(identity)
    for row in rows:
        with Image.open(io.BytesIO(row["image"])) as im:
            rgb = np.asarray(im.convert("RGB"))
            mirrored = np.asarray(im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        flipped = np.fliplr(rgb)
        np.testing.assert_array_equal(flipped, mirrored)  # numpy's flip is PIL's horizontal mirror
        codes = _oracle_codes(codebook, rgb, identity.input_size)
        codes_flipped = _oracle_codes(codebook, flipped, identity.input_size)
        assert codes.shape == codes_flipped.shape == (grid, grid)
        np.testing.assert_array_equal(codes.reshape(-1), row["dvae_codes"], err_msg=row["key"])
        np.testing.assert_array_equal(
            codes_flipped.reshape(-1), row["dvae_codes_flipped"], err_msg=row["key"]
        )
    # the second column is not redundant: the codes of the mirrored image are not the mirrored grid
    assert any(
        not np.array_equal(
            np.fliplr(np.reshape(r["dvae_codes"], (grid, grid))).ravel(), r["dvae_codes_flipped"]
        )
        for r in rows
    )


def test_oracle_is_sensitive_to_the_seed(geometry):
    """A codebook of another seed disagrees: matching codes above are evidence, not a coincidence."""
    identity = geometry["manifest"].codebook
    other = _oracle_codebook(identity, seed=SEED + 1)
    row = geometry["rows"][0]
    with Image.open(io.BytesIO(row["image"])) as im:
        rgb = np.asarray(im.convert("RGB"))
    codes = _oracle_codes(other, rgb, identity.input_size).reshape(-1)
    assert np.mean(codes == np.asarray(row["dvae_codes"])) < 0.5
