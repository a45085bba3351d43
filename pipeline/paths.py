"""Where the local paths of a config point, and the one place they are made absolute.

A relative local path resolves against ``storage.base_dir`` when that is set, else against the working
directory. Under ``ray job submit`` the working directory is Ray's temporary copy of the uploaded package
(``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``): data is not uploaded there
(``.rayignore``), and whatever a run writes there (checkpoints, an MLflow sqlite file, the exported
model) is deleted with it and is never found again by a resubmission, which gets a new package. So there
a relative path without an absolute ``storage.base_dir`` is a config error naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipeline.config import Config, ConfigError

# the keys each job reads or writes local paths under (dotted; dict and list values: every item)
TRAINING = (
    "data.sources",
    "data.train",
    "data.val",
    "data.tokenizer",
    "data.mixing_reference",
    "model.init_checkpoint",
    "model.init_encoders",
    "train.storage_path",
    "mlflow.tracking_uri",
)
SWEEP = (*TRAINING, "tune.storage_path")
PREPARE = ("prepare.inputs", "prepare.captions", "prepare.output", "prepare.codebook")
DEMO = ("demo.root", "prepare.codebook")

_SQLITE = "sqlite:///"
RUN_PREFIX = "run:"  # model.init_encoders: a run by name under train.storage_path, not a path


def ray_package_dir(cwd: Path | None = None) -> Path | None:
    """The Ray runtime-env package that ``cwd`` (default: the working directory) lies in, else None."""
    cwd = Path.cwd() if cwd is None else cwd
    for path in (cwd, *cwd.parents):
        if path.name.startswith("_ray_pkg_") and "runtime_resources" in path.parts:
            return path
    return None


def is_local(uri: str) -> bool:
    """A local filesystem path (not s3://, not a server URI)."""
    return bool(uri) and "://" not in uri and not uri.startswith(RUN_PREFIX)


def default_tracking_uri(base: Path) -> str:
    return f"{_SQLITE}{base / 'mlflow.db'}"


def _get(config: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def _set(config: Config, dotted: str, value) -> Config:
    section, name = dotted.split(".")
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **{name: value})}
    )


def _source_paths(sources: dict) -> dict[tuple[str, str], str]:
    """(source name, split) -> local path of the datasets of ``data.sources``."""
    return {
        (name, split): getattr(source, split)
        for name, source in sources.items()
        for split in ("train", "val")
        if is_local(getattr(source, split))
    }


def local_paths(config: Config, keys: tuple[str, ...] = TRAINING) -> dict[str, str]:
    """Dotted key (``[i]`` / ``.name`` for items) -> value of every local path under ``keys``, the MLflow
    store included when it is a local file (sqlite) or directory."""
    found = {}
    for key in keys:
        value = _get(config, key)
        if key == "mlflow.tracking_uri":
            value = value.removeprefix(_SQLITE)
        if key == "data.sources":
            value = {f"{name}.{split}": path for (name, split), path in _source_paths(value).items()}
        items = (
            value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        )
        for name, item in items:
            if is_local(item):
                found[f"{key}.{name}" if isinstance(value, dict) else f"{key}[{name}]"] = item
        if isinstance(value, str) and is_local(value):
            found[key] = value
    return found


def absolute_paths(config: Config, keys: tuple[str, ...] = TRAINING) -> Config:
    """The config with every local path under ``keys`` absolute (and the MLflow tracking URI resolved:
    config, else ``MLFLOW_TRACKING_URI``, else ``<base>/mlflow.db``). Paths already absolute, ``s3://``
    URIs and server URIs stay as they are. Raises ``ConfigError`` for relative paths where they would
    land in a Ray job's temporary package directory."""
    package = ray_package_dir()
    given = config.storage.base_dir
    if given and not Path(given).expanduser().is_absolute() and package is not None:
        raise ConfigError(
            f"storage.base_dir={given} is relative, and this job runs in Ray's temporary package "
            f"directory {package}: give an absolute path (e.g. storage.base_dir=$PWD on the command line)"
        )
    base = Path(given).expanduser().resolve() if given else Path.cwd().resolve()
    relative: list[str] = []  # "key=value -> where it resolves"

    def fix(key: str, path: str) -> str:
        expanded = Path(path).expanduser()
        if expanded.is_absolute():
            return str(expanded)
        resolved = str((base / expanded).resolve())
        relative.append(f"{key}={path} -> {resolved}")
        return resolved

    for key in keys:
        value = _get(config, key)
        if key == "mlflow.tracking_uri":
            uri = value or os.environ.get("MLFLOW_TRACKING_URI", "")
            if not uri:
                value = default_tracking_uri(base)
                relative.append(f"{key} empty -> {value}")
            elif uri.startswith(_SQLITE):
                value = _SQLITE + fix(key, uri[len(_SQLITE) :])
            else:  # a server URI, or a local file-store directory
                value = fix(key, uri) if is_local(uri) else uri
        elif key == "data.sources":
            fixed = {
                where: fix(f"{key}.{where[0]}.{where[1]}", p) for where, p in _source_paths(value).items()
            }
            value = {
                name: dataclasses.replace(
                    source,
                    **{split: fixed.get((name, split), getattr(source, split)) for split in ("train", "val")},
                )
                for name, source in value.items()
            }
        elif isinstance(value, dict):
            value = {k: fix(f"{key}.{k}", v) if is_local(v) else v for k, v in value.items()}
        elif isinstance(value, list):
            value = [fix(f"{key}[{i}]", v) if is_local(v) else v for i, v in enumerate(value)]
        elif is_local(value):
            value = fix(key, value)
        config = _set(config, key, value)

    if relative and package is not None and not given:
        listed = "; ".join(relative)
        raise ConfigError(
            f"relative paths in a job running in Ray's temporary package directory {package} "
            f"({listed}): Ray deletes that directory, data is not uploaded into it (.rayignore), and "
            "a resubmission gets a new one, so checkpoints and MLflow runs written there are lost. "
            "Use absolute paths or s3:// (every node must reach them), or storage.base_dir=$PWD on "
            "the submitting command line to resolve relative paths against the submitting checkout "
            "(a cluster on this machine or a shared filesystem)"
        )
    return config


def inside_package_hint(path: str) -> str:
    """A sentence for a not-found error on a path inside the job's package directory, else ''."""
    package = ray_package_dir()
    if package is None or not Path(path).is_relative_to(package):
        return ""
    return (
        f" ({path} lies in Ray's temporary package directory of this job: data is not uploaded with "
        "--working-dir (.rayignore); give an absolute path or s3:// URI, or storage.base_dir=$PWD)"
    )
