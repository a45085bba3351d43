"""Driver-side reading: shard verification policies, bad-row counting through Ray, S3, epoch file order."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.config import StorageConfig, load_config
from pipeline.data.datasets import build_train_data, check_shards, read_kind
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


def test_bad_rows_and_skipped_shards_reach_the_stream_counters(
    ray_cluster, data_config, tokenizer, tmp_path, synthetic_root
):
    image = tmp_path / "image"
    shutil.copytree(synthetic_root / "image", image)
    victim = sorted(image.glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    # no read-ahead: a reader thread would already be preparing (and counting) the next epoch's rows
    config = data_config(f"data.train.image={image}", "data.on_corrupt_shard=skip", "data.read_ahead=0")
    data = build_train_data(config, tokenizer)
    assert list(data.datasets) == ["train_image_text", "train_image", "train_text"]
    assert len(data.skipped_shards["image"]) == 1
    stream = MixedStream(
        data.spec, {k: data.datasets[n].iterator() for k, n in data.spec.dataset_names.items()}
    )
    for kind in data.spec.kinds:  # one full epoch of each kind, so that every prepare task has run
        for _ in range(5):
            batch = stream.next_of(kind)
            assert set(batch) == {"kind", *BATCH_KEYS[kind]}
    counters = stream.counters()
    assert counters["skipped_shards/image"] == 1
    # rows 9, 19, ..., 59 of the 64 image rows are bad; row 9 was in the skipped shard (rows 0-15)
    assert counters["skipped_rows/image/undecodable_image"] == 5
    assert counters["skipped_rows/image_text/undecodable_image"] == 9  # 96 rows
    assert counters["skipped_rows/text/empty_text"] == 6
    assert counters["samples/image"] == 40 and counters["data_wait_s"] > 0


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
    stream = MixedStream(data.spec, {"image_text": data.datasets["train_image_text"].iterator()})
    batches = [next(stream) for _ in range(8)]  # 6 per epoch: the stream restarts once
    assert all(b["kind"] == "image_text" and b["pixel_values"].shape == (8, 3, 64, 64) for b in batches)
    assert stream.counters()["epoch/image_text"] == 1


def test_file_order_reshuffles_every_epoch(ray_cluster, synthetic_root):
    """With a seed the shard order changes per execution (= per epoch); without one it is the manifest's."""
    uri = str(synthetic_root / "image_text")
    entries = read_manifest(uri, StorageConfig()).shards

    def shard_orders(seed):
        ds = read_kind("image_text", uri, entries, StorageConfig(), shuffle_seed=seed).select_columns(["key"])
        ds.context.execution_options.preserve_order = True
        split = ds.streaming_split(1, equal=True)[0]
        orders = []
        for _ in range(4):
            keys = np.concatenate([b["key"] for b in split.iter_batches(batch_format="numpy")])
            orders.append(
                tuple(dict.fromkeys(int(k.split("-")[-1]) // 24 for k in keys))
            )  # 24 rows per shard
        return orders

    fixed = shard_orders(None)
    assert set(fixed) == {(0, 1, 2, 3)}
    shuffled = shard_orders(7)
    assert all(sorted(o) == [0, 1, 2, 3] for o in shuffled)
    assert len(set(shuffled)) > 1
