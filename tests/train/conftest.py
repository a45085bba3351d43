"""Demo shards for the training tests: made once per session by the shards teammate's generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory, ray_cluster) -> Path:
    """24 rows per kind, a quarter held out: 18 train rows = one batch of 8 per rank and epoch."""
    from pipeline.shards.demo import prepare_demo

    root = tmp_path_factory.mktemp("train-demo")
    config = load_config(
        ROOT / "jobs/configs/demo.yaml",
        [f"demo.root={root}", "demo.pairs=24", "demo.images=24", "demo.texts=24", "demo.val_fraction=0.25"],
    )
    prepare_demo(config)
    return root
