"""prepare at the real geometry (224 px, patch 16): a 14 x 14 code grid, and codes checked by an oracle.

The oracle (``codebook_oracle``) recomputes the dVAE codes from the stored image bytes without any of
``pipeline/shards/codebook.py``, with the random-init codebook rebuilt from what the manifest records.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from codebook_oracle import check_rows, oracle_codes, random_init_codebook, stored_rgb
from PIL import Image
from raw_fixtures import image_bytes, small_prep

from pipeline.config import StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.prepare import prepare

LOCAL = StorageConfig()
IMAGE_SIZE, PATCH, SEED, HIDDEN = 224, 16, 3, 16
# non-square, all larger than 224 on both sides, one JPEG (decoded at reduced scale by draft())
INPUTS = {"wide.png": (353, 241), "tall.png": (260, 417), "photo.jpg": (640, 480)}


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


def test_codes_match_an_independent_oracle(geometry):
    manifest, rows = geometry["manifest"], geometry["rows"]
    identity, grid = manifest.codebook, manifest.code_grid
    assert re.fullmatch(rf"random-init\({SEED}\)", identity.identity)
    assert identity.name == f"flava-image-codebook(hidden_size={HIDDEN})"
    codebook = random_init_codebook(identity)
    rgb, _ = stored_rgb(rows[0]["image"])
    assert oracle_codes(codebook, rgb, identity.input_size).shape == (grid, grid)
    check_rows(codebook, rows, identity.input_size)
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
    other = random_init_codebook(identity, seed=SEED + 1)
    row = geometry["rows"][0]
    rgb, _ = stored_rgb(row["image"])
    codes = oracle_codes(other, rgb, identity.input_size).reshape(-1)
    assert np.mean(codes == np.asarray(row["dvae_codes"])) < 0.5
