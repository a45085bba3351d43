"""Local paths and s3:// URIs behind one small interface (pyarrow filesystems).

Credentials are never part of the config: pyarrow and boto3 read the standard AWS_* environment
variables. Only the endpoint (for S3-compatible stores such as MinIO or moto) and region are configured.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.config import StorageConfig


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": storage.s3_region,
        # transient outages (a restarted endpoint, throttling) are retried with exponential backoff by the
        # SDK; an endpoint that stays away fails each call after about as long as s3_max_attempts allows
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.s3_max_attempts),
        "connect_timeout": 5,
        "request_timeout": storage.s3_request_timeout_s,
    }
    if storage.s3_endpoint_url:
        parsed = urlparse(storage.s3_endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


class _RebuiltS3(pafs.FileSystemHandler):
    """An S3 filesystem that travels as its config and is rebuilt in each process that unpickles it.

    pyarrow pickles an ``S3FileSystem`` without its retry strategy, so one handed to Ray (Train's storage
    filesystem runs in the controller and the workers) would retry 3 times, about 2 s of an outage,
    instead of ``s3_max_attempts``. This handler pickles the ``StorageConfig`` and delegates every call.
    """

    def __init__(self, storage: StorageConfig):
        self.storage = storage
        self._fs: pafs.S3FileSystem | None = None

    def __getstate__(self) -> dict:
        return {"storage": self.storage}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["storage"])

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            self._fs = s3_filesystem(self.storage)
        return self._fs

    def equals(self, other) -> bool:
        return isinstance(other, _RebuiltS3) and other.storage == self.storage

    def get_type_name(self) -> str:
        return "s3+rebuilt"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def portable_s3_filesystem(storage: StorageConfig) -> pafs.FileSystem:
    """The S3 filesystem to hand to Ray (Train's and Tune's ``storage_filesystem``): retries as configured
    in whichever process uses it."""
    return pafs.PyFileSystem(_RebuiltS3(storage))


def fs_path(uri: str) -> str:
    """The path of ``uri`` inside its filesystem (bucket/key for S3, absolute path locally)."""
    if is_s3(uri):
        return uri[len("s3://") :].rstrip("/")
    return str(Path(uri).expanduser().resolve())


def resolve(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Returns the filesystem and the path inside it (bucket/key for S3, absolute path locally)."""
    if is_s3(uri):
        return s3_filesystem(storage), fs_path(uri)
    return pafs.LocalFileSystem(), fs_path(uri)


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    fs, path = resolve(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Readers see either the old object or the whole new one, never a partial write.

    Locally: write a temporary sibling, fsync, rename. On S3 a single PUT is already atomic.
    """
    fs, path = resolve(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def file_size(uri: str, storage: StorageConfig) -> int | None:
    """Size in bytes, or None where the file does not exist."""
    fs, path = resolve(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    return info.size


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str, storage: StorageConfig) -> None:
    fs, path = resolve(uri, storage)
    fs.create_dir(path, recursive=True)


def delete_file(uri: str, storage: StorageConfig) -> None:
    fs, path = resolve(uri, storage)
    fs.delete_file(path)


def localize_dir(uri: str, storage: StorageConfig, cache_root: str | None = None) -> str:
    """A local directory with the contents of ``uri`` (downloaded once for s3://, as is otherwise).

    Used for artefacts that libraries only read from disk: tokenizers, codebook and model weights.
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"directory not found: {uri}")
        return str(path)
    fs, root = resolve(uri, storage)
    cache = Path(cache_root or tempfile.gettempdir()) / "flava-ray-cache" / root.replace("/", "__")
    done = cache / ".complete"
    if done.exists():
        return str(cache)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"nothing stored under {uri}")
    for info in files:
        target = cache / os.path.relpath(info.path, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src:
            target.write_bytes(src.read())
    done.touch()
    return str(cache)
