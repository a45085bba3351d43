"""The pure numpy transforms, without Ray: statistics and constraints of every random step."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data import transforms as T
from pipeline.data.synthetic import synthetic_table

SPECIALS = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID = 4


def make_params(**overrides) -> T.TransformParams:
    values = dict(
        image_size=64,
        max_text_length=32,
        mlm_probability=0.15,
        mim_mask_ratio=0.4,
        itm_negative_fraction=0.25,
        flip_probability=0.5,
        mask_token_id=MASK_ID,
        special_token_ids=SPECIALS,
        text_vocab_size=300,
    )
    return T.TransformParams(**{**values, **overrides})


class FakeTokens:
    """A whitespace tokenizer with the WordPiece layout: [CLS] words [SEP] [PAD]..."""

    def encode(self, texts):
        ids = np.zeros((len(texts), 32), dtype=np.int32)
        for i, t in enumerate(texts):
            words = [5 + (hash(w) % 295) for w in t.split()][:30]
            ids[i, : len(words) + 2] = [2, *words, 3]
        return ids, (ids != 0).astype(np.int8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def token_batch(rng, b=512, length=32) -> np.ndarray:
    ids = np.zeros((b, length), dtype=np.int64)
    for i in range(b):
        n = rng.integers(3, length - 2)
        ids[i, : n + 2] = [2, *rng.integers(5, 300, n), 3]
    return ids


# ----------------------------------------------------------------------------------------- images


def test_normalize_uses_clip_mean_std_and_chw():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = T.normalize(pixels)
    expected = ((pixels / 255.0 - T.CLIP_MEAN) / T.CLIP_STD).transpose(0, 3, 1, 2)
    assert out.dtype == np.float32 and out.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_decode_images_reports_bad_rows_instead_of_raising():
    good = np.full((64, 64, 3), 7, dtype=np.uint8)
    data = [png(good), png(good)[:50], png(np.zeros((32, 32, 3), dtype=np.uint8)), b"not an image"]
    pixels, reasons = T.decode_images(data, 64)
    assert reasons == [None, "undecodable_image", "image_size_mismatch", "undecodable_image"]
    assert (pixels[0] == 7).all()


def test_flip_mirrors_pixels_and_switches_to_flipped_codes():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (400, 8, 8, 3), dtype=np.uint8)
    codes = rng.integers(0, 8192, (400, 4), dtype=np.int16)
    codes_flipped = codes[:, ::-1].copy()
    out, labels, flipped = T.flip_images(pixels, codes, codes_flipped, 0.5, rng)
    assert 0.4 < flipped.mean() < 0.6
    normalized = T.normalize(pixels)  # the oracle: normalise, then mirror the width axis
    np.testing.assert_array_equal(out[flipped], normalized[flipped][..., ::-1])
    np.testing.assert_array_equal(out[~flipped], normalized[~flipped])
    np.testing.assert_array_equal(labels[flipped], codes_flipped[flipped])
    np.testing.assert_array_equal(labels[~flipped], codes[~flipped])


def test_flip_probability_zero_keeps_everything():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    codes = np.arange(16, dtype=np.int16).reshape(4, 4)
    out, labels, flipped = T.flip_images(pixels, codes, codes + 1, 0.0, np.random.default_rng(0))
    assert not flipped.any()
    np.testing.assert_array_equal(labels, codes)
    np.testing.assert_array_equal(out, T.normalize(pixels))


@pytest.mark.parametrize("grid,min_block", [(14, 16), (7, 4), (4, 1)])
def test_block_masking_constraints_and_ratio(grid, min_block):
    """~40% masked on average, never above target; each block obeys the size and aspect bounds."""
    rng = np.random.default_rng(grid)
    n = grid * grid
    target = round(0.4 * n)
    assert T.min_block_patches(n) == min_block
    ratios = []
    for _ in range(300):
        mask, blocks = T.sample_blocks(grid, 0.4, rng)
        assert mask.sum() <= target
        ratios.append(mask.mean())
        painted = np.zeros((grid, grid), dtype=bool)
        for top, left, h, w in blocks:
            budget = target - painted.sum()
            assert 0.3 <= h / w <= 1 / 0.3
            assert h * w >= min(min_block, budget)
            assert top + h <= grid and left + w <= grid
            painted[top : top + h, left : left + w] = True
        np.testing.assert_array_equal(painted.reshape(-1), mask)
    assert 0.95 * target / n <= np.mean(ratios) <= target / n + 1e-9  # target = round(0.4 N)
    assert abs(target / n - 0.4) < 0.5 / n + 1e-9


def test_block_masks_are_per_sample():
    masks = T.block_masks(32, 14, 0.4, np.random.default_rng(0))
    assert masks.shape == (32, 196) and masks.dtype == bool
    assert len({m.tobytes() for m in masks}) > 30


# ------------------------------------------------------------------------------------------- text


def test_mlm_never_touches_special_or_pad_and_follows_80_10_10():
    rng = np.random.default_rng(0)
    ids = token_batch(rng, b=2000)
    masked, labels = T.mlm_mask(ids, 0.15, MASK_ID, SPECIALS, 300, rng)
    special = np.isin(ids, SPECIALS)
    selected = labels != T.IGNORE_INDEX
    assert not (selected & special).any()
    np.testing.assert_array_equal(masked[special], ids[special])
    np.testing.assert_array_equal(labels[selected], ids[selected])
    candidates = (~special).sum()
    # binomial: n ~ 30k candidates, sd of the rate ~0.002; 0.01 is 5 sd
    assert abs(selected.sum() / candidates - 0.15) < 0.01
    to_mask = (masked == MASK_ID) & selected
    kept = (masked == ids) & selected
    randomised = selected & ~to_mask & ~kept
    total = selected.sum()  # ~4.5k: sd of a 10% share ~0.0045
    assert abs(to_mask.sum() / total - 0.8) < 0.025
    assert abs(randomised.sum() / total - 0.1) < 0.02
    assert abs(kept.sum() / total - 0.1) < 0.02
    assert not np.isin(masked[randomised], SPECIALS).any()


def test_itm_negatives_fraction_polarity_and_never_own_caption():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = token_batch(rng, b=16)
        sources = T.itm_sources(ids, 0.25, rng)
        negatives = sources != np.arange(16)
        assert negatives.sum() == 4
        assert not (ids[sources][negatives] == ids[negatives]).all(1).any()


def test_itm_identical_captions_stay_positive():
    ids = np.tile(np.array([[2, 10, 11, 3, 0]]), (8, 1))
    np.testing.assert_array_equal(T.itm_sources(ids, 0.5, np.random.default_rng(0)), np.arange(8))


def test_augment_image_text_batch_contract_and_itm_labels():
    params = make_params(image_size=64)
    table = synthetic_table("image_text", 16, 64, seed=0)
    rows, skipped = T.prepare_rows("image_text", columns_of(table), params, FakeTokens())
    assert not skipped
    batch = T.augment_batch("image_text", rows, params, np.random.default_rng(0))
    assert set(batch) == {"kind", *T.BATCH_KEYS["image_text"]}
    assert batch["pixel_values"].shape == (16, 3, 64, 64) and batch["pixel_values"].dtype == np.float32
    assert batch["bool_masked_pos"].shape == (16, 16) and batch["bool_masked_pos"].dtype == bool
    for key in ("mim_labels", "input_ids", "input_ids_masked", "attention_mask", "mlm_labels", "itm_labels"):
        assert batch[key].dtype == np.int64, key
    assert batch["input_ids"].shape == batch["input_ids_masked"].shape == (16, 32)
    positives = batch["itm_labels"] == 1
    assert (~positives).sum() == 4
    np.testing.assert_array_equal(batch["input_ids"][positives], rows["input_ids"][positives])
    assert not (batch["input_ids"][~positives] == rows["input_ids"][~positives]).all(1).any()
    # the one attention_mask fits the (possibly borrowed) caption
    np.testing.assert_array_equal(batch["attention_mask"], (batch["input_ids"] != 0).astype(np.int64))


@pytest.mark.parametrize("kind", ["image", "text", "image_text"])
def test_augment_is_deterministic_by_seed(kind):
    params = make_params()
    rows, _ = T.prepare_rows(kind, columns_of(synthetic_table(kind, 16, 64, seed=0)), params, FakeTokens())
    a = T.augment_batch(kind, rows, params, T.batch_rng(7, 0, 1))
    b = T.augment_batch(kind, rows, params, T.batch_rng(7, 0, 1))
    c = T.augment_batch(kind, rows, params, T.batch_rng(8, 0, 1))
    assert set(a) == {"kind", *T.BATCH_KEYS[kind]}
    for key in T.BATCH_KEYS[kind]:
        np.testing.assert_array_equal(a[key], b[key])
    masked_key = "bool_masked_pos" if kind != "text" else "mlm_labels"
    assert not np.array_equal(a[masked_key], c[masked_key])


def test_prepare_rows_drops_and_counts_bad_rows():
    params = make_params()
    table = synthetic_table("image_text", 30, 64, seed=0, bad_every=10)  # rows 9, 19, 29 are bad
    rows, skipped = T.prepare_rows("image_text", columns_of(table), params, FakeTokens())
    assert skipped == {"undecodable_image": 3}  # an image failure is counted once, not also as empty text
    assert len(rows["pixels"]) == len(rows["input_ids"]) == 27
    text_rows, text_skipped = T.prepare_rows(
        "text", columns_of(synthetic_table("text", 30, 64, 0, bad_every=10)), params, FakeTokens()
    )
    assert text_skipped == {"empty_text": 3} and len(text_rows["input_ids"]) == 27


def test_prepare_rows_flags_codes_out_of_range():
    params = make_params()
    columns = columns_of(synthetic_table("image", 4, 64, seed=0))
    columns["dvae_codes"][1, 0] = 9000
    rows, skipped = T.prepare_rows("image", columns, params, None)
    assert skipped == {"codes_out_of_range": 1} and len(rows["pixels"]) == 3


def columns_of(table) -> dict:
    out = {}
    for name in table.column_names:
        col = table.column(name)
        out[name] = (
            np.stack(col.to_numpy(zero_copy_only=False)) if name.startswith("dvae") else col.to_pylist()
        )
    return out
