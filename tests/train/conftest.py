"""Demo shards for the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_root(make_demo_shards) -> Path:
    """24 rows per kind, a quarter held out: 18 train rows = one batch of 8 per rank and epoch."""
    return make_demo_shards(24, 24, 24)
