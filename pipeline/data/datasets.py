"""Driver side: verified shards -> one Ray Data dataset per kind, ready for ``TorchTrainer(datasets=...)``.

Per kind: the manifest's shards are checked (sizes always, sha256 when ``data.verify_checksums``; a bad
shard is an error or, with ``data.on_corrupt_shard=skip``, a logged and counted skip), read with
``read_parquet`` in a file order reshuffled every epoch (``FileShuffleConfig`` reseeds per execution,
and ``streaming_split`` executes the dataset once per epoch), and prepared by ``map_batches``
(decode, normalise, tokenise; bad rows dropped and counted). The random per-batch augmentation happens
in the Train worker (``pipeline.data.stream``), so that it is reproducible and checkpointable.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import ray.train
from ray.data import FileShuffleConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import storage
from pipeline.config import Config, StorageConfig
from pipeline.data.mixing import validate_ratios
from pipeline.data.tokenizer import WordPieceTokenizer
from pipeline.data.transforms import TransformParams, prepare_rows
from pipeline.shards import format as shard_format
from pipeline.shards.format import Manifest, ShardEntry, ShardIntegrityError

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class SkipCounter:
    """Rows dropped by the prepare tasks, by kind and reason (tasks are many, short-lived processes)."""

    def __init__(self):
        self._counts: Counter = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self._counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self._counts)


@dataclass
class StreamSpec:
    """What a Train worker needs to build its ``MixedStream`` (pass it in ``train_loop_config``)."""

    ratios: dict[str, float]  # normalised, kinds with ratio > 0 in KINDS order = the fetch order
    dataset_names: dict[str, str]  # kind -> name in TorchTrainer(datasets=...)
    batch_size: int  # rows per rank at the full world size (data.batch_size)
    shuffle_buffer: int
    seed: int
    params: TransformParams
    tokenizer: WordPieceTokenizer  # for validation and the preview (decoding tokens)
    skip_counter: ray.actor.ActorHandle | None = None
    corrupt_shards: dict[str, int] = field(default_factory=dict)  # kind -> shards skipped before reading
    prefetch_batches: int = 2
    read_ahead: int = 4  # batches per kind queued by the worker's reader thread (data.read_ahead)
    stall_timeout_s: float = 600  # data.stall_timeout_s
    sources: dict[str, str] = field(default_factory=dict)  # kind -> dataset URI, for error messages
    full_world: int = 1  # train.num_workers: the global batch is batch_size x full_world rows

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.ratios)

    def rows_per_rank(self, world_size: int) -> int:
        """A rank's share of the global batch when ``world_size`` ranks train (an elastic run's world size
        divides it: ``pipeline.train.launch.check_world_sizes``)."""
        rows, rest = divmod(self.batch_size * self.full_world, world_size)
        if rest:
            raise ValueError(
                f"{world_size} ranks cannot split a global batch of {self.batch_size * self.full_world}"
            )
        return rows


@dataclass
class TrainData:
    datasets: dict[str, ray.data.Dataset]  # -> TorchTrainer(datasets=...)
    data_config: ray.train.DataConfig  # -> TorchTrainer(dataset_config=...)
    spec: StreamSpec  # -> train_loop_config, then MixedStream(spec) in the worker
    manifests: dict[str, Manifest]
    skipped_shards: dict[str, list[str]] = field(default_factory=dict)  # kind -> "file: reason"

    def identities(self) -> dict[str, str]:
        """Dataset fingerprints per kind (for MLflow params)."""
        return {kind: m.identity() for kind, m in self.manifests.items()}


def check_shards(
    dataset: str, storage_cfg: StorageConfig, checksums: bool, on_corrupt: str
) -> tuple[Manifest, list[ShardEntry], list[str]]:
    """(manifest, shards fit to read, "file: reason" of the others) under ``skip``; raises under ``error``."""
    manifest = shard_format.read_manifest(dataset, storage_cfg)

    def problem(entry: ShardEntry) -> str | None:
        try:
            shard_format.check_shard_size(dataset, entry, storage_cfg)
            if checksums:
                data = storage.read_bytes(storage.join(dataset, entry.file), storage_cfg)
                shard_format.check_shard_bytes(dataset, entry, data)
        except ShardIntegrityError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = list(pool.map(problem, manifest.shards))
    bad = [p for p in problems if p]
    if bad and on_corrupt == "error":
        raise ShardIntegrityError(
            f"{dataset}: {len(bad)} of {len(manifest.shards)} shard(s) do not match the manifest "
            f"(set data.on_corrupt_shard=skip to train without them): " + "; ".join(bad)
        )
    for p in bad:
        log.warning("skipping corrupt shard: %s", p)
    good = [e for e, p in zip(manifest.shards, problems, strict=True) if not p]
    if not good:
        raise ShardIntegrityError(f"{dataset}: no usable shard left after skipping {len(bad)} corrupt one(s)")
    return manifest, good, bad


def transform_params(config: Config, tokenizer: WordPieceTokenizer, image_size: int) -> TransformParams:
    data = config.data
    return TransformParams(
        image_size=image_size,
        max_text_length=data.max_text_length,
        mlm_probability=data.mlm_probability,
        mim_mask_ratio=data.mim_mask_ratio,
        itm_negative_fraction=data.itm_negative_fraction,
        flip_probability=data.flip_probability,
        mask_token_id=tokenizer.mask_id,
        special_token_ids=tokenizer.special_ids,
        text_vocab_size=tokenizer.vocab_size,
    )


def image_size_of(manifests: dict[str, Manifest]) -> int:
    """The one canonical image size of the image datasets (their codes are only valid at that size)."""
    sizes = {kind: m.image_size for kind, m in manifests.items() if m.kind != "text"}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"image datasets disagree on image_size: {sizes}; prepare them at one size")
    for kind, m in manifests.items():
        if m.kind != "text" and (m.codebook is None or m.codebook.code_grid * 16 != m.image_size):
            raise ValueError(f"{kind}: manifest codes do not match image_size {m.image_size} / patch 16")
    return next(iter(sizes.values()), 0)


class PrepareBatch:
    """The ``map_batches`` function: Arrow rows -> prepared numpy rows, dropping and counting bad ones."""

    def __init__(self, kind: str, params: TransformParams, tokenizer, counter=None):
        self.kind, self.params, self.tokenizer, self.counter = kind, params, tokenizer, counter

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        rows, skipped = prepare_rows(
            self.kind, arrow_columns(table, self.params.num_patches), self.params, self.tokenizer
        )
        if skipped and self.counter is not None:
            self.counter.add.remote({f"{self.kind}/{reason}": n for reason, n in skipped.items()})
        return rows


def arrow_columns(table: pa.Table | pa.RecordBatch, num_patches: int) -> dict[str, object]:
    """Shard columns as the transforms take them; the codes are a zero-copy reshape of the list values."""
    out: dict[str, object] = {}
    for name in ("image", "dvae_codes", "dvae_codes_flipped", "text"):
        if name not in table.column_names:
            continue
        column = table.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if name.startswith("dvae_codes"):
            out[name] = column.flatten().to_numpy().reshape(len(table), num_patches)
        else:
            out[name] = column.to_pylist()
    return out


def read_kind(
    kind: str, dataset: str, entries: list[ShardEntry], storage_cfg: StorageConfig, shuffle_seed: int | None
) -> ray.data.Dataset:
    """``read_parquet`` of the verified shards, one read task per shard; ``shuffle_seed`` None keeps the
    manifest order.

    Uses Ray's V1 Parquet datasource: V2 bin-packs row groups into 128 MiB of *encoded* bytes per read
    task, which for compressed images means one task for the whole dataset (no parallel decode), and it
    lists files and reads footers in extra tasks at the start of every epoch.
    """
    fs, root = storage.resolve(dataset, storage_cfg)
    shuffle = (
        None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    )
    ctx = ray.data.DataContext.get_current()
    use_v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(
            [f"{root}/{e.file}" for e in entries],
            filesystem=fs,
            shuffle=shuffle,
            partitioning=None,
            override_num_blocks=len(entries),
        )
    finally:
        ctx.use_datasource_v2 = use_v2


def build_train_data(
    config: Config, tokenizer: WordPieceTokenizer, seed: int | None = None, prepare_batch_rows: int = 64
) -> TrainData:
    """Verifies and opens the train datasets of the kinds with ratio > 0 (needs ``ray.init`` done).

    ``seed`` (default ``data.seed``) seeds the file order of the first epoch; a resumed run can pass a
    different one so that it does not replay the first run's file order.
    """
    data = config.data
    ratios = validate_ratios(data.ratios, [k for k, v in data.train.items() if v])
    seed = data.seed if seed is None else seed
    manifests, entries, skipped_shards = {}, {}, {}
    for kind in ratios:
        manifest, good, bad = check_shards(
            data.train[kind], config.storage, data.verify_checksums, data.on_corrupt_shard
        )
        if manifest.kind != kind:
            raise ValueError(f"data.train.{kind}: {data.train[kind]} holds a {manifest.kind!r} dataset")
        manifests[kind], entries[kind] = manifest, good
        if bad:
            skipped_shards[kind] = bad
    # validation decodes images even when no image kind is trained (a text-only mix in a sweep)
    held_out = {
        f"val.{kind}": shard_format.read_manifest(uri, config.storage)
        for kind, uri in data.val.items()
        if uri and kind != "text"
    }
    params = transform_params(config, tokenizer, image_size_of({**manifests, **held_out}))
    # on the driver's node: a counter on a worker node would take the counts with it when that node goes
    here = ray.get_runtime_context().get_node_id()
    counter = SkipCounter.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote()
    datasets, names = {}, {}
    for i, kind in enumerate(ratios):
        names[kind] = f"train_{kind}"
        ds = read_kind(kind, data.train[kind], entries[kind], config.storage, shuffle_seed=seed * 1000 + i)
        datasets[names[kind]] = ds.map_batches(
            PrepareBatch(kind, params, tokenizer if kind != "image" else None, counter),
            batch_format="pyarrow",
            batch_size=prepare_batch_rows,
            zero_copy_batch=True,
        )
    spec = StreamSpec(
        ratios=ratios,
        dataset_names=names,
        batch_size=data.batch_size,
        full_world=config.train.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=data.seed,
        params=params,
        tokenizer=tokenizer,
        skip_counter=counter,
        corrupt_shards={kind: len(bad) for kind, bad in skipped_shards.items()},
        read_ahead=data.read_ahead,
        stall_timeout_s=data.stall_timeout_s,
        sources={kind: data.train[kind] for kind in ratios},
    )
    # every dataset is split with streaming_split(equal=True): equal rows per rank, so with drop_last all
    # ranks run out of a kind at the same step and restart its epoch together
    return TrainData(datasets, ray.train.DataConfig(datasets_to_split="all"), spec, manifests, skipped_shards)
