"""Driver side: every kind's train shards verified and described for the readers in the Train workers.

Per kind: the manifest's shards are checked (sizes always, sha256 when ``data.verify_checksums``; a bad
shard is an error or, with ``data.on_corrupt_shard=skip``, a logged and counted skip). What survives is a
``KindSource`` (files, rows, identity); each Train worker reads its own rows of it with Ray Data
(``pipeline.data.reader``) in the order ``pipeline.data.order`` fixes, so that a resumed or resized run
reads exactly the rows an unfaulted run reads. The random per-batch augmentation happens in the worker
(``pipeline.data.stream``), seeded by the batch's place in that order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import storage
from pipeline.config import KINDS, Config, StorageConfig
from pipeline.data.mixing import KindSampler, validate_ratios
from pipeline.data.order import DataOrder, KindSource, partitions_for
from pipeline.data.tokenizer import WordPieceTokenizer
from pipeline.data.transforms import TransformParams
from pipeline.shards import format as shard_format
from pipeline.shards.format import Manifest, ShardEntry, ShardIntegrityError

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class SkipCounter:
    """Rows replaced in trained batches, by kind and reason, summed over the ranks."""

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
    layout: DataOrder  # which rows form every global batch of every kind
    params: TransformParams
    tokenizer: WordPieceTokenizer
    storage: StorageConfig
    on_changed_data: str = "error"  # data.on_changed_data
    skip_counter: ray.actor.ActorHandle | None = None
    corrupt_shards: dict[str, int] = field(default_factory=dict)  # kind -> shards skipped before reading
    read_ahead: int = 4  # batches per kind queued by the worker's reader thread (data.read_ahead)
    stall_timeout_s: float = 600  # data.stall_timeout_s

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.ratios)

    def rows_per_rank(self, world_size: int) -> int:
        """A rank's share of the global batch when ``world_size`` ranks train (an elastic run's world size
        divides it: ``pipeline.train.launch.check_world_sizes``)."""
        rows, rest = divmod(self.layout.global_rows, world_size)
        if rest:
            raise ValueError(f"{world_size} ranks cannot split a global batch of {self.layout.global_rows}")
        return rows


@dataclass
class TrainData:
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


def kind_source(kind: str, uri: str, shards: list[ShardEntry]) -> KindSource:
    """The readers' view of a verified dataset; its identity covers exactly the shards that will be read."""
    listed = [{"file": e.file, "rows": e.rows, "sha256": e.sha256} for e in shards]
    identity = hashlib.sha256(json.dumps([uri, listed], sort_keys=True).encode()).hexdigest()[:16]
    return KindSource(
        kind, KINDS.index(kind), uri, tuple(e.file for e in shards), tuple(e.rows for e in shards), identity
    )


def read_keys(source: KindSource, storage_cfg: StorageConfig) -> list[list[str]]:
    """Every row key of the source, per shard (only the ``key`` column is read)."""
    out = []
    for name in source.files:
        fs, path = storage.resolve(storage.join(source.uri, name), storage_cfg)
        with fs.open_input_file(path) as f:
            out.append(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return out


@dataclass
class StepRows:
    """What step ``step`` (1-based) of a run trains: its kind and, per micro-batch, the global batch
    (epoch, index) and the row keys."""

    step: int
    kind: str
    batches: list[tuple[int, int]]
    keys: list[list[str]]


def step_rows(config: Config, layout: DataOrder, first: int, count: int) -> list[StepRows]:
    """The rows of steps ``first..first+count-1`` of a run of ``config``: a pure function of the config and
    the shards (the kind sequence, then each kind's order), whatever the world size or restarts. Reads only
    the ``key`` column of the kinds involved."""
    ratios = validate_ratios(config.data.ratios, [k for k, v in config.data.train.items() if v])
    sampler = KindSampler(ratios, config.data.seed)
    accum = config.train.grad_accum
    kinds = [next(sampler) for _ in range(first + count - 1)]
    keys = {kind: read_keys(layout.sources[kind], config.storage) for kind in set(kinds[first - 1 :])}
    out = []
    for step in range(first, first + count):
        kind = kinds[step - 1]
        before = kinds[: step - 1].count(kind) * accum  # global batches of the kind trained before
        batches = layout.batches(kind, 0, before, accum)  # epoch 0 from the start: epochs roll over
        rows = [layout.order(kind, e).rows_of_batch(b) for e, b in batches]
        out.append(
            StepRows(
                step, kind, batches, [[keys[kind][s][r] for s, r in zip(*sr, strict=True)] for sr in rows]
            )
        )
    return out


def data_order(config: Config) -> tuple[DataOrder, dict[str, Manifest], dict[str, list[str]]]:
    """The train datasets of the kinds with ratio > 0, verified (``check_shards``), as the run orders them:
    (the order, the manifests, per kind the shards left out as "file: reason"). Needs no Ray."""
    data = config.data
    ratios = validate_ratios(data.ratios, [k for k, v in data.train.items() if v])
    manifests, sources, skipped_shards = {}, {}, {}
    for kind in ratios:
        manifest, good, bad = check_shards(
            data.train[kind], config.storage, data.verify_checksums, data.on_corrupt_shard
        )
        if manifest.kind != kind:
            raise ValueError(f"data.train.{kind}: {data.train[kind]} holds a {manifest.kind!r} dataset")
        manifests[kind] = manifest
        sources[kind] = kind_source(kind, data.train[kind], good)
        if bad:
            skipped_shards[kind] = bad
    layout = DataOrder(
        sources,
        global_rows=data.batch_size * config.train.num_workers,
        partitions=partitions_for(*config.train.worker_range),
        shuffle_window=data.shuffle_window,
        seed=data.seed,
    )
    return layout, manifests, skipped_shards


def build_train_data(config: Config, tokenizer: WordPieceTokenizer) -> TrainData:
    """``data_order`` plus what the workers need to read and prepare the rows (needs ``ray.init`` done: the
    skip counter is an actor, placed on the driver's node so that it outlives any worker node)."""
    data = config.data
    layout, manifests, skipped_shards = data_order(config)
    # validation decodes images even when no image kind is trained (a text-only mix in a sweep)
    held_out = {
        f"val.{kind}": shard_format.read_manifest(uri, config.storage)
        for kind, uri in data.val.items()
        if uri and kind != "text"
    }
    params = transform_params(config, tokenizer, image_size_of({**manifests, **held_out}))
    here = ray.get_runtime_context().get_node_id()
    counter = SkipCounter.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote()
    spec = StreamSpec(
        ratios=validate_ratios(data.ratios, [k for k, v in data.train.items() if v]),
        layout=layout,
        params=params,
        tokenizer=tokenizer,
        storage=config.storage,
        on_changed_data=data.on_changed_data,
        skip_counter=counter,
        corrupt_shards={kind: len(bad) for kind, bad in skipped_shards.items()},
        read_ahead=data.read_ahead,
        stall_timeout_s=data.stall_timeout_s,
    )
    return TrainData(spec, manifests, skipped_shards)
