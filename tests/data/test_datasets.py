"""Driver-side reading: shard verification policies, bad-row counting through Ray, S3, epoch file order."""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import StorageConfig, load_config
from pipeline.data.datasets import build_train_data, check_shards
from pipeline.data.stream import MixedStream
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.data.transforms import BATCH_KEYS
from pipeline.shards.format import ShardIntegrityError, read_manifest


@pytest.fixture
def damaged(tmp_path):
    """A dataset of 4 shards: shard 1 truncated, shard 2 altered in place (same size)."""
    uri = str(tmp_path / "image")
    write_synthetic_dataset(uri, "image", 40, 4, 64, StorageConfig())
    names = [e.file for e in read_manifest(uri, StorageConfig()).shards]
    truncated = tmp_path / "image" / names[1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    altered = tmp_path / "image" / names[2]
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    return uri, names


def test_check_shards_error_policy_names_the_files(damaged):
    uri, names = damaged
    with pytest.raises(ShardIntegrityError, match=f"2 of 4 shard.*{names[1]}.*truncated.*{names[2]}.*sha256"):
        check_shards(uri, StorageConfig(), checksums=True, on_corrupt="error")


def test_check_shards_skip_policy_and_size_only(damaged):
    uri, names = damaged
    _, good, bad = check_shards(uri, StorageConfig(), checksums=True, on_corrupt="skip")
    assert [e.file for e in good] == [names[0], names[3]] and len(bad) == 2
    _, good, bad = check_shards(uri, StorageConfig(), checksums=False, on_corrupt="skip")
    assert [e.file for e in good] == [names[0], names[2], names[3]]  # same size: only a checksum sees it
    assert "truncated" in bad[0]


def test_missing_shard_and_empty_dataset(damaged, tmp_path):
    uri, names = damaged
    (tmp_path / "image" / names[0]).unlink()
    with pytest.raises(ShardIntegrityError, match=f"{names[0]}: listed in the manifest but missing"):
        check_shards(uri, StorageConfig(), checksums=False, on_corrupt="error")
    for name in names[1:]:
        (tmp_path / "image" / name).unlink()
    with pytest.raises(ShardIntegrityError, match="no usable shard left"):
        check_shards(uri, StorageConfig(), checksums=False, on_corrupt="skip")


def test_unusable_rows_and_skipped_shards_reach_the_stream_counters(
    ray_cluster, data_config, tokenizer, tmp_path, synthetic_root
):
    image = tmp_path / "image"
    shutil.copytree(synthetic_root / "image", image)
    victim = sorted(image.glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    # no read-ahead: a reader thread would already be preparing (and counting) the next epoch's rows
    config = data_config(f"data.train.image={image}", "data.on_corrupt_shard=skip", "data.read_ahead=0")
    data = build_train_data(config, tokenizer)
    assert set(data.spec.layout.sources) == {"image_text", "image", "text"}
    assert len(data.skipped_shards["image"]) == 1
    stream = MixedStream(data.spec, rank=0, world=1)  # one rank reads every partition: whole epochs
    # an epoch is rows // (8 x 2 workers) global batches: 3 of image (48 usable rows), 6, 4
    for kind, batches in (("image", 3), ("image_text", 6), ("text", 4)):
        for _ in range(batches):
            batch = stream.next_of(kind)
            assert set(batch) == {"kind", *BATCH_KEYS[kind]}
            assert len(batch["attention_mask" if kind == "text" else "pixel_values"]) == 16
    counters = stream.counters()
    assert counters["skipped_shards/image"] == 1
    # rows 9, 19, ..., 59 of the 64 image rows are bad; row 9 was in the skipped shard (rows 0-15)
    assert counters["skipped_rows/image/undecodable_image"] == 5
    assert counters["skipped_rows/image_text/undecodable_image"] == 9  # 96 rows
    assert counters["skipped_rows/text/empty_text"] == 6
    assert counters["samples/image"] == 48 and counters["epoch/image"] == 0
    stream.close()


def test_read_through_s3_endpoint(ray_cluster, moto_s3, tokenizer):
    cfg = StorageConfig(s3_endpoint_url=moto_s3)
    uri = "s3://test-bucket/data-tests/image_text"
    write_synthetic_dataset(uri, "image_text", 48, 3, 64, cfg)
    config = load_config(
        None,
        [
            f"storage.s3_endpoint_url={moto_s3}",
            f"data.train.image_text={uri}",
            "data.ratios={image_text: 1}",
            "data.batch_size=8",
            "data.verify_checksums=true",
        ],
    )
    data = build_train_data(config, tokenizer)
    stream = MixedStream(data.spec, rank=0, world=2)
    batches = [next(stream) for _ in range(8)]  # 3 global batches of 16 an epoch: the third epoch begins
    assert all(b["kind"] == "image_text" and b["pixel_values"].shape == (8, 3, 64, 64) for b in batches)
    assert stream.counters()["epoch/image_text"] == 2
    stream.close()
