"""Held-out batches (fixed, identical at every call) and the contact sheet drawn from them and from Ray."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data.datasets import transform_params
from pipeline.data.transforms import BATCH_KEYS, normalize
from pipeline.data.validation import held_out_batches, held_out_rows, retrieval_pairs


def test_held_out_batches_are_fixed_and_unflipped(data_config, tokenizer):
    config = data_config()
    params = transform_params(config, tokenizer, 64)
    first = held_out_batches(config, params, tokenizer, max_batches=3)
    again = held_out_batches(config, params, tokenizer, max_batches=3)
    assert list(first) == ["image_text", "image", "text"]
    for kind, batches in first.items():
        assert len(batches) == 3
        for a, b in zip(batches, again[kind], strict=True):
            assert a["kind"] == kind and set(a) == {"kind", *BATCH_KEYS[kind]}
            for key in BATCH_KEYS[kind]:
                np.testing.assert_array_equal(a[key], b[key])
    rows, _ = held_out_rows(config, "image", params, tokenizer, 8, config.data.val["image"])
    np.testing.assert_array_equal(first["image"][0]["pixel_values"], normalize(rows["pixels"]))  # no flip
    np.testing.assert_array_equal(first["image"][0]["mim_labels"], rows["dvae_codes"])
    assert (first["image_text"][0]["itm_labels"] == 0).sum() == 2  # 25% of 8: ITM val loss has negatives


def test_retrieval_pairs_have_no_negatives(data_config, tokenizer):
    config = data_config()
    params = transform_params(config, tokenizer, 64)
    pairs = retrieval_pairs(config, params, tokenizer, max_pairs=20)
    rows, _ = held_out_rows(config, "image_text", params, tokenizer, 20, config.data.val["image_text"])
    assert pairs["pixel_values"].shape == (20, 3, 64, 64) and pairs["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(pairs["input_ids"], rows["input_ids"])  # caption i belongs to image i


def test_contact_sheet_from_the_ray_pipeline(ray_cluster, data_config, tokenizer, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
    import inspect_data

    out = tmp_path / "sheet.png"
    overrides = [
        f"data.{split}.{k}={v}"
        for split in ("train", "val")
        for k, v in getattr(data_config().data, split).items()
    ]
    assert (
        inspect_data.main(
            [*overrides, "data.vocab_size=300", "data.batch_size=8", "--out", str(out), "--batches", "1"]
        )
        == 0
    )
    sheet = Image.open(out)
    assert sheet.width >= 6 * 160 and sheet.height > 3 * 160  # three kinds, six samples each
