"""Small synthetic datasets in the real shard format (64 px, 4x4 code grid), a tokenizer trained on them."""

from __future__ import annotations

import pytest

from pipeline.config import StorageConfig, load_config
from pipeline.data.synthetic import write_synthetic_dataset

ROWS = {"image_text": 96, "image": 64, "text": 64}
BAD_EVERY = 10  # every 10th row: truncated image bytes and a whitespace-only caption


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    for kind, rows in ROWS.items():
        write_synthetic_dataset(str(root / kind), kind, rows, 4, 64, StorageConfig(), bad_every=BAD_EVERY)
        write_synthetic_dataset(str(root / f"val_{kind}"), kind, 40, 2, 64, StorageConfig(), seed=1)
    return root


@pytest.fixture(scope="session")
def data_config(synthetic_root):
    def make(*overrides: str):
        paths = [f"data.train.{k}={synthetic_root / k}" for k in ROWS]
        paths += [f"data.val.{k}={synthetic_root / ('val_' + k)}" for k in ROWS]
        return load_config(None, [*paths, "data.vocab_size=300", "data.batch_size=8", *overrides])

    return make


@pytest.fixture(scope="session")
def tokenizer(data_config, tmp_path_factory):
    from pipeline.data.tokenizer import load_or_train_tokenizer

    return load_or_train_tokenizer(data_config(), str(tmp_path_factory.mktemp("tokenizer")))
