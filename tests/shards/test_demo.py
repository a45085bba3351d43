"""The demo corpus: deterministic, captions true to the pictures, prepared through the real path."""

from __future__ import annotations

import re

import numpy as np
from raw_fixtures import small_prep

from pipeline.config import Config, DemoConfig, StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.demo import COLOURS, REGIONS, prepare_demo, scene, write_raw

PHRASE = re.compile(
    r"(an?|one|two|three) (\w+) (circle|square|triangle)s? (?:on|at) the (left|right|top|bottom)"
)


def _mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.abs(pixels.astype(int) - COLOURS[colour]).sum(-1) < 40


def test_captions_describe_the_pictures():
    rng = np.random.default_rng(0)
    for _ in range(200):
        image, caption = scene(rng)
        pixels = np.asarray(image)
        phrases = PHRASE.findall(caption)
        assert phrases, caption
        for _, colour, _, region in phrases:
            x0, y0, x1, y1 = (round(v * pixels.shape[0]) for v in REGIONS[region])
            inside = _mask(pixels[y0:y1, x0:x1], colour).sum()
            assert inside > 20, f"{caption!r}: no {colour} on the {region}"
            assert _mask(pixels, colour).sum() == inside, f"{caption!r}: {colour} outside the {region}"


def test_raw_corpus_is_deterministic(tmp_path):
    a = write_raw(tmp_path / "a", pairs=6, images=3, texts=10, seed=7)
    b = write_raw(tmp_path / "b", pairs=6, images=3, texts=10, seed=7)
    for kind in a:
        files_a = sorted(p for p in a[kind].rglob("*") if p.is_file()) if a[kind].is_dir() else [a[kind]]
        files_b = sorted(p for p in b[kind].rglob("*") if p.is_file()) if b[kind].is_dir() else [b[kind]]
        assert [p.read_bytes() for p in files_a] == [p.read_bytes() for p in files_b]


def test_prepare_demo_writes_train_and_val_of_every_kind(ray_cluster, tmp_path):
    config = Config(
        prepare=small_prep(), demo=DemoConfig(root=str(tmp_path / "demo"), pairs=40, images=20, texts=60)
    )
    report = prepare_demo(config)
    assert sum(d.rows for d in report.datasets) == 120 and not any(d.skipped for d in report.datasets)
    for kind in ("image_text", "image", "text"):
        train = fmt.verify_dataset(str(tmp_path / "demo" / kind / "train"), StorageConfig())
        val = fmt.verify_dataset(str(tmp_path / "demo" / kind / "val"), StorageConfig())
        assert train.kind == val.kind == kind and train.rows > val.rows > 0
