"""Raw data, codebook weights and shards all on a real S3-compatible endpoint (moto server over HTTP)."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from codebook_oracle import check_rows, saved_codebook
from raw_fixtures import captioned_folder, small_prep

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.prepare import prepare


def _upload(local_dir, uri, cfg):
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(
            storage.join(uri, path.relative_to(local_dir).as_posix()), path.read_bytes(), cfg
        )


def test_prepare_reads_and_writes_s3(ray_cluster, moto_s3, tmp_path):
    import torch
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    cfg = StorageConfig(s3_endpoint_url=moto_s3)
    root = f"s3://test-bucket/{uuid.uuid4().hex[:8]}"  # fresh prefix: localize_dir caches by URI
    good = captioned_folder(tmp_path / "pairs", 9)
    _upload(tmp_path / "pairs", f"{root}/raw/pairs", cfg)
    torch.manual_seed(1)
    FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=16)).save_pretrained(tmp_path / "codebook")
    _upload(tmp_path / "codebook", f"{root}/codebook", cfg)
    weights = hashlib.sha256((tmp_path / "codebook" / "model.safetensors").read_bytes()).hexdigest()

    prep = small_prep(
        source="captioned_folder",
        inputs=[f"{root}/raw/pairs"],
        output=f"{root}/shards",
        codebook=f"{root}/codebook",
    )
    report = prepare(prep, cfg)
    assert report.rows_computed == 9

    dataset = f"{root}/shards"
    manifest = fmt.verify_dataset(dataset, cfg)
    assert manifest.codebook.identity == weights and manifest.codebook.name == f"{root}/codebook"
    rows = [r for e in manifest.shards for r in fmt.read_shard(dataset, e, cfg).to_pylist()]
    assert {r["key"]: r["text"] for r in rows} == good
    # the codes of the weights read from S3, recomputed by the independent oracle from the local copy
    check_rows(saved_codebook(tmp_path / "codebook"), rows, manifest.codebook.input_size)

    assert prepare(prep, cfg).rows_computed == 0  # a rerun finds every shard complete

    first = storage.join(dataset, manifest.shards[0].file)
    storage.write_bytes_atomic(first, storage.read_bytes(first, cfg)[:-10], cfg)
    with pytest.raises(fmt.ShardIntegrityError, match=f"{manifest.shards[0].file}: .*truncated"):
        fmt.verify_dataset(dataset, cfg)
