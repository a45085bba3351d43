"""The driver side of a pretraining job: pre-flight checks, the MLflow run, the ``TorchTrainer``.

Everything that can be wrong with the inputs is found here, before a worker starts, and reported as an
``InputError`` naming the input; workers then only see data that passed these checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from model import build_flava
from model.checkpoint import spec_from_hf_config
from pipeline import paths, storage
from pipeline.config import ENCODER_PARTS, Config, to_dict
from pipeline.data.datasets import TrainData, check_shards, multi_crop_of, reference_losses
from pipeline.data.mixing import mixture
from pipeline.data.order import partitions_for
from pipeline.data.tokenizer import has_text_train_data, load_tokenizer
from pipeline.shards.format import Manifest, ShardIntegrityError, verify_dataset
from pipeline.train import checkpoint as ckpt
from pipeline.train import events, tracking
from pipeline.train.data_setup import build_train_datasets, fix_tokenizer
from pipeline.train.init_encoders import encoder_shapes, read_encoder, resolve_source
from pipeline.train.loop import model_kwargs, train_loop_per_worker

ROOT = Path(__file__).resolve().parents[2]


class InputError(ValueError):
    """A bad input found before training starts (the message names it)."""


def _model_geometry(config: Config, text_vocab_size: int):
    """The spec of the model the workers will build (init checkpoint, else preset), without weights."""
    if config.model.init_checkpoint:
        try:
            local = Path(storage.localize_dir(config.model.init_checkpoint, config.storage))
            return spec_from_hf_config(json.loads((local / "config.json").read_text()))
        except (FileNotFoundError, OSError, ValueError) as e:
            raise InputError(f"model.init_checkpoint ({config.model.init_checkpoint}): {e}") from e
    with torch.device("meta"):
        return build_flava(config.model.preset, **model_kwargs(config, text_vocab_size)).spec


def _check_dataset(split: str, name: str, config: Config, spec) -> Manifest:
    source = config.data.named_sources()[name]
    kind, uri = source.kind, getattr(source, split)
    where = f"{config.data.key_of(name, split)} ({uri})"
    try:
        if split == "train":  # sizes here; checksums when the datasets are built (build_train_data)
            manifest, _, _ = check_shards(uri, config.storage, False, config.data.on_corrupt_shard)
        else:  # held-out sets are small and read whole: no skipping there
            manifest = verify_dataset(uri, config.storage, checksums=False)
    except (ShardIntegrityError, ValueError, OSError, pa.ArrowException) as e:
        raise InputError(f"{where}: {e}{paths.inside_package_hint(uri)}") from e
    if manifest.kind != kind:
        raise InputError(f"{where}: the manifest says kind {manifest.kind!r}, expected {kind!r}")
    if kind != "text":
        if manifest.image_size != spec.image_size:
            raise InputError(
                f"{where}: shards hold {manifest.image_size}px images but model preset "
                f"{config.model.preset!r} expects {spec.image_size}px (prepare again, or set "
                "model.overrides.image_size)"
            )
        if manifest.codebook and manifest.codebook.vocab_size != spec.mim_vocab_size:
            raise InputError(
                f"{where}: MIM codes from a {manifest.codebook.vocab_size}-code codebook, the model "
                f"predicts {spec.mim_vocab_size}"
            )
    return manifest


def validate_inputs(config: Config) -> dict[str, Manifest]:
    """Pre-flight on the driver: ratios, every needed manifest (present, non-empty, consistent with the
    model), the tokenizer, the MLflow server's answer to the job's credentials. Returns the manifests by
    ``<split>/<source>``; raises ``InputError``."""
    try:
        active = mixture(config.data)
        reference_losses(config)
    except ValueError as e:
        raise InputError(str(e)) from e
    check_world_sizes(config)
    text_vocab_size = config.data.vocab_size  # until one is trained; only image geometry is compared
    if config.data.tokenizer:
        try:
            tokenizer = load_tokenizer(config.data.tokenizer, config.data.max_text_length, config.storage)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise InputError(f"data.tokenizer ({config.data.tokenizer}): {e}") from e
        text_vocab_size = tokenizer.vocab_size
    elif not has_text_train_data(config):
        raise InputError("data.tokenizer is empty and no text or image_text train dataset can train one")
    spec = _model_geometry(config, text_vocab_size)
    if config.model.init_checkpoint and not config.data.tokenizer:
        raise InputError("model.init_checkpoint needs data.tokenizer: the vocabulary it was trained with")
    if config.model.init_checkpoint and spec.text_vocab_size != text_vocab_size:
        raise InputError(
            f"model.init_checkpoint has a {spec.text_vocab_size}-token text vocabulary, data.tokenizer "
            f"{text_vocab_size} (use the checkpoint's tokenizer)"
        )
    check_init_encoders(config, text_vocab_size)
    check_multi_crop(config, spec)
    try:
        tracking.check_access(config.mlflow.tracking_uri, config.mlflow.experiment)
    except (PermissionError, ConnectionError) as e:
        raise InputError(f"mlflow.tracking_uri: {e}") from None
    manifests = {}
    for name in active:
        manifests[f"train/{name}"] = _check_dataset("train", name, config, spec)
    for name, source in config.data.named_sources().items():
        if source.val:
            manifests[f"val/{name}"] = _check_dataset("val", name, config, spec)
    return manifests


def resolve_init_encoders(config: Config) -> Config:
    """``model.init_encoders`` with every ``run:NAME`` fixed to that run's latest checkpoint directory, so
    that all workers (and their restarts) load the same weights."""
    try:
        resolved = {part: resolve_source(src, config) for part, src in config.model.init_encoders.items()}
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"model.init_encoders: {e}") from e
    return dataclasses.replace(config, model=dataclasses.replace(config.model, init_encoders=resolved))


def check_init_encoders(config: Config, text_vocab_size: int) -> None:
    """Each ``model.init_encoders`` source exists and holds exactly the encoder this model has, of its
    shapes (read here once, on the driver)."""
    if not config.model.init_encoders:
        return
    with torch.device("meta"):
        model = build_flava(config.model.preset, **model_kwargs(config, text_vocab_size))
    for part, source in resolve_init_encoders(config).model.init_encoders.items():
        where = f"model.init_encoders.{part} ({config.model.init_encoders[part]})"
        try:
            read_encoder(source, encoder_shapes(model, part), config)
        except (FileNotFoundError, OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{where}: {e}{paths.inside_package_hint(source)}") from e


def check_multi_crop(config: Config, spec) -> None:
    """DINO's local crops must be whole patches (the encoder runs on any grid of them)."""
    if config.model.image_objective != "dino":
        return
    local = multi_crop_of(config, spec.image_size).local_size
    if local % spec.patch_size or local > spec.image_size:
        raise InputError(
            f"model.dino.local_crop_size: local crops of {local}px must be a multiple of the patch size "
            f"{spec.patch_size} and at most the image size {spec.image_size}"
        )


def check_world_sizes(config: Config) -> None:
    """Every world size the run may train with must split the global batch evenly, and so must the data
    partitions the row order needs for that range (``pipeline.data.order``): the optimizer sees the same
    global batch (``data.batch_size`` x ``train.num_workers`` rows a micro-step), of the same rows, at any
    size."""
    fewest, most = config.train.worker_range
    rows = config.data.batch_size * most
    partitions = partitions_for(fewest, most)
    if rows % partitions:
        step = partitions // math.gcd(partitions, most)
        below = config.data.batch_size - config.data.batch_size % step
        fits = ", ".join(str(b) for b in (below, below + step) if b > 0)
        raise InputError(
            f"a global batch of {rows} rows (data.batch_size={config.data.batch_size} x train.num_workers="
            f"{most}) cannot be split evenly at every world size of train.min_workers={fewest}.."
            f"train.num_workers={most} ({partitions} data partitions, their least common multiple): "
            f"choose a data.batch_size that is a multiple of {step} ({fits}), or a narrower range"
        )


def check_cluster_cpus(config: Config) -> None:
    """Train workers that take every CPU leave Ray Data no CPU to read with: that is a silent hang, so
    it is an error here (needs ``ray.init`` done). An elastic run needs room for its fewest workers."""
    train = config.train
    fewest = train.worker_range[0]
    needed = fewest * train.cpus_per_worker + 1
    have = ray.cluster_resources().get("CPU", 0)
    if have < needed:
        raise InputError(
            f"the Ray cluster has {have:g} CPUs; {fewest} worker(s) x train.cpus_per_worker="
            f"{train.cpus_per_worker} plus 1 for Ray Data needs {needed}"
        )


def check_storage_reachable(config: Config, node_hosts: set[str]) -> None:
    """On nodes of several hosts, a local path is on one host's disk only: checkpoints written there are
    missing on the others, and data there cannot be read elsewhere. Refused unless the config declares a
    filesystem every node mounts (``storage.shared_filesystem``). ``node_hosts``: the alive nodes' IPs."""
    if len(node_hosts) < 2 or config.storage.shared_filesystem:
        return
    local = paths.local_paths(config, paths.TRAINING)
    if local:
        listed = "; ".join(f"{key}={value}" for key, value in local.items())
        raise InputError(
            f"the Ray cluster's nodes are on {len(node_hosts)} hosts, but these paths are local to one of "
            f"them: {listed}. Use s3:// (and an MLflow server for mlflow.tracking_uri), or mount a shared "
            "filesystem at the same path on every node and set storage.shared_filesystem=true"
        )


def cluster_hosts() -> set[str]:
    return {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def resolve_paths(config: Config) -> Config:
    """Absolute local paths and the tracking URI, fixed on the driver: workers run in other directories.
    Raises ``ConfigError`` for a relative path inside a Ray job's temporary package dir."""
    return paths.absolute_paths(config, paths.TRAINING)


def run_dir(config: Config) -> str:
    return storage.join(config.train.storage_path, config.train.run_name)


def check_data_unchanged(config: Config, data: TrainData, found: ckpt.Found | None) -> None:
    """A resume must read on in the data it was reading: a source whose shards changed since the checkpoint
    is an error naming it (before any worker starts), unless ``data.on_changed_data=restart_epoch``."""
    saved = (found.extra.get("stream", {}).get("identity", {}) if found else {}) or {}
    changed = [
        k
        for k, source in data.spec.layout.sources.items()
        if saved.get(k, source.identity) != source.identity
    ]
    if changed and config.data.on_changed_data == "error":
        names = ", ".join(f"{k} ({data.spec.layout.sources[k].uri})" for k in changed)
        raise InputError(
            f"the train data of {names} changed since the checkpoint at step {found.step} (other shards or "
            "checksums): resuming would not continue the same row order. Restore the data, or set "
            "data.on_changed_data=restart_epoch to start that source's epoch afresh over the new data"
        )


def latest_checkpoint(config: Config) -> ckpt.Found | None:
    return ckpt.find_latest(*storage.resolve(run_dir(config), config.storage))


def start_tracking(config: Config, manifests: dict[str, Manifest], found: ckpt.Found | None) -> str:
    """Finds or creates the MLflow run (continuing the latest checkpoint's) and logs what the driver knows."""
    params = tracking.environment_params(ROOT)
    params.update({f"data.identity.{name}": m.identity() for name, m in manifests.items()})
    params.update({f"data.rows.{name}": str(m.rows) for name, m in manifests.items()})
    # where each encoder came from (the resolved checkpoint of a run:NAME): random when not listed
    params.update(
        {f"init/{part}_encoder": config.model.init_encoders.get(part, "random") for part in ENCODER_PARTS}
    )
    prior = found.extra.get("mlflow_run_id", "") if found else ""
    return tracking.start_run(config, run_dir(config), prior, params)


def open_train_data(config: Config) -> tuple[Config, TrainData]:
    """The run's tokenizer (``fix_tokenizer``) and verified Ray datasets; a shard whose bytes differ from
    its manifest is an ``InputError`` naming it (under ``data.on_corrupt_shard=error``)."""
    try:
        config, tokenizer = fix_tokenizer(config)
        return config, build_train_datasets(config, tokenizer)
    except ShardIntegrityError as e:
        raise InputError(str(e)) from e


def build_trainer(
    config: Config, mlflow_run_id: str, callbacks: list | None = None, data: TrainData | None = None
) -> TorchTrainer:
    """The ``TorchTrainer`` of one run, for a config that went through ``resolve_paths`` and
    ``fix_tokenizer`` (a Tune trial passes its ``TuneReportCallback`` in ``callbacks``)."""
    train = config.train
    fewest, most = train.worker_range
    data = data or open_train_data(config)[1]
    on_s3 = storage.is_s3(train.storage_path)
    storage_filesystem = storage.portable_s3_filesystem(config.storage) if on_s3 else None
    storage_path = train.storage_path[len("s3://") :] if storage_filesystem else train.storage_path
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(config),
            "stream_spec": data.spec,
            "mlflow_run_id": mlflow_run_id,
        },
        torch_config=TorchConfig(
            backend="nccl" if train.use_gpu else "gloo", timeout_s=train.collective_timeout_s
        ),
        scaling_config=ray.train.ScalingConfig(
            # a (fewest, most) range is Ray Train's elastic mode: it starts with what fits and resizes
            # (restarting the group from the latest checkpoint) as nodes come and go
            num_workers=train.num_workers if fewest == most else (fewest, most),
            elastic_resize_monitor_interval_s=train.elastic_resize_monitor_interval_s,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **train.worker_resources},
        ),
        run_config=ray.train.RunConfig(
            name=train.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ckpt.retention(train),
            callbacks=callbacks or [],
        ),
    )


class StorageFailure(RuntimeError):
    """An S3 call failed after its retries. Its message is the failing call's (the key, the bucket) plus
    what the call itself leaves out: the endpoint it could not reach and the run's storage."""


S3_FAILURE = re.compile(r"AWS Error|curlCode|\bS3\b|s3://|NoSuchBucket|EndpointConnectionError")


def failure_summary(error: BaseException) -> str:
    """One readable line: the innermost cause's last message line (Ray wraps a worker's error in layers,
    each repeating the traceback); a ``StorageFailure`` is already that line."""
    while error.__cause__ is not None and not isinstance(error, StorageFailure):
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def name_the_storage(error: BaseException, config: Config) -> BaseException:
    """A failure of an S3 call, wherever it was raised (Ray Train's controller writing its own state says only
    bucket and key), as a ``StorageFailure`` naming the endpoint; any other error as it is."""
    summary = failure_summary(error)
    if not S3_FAILURE.search(summary):
        return error
    endpoint = config.storage.s3_endpoint_url or f"AWS S3 ({config.storage.s3_region})"
    where = run_dir(config)
    on_s3 = f"; run storage {where}" if where.startswith("s3://") else ""
    return StorageFailure(f"{summary} [S3 endpoint {endpoint}{on_s3}]")


@dataclass
class PretrainResult:
    tracking_uri: str
    mlflow_run_id: str
    run_dir: str
    exported_model: str
    metrics: dict


def run_pretraining(config: Config, callbacks: list | None = None) -> PretrainResult:
    """Validates, opens the MLflow run, trains to ``train.steps`` (resuming the run name's latest complete
    checkpoint), exports the model; the MLflow run ends FINISHED or FAILED with the job, and so does the
    run's event log (``pipeline.train.events``)."""
    config = resolve_paths(config)
    manifests = validate_inputs(config)
    config = resolve_init_encoders(config)
    check_cluster_cpus(config)
    check_storage_reachable(config, cluster_hosts())
    config, data = open_train_data(config)  # every train shard checked (checksums) before the run opens
    found = latest_checkpoint(config)
    check_data_unchanged(config, data, found)
    run_id = start_tracking(config, manifests, found)
    tracker = tracking.Tracker(config.mlflow.tracking_uri, run_id)
    fs, path = storage.resolve(run_dir(config), config.storage)
    events.record(
        fs,
        path,
        "job_start",
        run_name=config.train.run_name,
        num_workers=config.train.num_workers,
        mlflow_run_id=run_id,
    )

    def end(status: str, cause: str = "") -> None:
        tracker.finish(status)
        events.record(fs, path, "job_end", status=status, cause=cause)

    try:
        result = build_trainer(config, run_id, callbacks, data).fit()
    except (KeyboardInterrupt, SystemExit):  # Ctrl+C, or SIGTERM from ``ray job stop`` (jobs/pretrain.py)
        end("KILLED")
        raise
    except Exception as e:
        failure = name_the_storage(e, config)
        end("FAILED", failure_summary(failure))
        if failure is e:
            raise
        raise failure from e
    except BaseException as e:
        end("FAILED", failure_summary(e))
        raise
    end("FINISHED")
    metrics = dict(result.metrics or {})
    return PretrainResult(
        tracking_uri=config.mlflow.tracking_uri,
        mlflow_run_id=run_id,
        run_dir=run_dir(config),
        exported_model=metrics.get("export_uri", ""),
        metrics=metrics,
    )
