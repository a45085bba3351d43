"""An S3 endpoint that can go away: a moto server behind a TCP link that the drills cut."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.config import Config, StorageConfig, load_config
from pipeline.drills.harness import TINY_CONFIG, Workspace
from pipeline.shards import format as shard_format


class FlakyS3:
    """A moto S3 server behind a link that can be cut (``stop``) and restored (``start``): clients see
    their open connections reset and new ones refused, and afterwards the same objects (the server
    itself never stops: its handler threads would go on serving the connections the AWS SDK pools)."""

    BUCKET = "drills"

    def __init__(self):
        from moto.server import ThreadedMotoServer

        from pipeline.drills.head import free_ports
        from pipeline.drills.netcut import CuttableLink, port_outside_ephemeral_range

        self.port, server_port = port_outside_ephemeral_range(), free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=server_port, verbose=False)
        self._server.start()
        self._link = CuttableLink(self.port, server_port)
        self.start()
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")
        if self.BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=self.BUCKET)

    @property
    def storage(self) -> StorageConfig:
        return StorageConfig(s3_endpoint_url=self.url)

    def start(self) -> None:
        self._link.restore()

    def stop(self) -> None:
        self._link.cut()

    @property
    def rejected(self) -> int:
        """S3 connections made while stopped, so far (each failed at once: the client saw the outage)."""
        return self._link.rejected

    def upload(self, local: Path, key: str) -> str:
        fs = storage.s3_filesystem(self.storage)
        pafs.copy_files(str(local), f"{self.BUCKET}/{key}", destination_filesystem=fs)
        return f"s3://{self.BUCKET}/{key}"


def s3_overrides(ws: Workspace, s3: FlakyS3, name: str) -> list[str]:
    """A drill run whose data and checkpoints live on the flaky S3 (the demo shards uploaded once)."""
    data = f"s3://{FlakyS3.BUCKET}/demo"
    if not storage.exists(storage.join(data, "text", "train", shard_format.MANIFEST_NAME), s3.storage):
        s3.upload(ws.demo, "demo")
    return [
        *ws.overrides(name, data),
        f"storage.s3_endpoint_url={s3.url}",
        f"train.storage_path=s3://{FlakyS3.BUCKET}/runs",
    ]


def s3_config(ws: Workspace, s3: FlakyS3, name: str, *extra: str) -> Config:
    return load_config(TINY_CONFIG, [*s3_overrides(ws, s3, name), *extra])
