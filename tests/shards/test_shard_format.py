"""The shard format and the manifest's guarantees, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from raw_fixtures import image_bytes

from pipeline.config import KINDS, StorageConfig
from pipeline.shards import format as fmt

LOCAL = StorageConfig()
GRID = 2


def _table(kind: str, n: int, start: int = 0) -> pa.Table:
    schema = fmt.schema_for(kind, GRID)
    columns = {"key": [f"k{i}" for i in range(start, start + n)]}
    if kind != "text":
        codes = np.arange(n * GRID * GRID, dtype=np.int16)
        columns["image"] = [image_bytes(i) for i in range(n)]
        columns["dvae_codes"] = pa.FixedSizeListArray.from_arrays(pa.array(codes), GRID * GRID)
        columns["dvae_codes_flipped"] = pa.FixedSizeListArray.from_arrays(pa.array(codes[::-1]), GRID * GRID)
    if kind != "image":
        columns["text"] = [f"text {i}" for i in range(start, start + n)]
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema)


def _dataset(tmp_path, kind="image_text", shards=2):
    entries = [
        fmt.write_shard(str(tmp_path), fmt.shard_name("part", i), _table(kind, 5, 5 * i), 2, LOCAL)
        for i in range(shards)
    ]
    manifest = fmt.Manifest(
        kind=kind, shards=entries, skipped={"corrupt_image": 1}, image_size=32, patch_size=16
    )
    fmt.write_manifest(str(tmp_path), manifest, LOCAL)
    return manifest


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_each_kind(tmp_path, kind):
    written = _dataset(tmp_path, kind)
    manifest = fmt.verify_dataset(str(tmp_path), LOCAL)
    assert manifest == written and manifest.rows == 10 and manifest.skipped == {"corrupt_image": 1}
    assert [s.file for s in manifest.shards] == ["part-000000.parquet", "part-000001.parquet"]
    table = fmt.read_shard(str(tmp_path), manifest.shards[1], LOCAL)
    assert table.equals(_table(kind, 5, 5))
    assert table.schema.equals(fmt.schema_for(kind, GRID))


def test_rows_are_in_streaming_sized_row_groups(tmp_path):
    import pyarrow.parquet as pq

    _dataset(tmp_path)
    assert pq.ParquetFile(tmp_path / "part-000000.parquet").metadata.num_row_groups == 3  # 5 rows by 2


def _break(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-100])
    elif how == "modified":  # same size, one byte changed: only the checksum can tell
        path.write_bytes(data[:50] + bytes([data[50] ^ 0xFF]) + data[51:])
    else:
        path.unlink()


@pytest.mark.parametrize(
    "how,message",
    [
        ("truncated", "bytes but the manifest recorded"),
        ("modified", "sha256 differs from the manifest"),
        ("missing", "listed in the manifest but missing"),
    ],
)
def test_verification_names_the_broken_shard(tmp_path, how, message):
    manifest = _dataset(tmp_path)
    _break(tmp_path / "part-000001.parquet", how)
    with pytest.raises(fmt.ShardIntegrityError, match=f"part-000001.parquet: .*{message}"):
        fmt.verify_dataset(str(tmp_path), LOCAL)
    if how != "missing":
        with pytest.raises(fmt.ShardIntegrityError, match="part-000001.parquet"):
            fmt.read_shard(str(tmp_path), manifest.shards[1], LOCAL)
    fmt.read_shard(str(tmp_path), manifest.shards[0], LOCAL)  # the intact shard still reads


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no _manifest.json in"),
        (b"", "not valid JSON"),
        (b'{"kind": "image", "shards": [', "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"schema_version": 99, "kind": "image", "shards": []}', "schema_version 99"),
        (b'{"schema_version": 1, "kind": "image"}', "malformed manifest"),
        (b'{"schema_version": 1, "kind": "image", "shards": [], "codebook": null}', "lists no shards"),
    ],
)
def test_unusable_manifest_is_a_clear_error(tmp_path, content, message):
    _dataset(tmp_path)
    path = tmp_path / fmt.MANIFEST_NAME
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    with pytest.raises(fmt.ShardIntegrityError, match=message):
        fmt.verify_dataset(str(tmp_path), LOCAL)
