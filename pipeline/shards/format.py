"""The shard format: Parquet files of one kind plus a ``_manifest.json`` that vouches for them.

A dataset is a directory (local or s3://) holding ``<prefix>-<index:06d>.parquet`` shards and, written
last, ``_manifest.json``. The manifest lists every shard with its row count, byte size and sha256, so
a reader can tell a complete dataset from a partial or altered one and name the file at fault.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import KINDS, StorageConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"


class ShardIntegrityError(RuntimeError):
    """A dataset whose files do not match its manifest (missing, truncated or altered shard)."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.parquet"


def schema_for(kind: str, code_grid: int) -> pa.Schema:
    """Columns of a kind. Codes are row-major ``grid x grid`` int16, stored as a fixed-size list."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    fields = [pa.field("key", pa.string(), nullable=False)]
    if kind in ("image_text", "image"):
        codes = pa.list_(pa.int16(), code_grid * code_grid)
        fields += [
            pa.field("image", pa.binary(), nullable=False),
            pa.field("dvae_codes", codes, nullable=False),
            pa.field("dvae_codes_flipped", codes, nullable=False),
        ]
    if kind in ("image_text", "text"):
        fields.append(pa.field("text", pa.string(), nullable=False))
    return pa.schema(fields)


@dataclass
class ShardEntry:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class CodebookIdentity:
    """Which codebook produced the MIM targets; ``random-init(seed)`` when no weights were given."""

    name: str
    identity: str  # sha256 of the weights, or random-init(<seed>)
    image_size: int  # canonical image size the codes belong to
    input_size: int  # pixels the codebook saw (image_size / 2)
    code_grid: int  # codes per side (image_size / patch_size)
    vocab_size: int


@dataclass
class Manifest:
    kind: str
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of inputs skipped
    codebook: CodebookIdentity | None = None  # None for text datasets
    image_size: int = 0
    patch_size: int = 0
    source: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def code_grid(self) -> int:
        return self.codebook.code_grid if self.codebook else 0

    def to_json(self) -> str:
        data = asdict(self)
        data["rows"], data["bytes"] = self.rows, self.bytes
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardIntegrityError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ShardIntegrityError(f"{where}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ShardIntegrityError(
                f"{where}: schema_version {version!r}, this code reads {SCHEMA_VERSION}"
            )
        data.pop("rows", None)
        data.pop("bytes", None)
        try:
            shards = [ShardEntry(**s) for s in data.pop("shards")]
            codebook = data.pop("codebook")
            return cls(shards=shards, codebook=CodebookIdentity(**codebook) if codebook else None, **data)
        except (KeyError, TypeError) as e:
            raise ShardIntegrityError(f"{where}: malformed manifest ({e})") from e

    def identity(self) -> str:
        """A short stable fingerprint of the dataset (logged to MLflow as the data's identity)."""
        return hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()[:16]


def encode_shard(table: pa.Table, row_group_rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows, compression="zstd")
    return buf.getvalue()


def write_shard(
    dataset: str, name: str, table: pa.Table, row_group_rows: int, storage_cfg: StorageConfig
) -> ShardEntry:
    """Writes one shard atomically and returns its manifest entry."""
    data = encode_shard(table, row_group_rows)
    storage.write_bytes_atomic(storage.join(dataset, name), data, storage_cfg)
    return ShardEntry(
        file=name, rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


def write_manifest(dataset: str, manifest: Manifest, storage_cfg: StorageConfig) -> None:
    storage.write_bytes_atomic(storage.join(dataset, MANIFEST_NAME), manifest.to_json().encode(), storage_cfg)


def read_manifest(dataset: str, storage_cfg: StorageConfig) -> Manifest:
    uri = storage.join(dataset, MANIFEST_NAME)
    if not storage.exists(uri, storage_cfg):
        raise ShardIntegrityError(
            f"no {MANIFEST_NAME} in {dataset}: not a prepared dataset, or preparation did not finish "
            "(run jobs/prepare_data.py)"
        )
    manifest = Manifest.from_json(storage.read_bytes(uri, storage_cfg).decode(), where=uri)
    if not manifest.shards:
        raise ShardIntegrityError(f"{uri}: the manifest lists no shards (empty dataset)")
    return manifest


def check_shard_bytes(dataset: str, entry: ShardEntry, data: bytes) -> None:
    """Raises naming the shard when its bytes are not the ones the manifest recorded."""
    where = storage.join(dataset, entry.file)
    if len(data) != entry.bytes:
        raise ShardIntegrityError(
            f"{where}: {len(data)} bytes but the manifest recorded {entry.bytes} (truncated or rewritten)"
        )
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardIntegrityError(f"{where}: sha256 differs from the manifest (altered after it was written)")


def check_shard_size(dataset: str, entry: ShardEntry, storage_cfg: StorageConfig) -> None:
    """Raises naming the shard when it is missing or its size is not the one the manifest recorded (one
    metadata call: the cheap check, made before any shard is read)."""
    uri = storage.join(dataset, entry.file)
    size = storage.file_size(uri, storage_cfg)
    if size is None:
        raise ShardIntegrityError(f"{uri}: listed in the manifest but missing")
    if size != entry.bytes:
        raise ShardIntegrityError(
            f"{uri}: {size} bytes but the manifest recorded {entry.bytes} (truncated or rewritten)"
        )


def verify_dataset(dataset: str, storage_cfg: StorageConfig, checksums: bool = True) -> Manifest:
    """Checks every shard against the manifest: existence and size always, sha256 when ``checksums``."""
    manifest = read_manifest(dataset, storage_cfg)
    for entry in manifest.shards:
        check_shard_size(dataset, entry, storage_cfg)
        if checksums:
            data = storage.read_bytes(storage.join(dataset, entry.file), storage_cfg)
            check_shard_bytes(dataset, entry, data)
    return manifest


def read_shard(dataset: str, entry: ShardEntry, storage_cfg: StorageConfig) -> pa.Table:
    """Reads one shard, verified against its manifest entry."""
    data = storage.read_bytes(storage.join(dataset, entry.file), storage_cfg)
    check_shard_bytes(dataset, entry, data)
    return pq.read_table(io.BytesIO(data))
