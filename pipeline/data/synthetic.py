"""Small synthetic datasets in the real shard format, for tests and the data benchmark.

Images are coloured rectangles on gradients with a caption that describes them; codes are random but
``dvae_codes_flipped`` is the mirrored grid of ``dvae_codes``, as a real codebook gives for a symmetric
object, so flip/code consistency is checkable. ``bad_every`` plants undecodable images and empty
captions inside otherwise valid shards.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import KINDS, StorageConfig
from pipeline.shards import format as shard_format
from pipeline.shards.format import CodebookIdentity, Manifest

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("square", "bar", "stripe", "block")
SIZES = ("small", "large")


def synthetic_row(rng: np.random.Generator, image_size: int) -> tuple[bytes, str]:
    """A PNG-encoded picture and a caption that names what is in it."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape, size = SHAPES[rng.integers(len(SHAPES))], SIZES[rng.integers(len(SIZES))]
    ramp = np.linspace(0.6, 1.0, image_size, dtype=np.float32)[None, :, None]
    img = (np.asarray(COLOURS[names[bg]], dtype=np.float32)[None, None, :] * ramp).repeat(image_size, 0)
    side = image_size // (4 if size == "small" else 2)
    h, w = {
        "square": (side, side),
        "bar": (side, side // 2 or 1),
        "stripe": (side // 3 or 1, image_size),
        "block": (side, int(side * 1.5)),
    }[shape]
    w = min(w, image_size)
    top, left = rng.integers(0, image_size - h + 1), rng.integers(0, image_size - w + 1)
    img[top : top + h, left : left + w] = COLOURS[names[fg]]
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    caption = f"a {size} {names[fg]} {shape} on a {names[bg]} background"
    return buf.getvalue(), caption


def synthetic_table(
    kind: str, rows: int, image_size: int, seed: int, start: int = 0, bad_every: int = 0
) -> pa.Table:
    rng = np.random.default_rng([seed, start, KINDS.index(kind)])
    grid = image_size // 16
    columns: dict[str, list] = {"key": [f"{kind}-{start + i:08d}" for i in range(rows)]}
    images, texts = [], []
    for i in range(rows):
        image, text = synthetic_row(rng, image_size)
        bad = bad_every and (start + i) % bad_every == bad_every - 1
        images.append(image[: len(image) // 3] if bad else image)  # truncated PNG: will not decode
        texts.append("   " if bad else text)
    if kind in ("image_text", "image"):
        codes = rng.integers(0, 8192, size=(rows, grid, grid), dtype=np.int16)
        columns["image"] = images
        columns["dvae_codes"] = list(codes.reshape(rows, -1))
        columns["dvae_codes_flipped"] = list(codes[:, :, ::-1].reshape(rows, -1))
    if kind in ("image_text", "text"):
        columns["text"] = texts
    return pa.Table.from_pydict(columns, schema=shard_format.schema_for(kind, grid))


def write_synthetic_dataset(
    uri: str,
    kind: str,
    rows: int,
    shards: int,
    image_size: int,
    storage_cfg: StorageConfig,
    seed: int = 0,
    bad_every: int = 0,
) -> Manifest:
    """Writes ``shards`` shards of about rows/shards rows each, then the manifest."""
    manifest = Manifest(
        kind=kind, image_size=image_size if kind != "text" else 0, patch_size=16, source="synthetic"
    )
    if kind != "text":
        manifest.codebook = CodebookIdentity(
            name="synthetic",
            identity="random-codes",
            image_size=image_size,
            input_size=image_size // 2,
            code_grid=image_size // 16,
            vocab_size=8192,
        )
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        table = synthetic_table(kind, int(hi - lo), image_size, seed, start=int(lo), bad_every=bad_every)
        manifest.shards.append(
            shard_format.write_shard(uri, shard_format.shard_name("shard", i), table, 64, storage_cfg)
        )
    shard_format.write_manifest(uri, manifest, storage_cfg)
    return manifest
