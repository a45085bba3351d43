"""Driver side: every source's train shards verified and described for the readers in the Train workers.

Per source: the manifest's shards are checked (sizes always, sha256 when ``data.verify_checksums``; a bad
shard is an error or, with ``data.on_corrupt_shard=skip``, a logged and counted skip). What survives is a
``SourceShards`` (name, kind, files, rows, identity); each Train worker reads its own rows of it with Ray Data
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
from pipeline.config import Config, StorageConfig
from pipeline.data.mixing import (
    SOURCE_LOSSES,
    MixingSpec,
    SourceSampler,
    mixing_spec,
    mixture,
    seed_index,
)
from pipeline.data.order import DataOrder, SourceShards, partitions_for
from pipeline.data.tokenizer import WordPieceTokenizer
from pipeline.data.transforms import PATCH_SIZE, MultiCrop, TransformParams
from pipeline.shards import format as shard_format
from pipeline.shards.format import Manifest, ShardEntry, ShardIntegrityError

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class SkipCounter:
    """Rows replaced in trained batches, by source and reason, summed over the ranks."""

    def __init__(self):
        self._counts: Counter = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self._counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self._counts)


@dataclass
class StreamSpec:
    """What a Train worker needs to build its ``MixedStream`` (pass it in ``train_loop_config``)."""

    ratios: dict[str, float]  # normalised, sources with ratio > 0 in config order = the fetch order
    layout: DataOrder  # which rows form every global batch of every source
    params: TransformParams
    tokenizer: WordPieceTokenizer
    storage: StorageConfig
    on_changed_data: str = "error"  # data.on_changed_data
    skip_counter: ray.actor.ActorHandle | None = None
    corrupt_shards: dict[str, int] = field(default_factory=dict)  # source -> shards skipped before reading
    read_ahead: int = 4  # batches per source queued by the worker's reader thread (data.read_ahead)
    stall_timeout_s: float = 600  # data.stall_timeout_s
    named: bool = False  # sources given by name (data.sources): their own metrics beside the kinds'
    mixing: MixingSpec = field(default_factory=MixingSpec)  # data.mixing*: static ratios or online

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.ratios)

    def kind_of(self, source_name: str) -> str:
        return self.layout.sources[source_name].kind

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
    manifests: dict[str, Manifest]  # by source
    skipped_shards: dict[str, list[str]] = field(default_factory=dict)  # source -> "file: reason"

    def identities(self) -> dict[str, str]:
        """Dataset fingerprints per source (for MLflow params)."""
        return {name: m.identity() for name, m in self.manifests.items()}


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
        multi_crop=multi_crop_of(config, image_size) if config.model.image_objective == "dino" else None,
    )


def multi_crop_of(config: Config, image_size: int) -> MultiCrop:
    """DINO's views for ``model.dino``: global crops at the canonical size; local crops at
    ``local_crop_size``, or by default the reference's 96/224 of it in whole patches (at least one)."""
    dino, patch = config.model.dino, PATCH_SIZE
    local = dino.local_crop_size or max(patch, round(image_size * 96 / 224 / patch) * patch)
    return MultiCrop(
        global_crops=dino.global_crops,
        local_crops=dino.local_crops,
        global_size=image_size,
        local_size=local,
        global_scale=tuple(dino.global_crop_scale),
        local_scale=tuple(dino.local_crop_scale),
    )


def image_size_of(manifests: dict[str, Manifest]) -> int:
    """The one canonical image size of the image datasets (their codes are only valid at that size)."""
    sizes = {name: m.image_size for name, m in manifests.items() if m.kind != "text"}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"image datasets disagree on image_size: {sizes}; prepare them at one size")
    for name, m in manifests.items():
        if m.kind != "text" and (m.codebook is None or m.codebook.code_grid * 16 != m.image_size):
            raise ValueError(f"{name}: manifest codes do not match image_size {m.image_size} / patch 16")
    return next(iter(sizes.values()), 0)


def source_shards(name: str, kind: str, uri: str, shards: list[ShardEntry]) -> SourceShards:
    """The readers' view of a verified dataset; its identity covers exactly the shards that will be read."""
    listed = [{"file": e.file, "rows": e.rows, "sha256": e.sha256} for e in shards]
    identity = hashlib.sha256(json.dumps([uri, listed], sort_keys=True).encode()).hexdigest()[:16]
    files, rows = tuple(e.file for e in shards), tuple(e.rows for e in shards)
    return SourceShards(name, kind, seed_index(name), uri, files, rows, identity)


def read_keys(source: SourceShards, storage_cfg: StorageConfig) -> list[list[str]]:
    """Every row key of the source, per shard (only the ``key`` column is read)."""
    out = []
    for name in source.files:
        fs, path = storage.resolve(storage.join(source.uri, name), storage_cfg)
        with fs.open_input_file(path) as f:
            out.append(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return out


@dataclass
class StepRows:
    """What step ``step`` (1-based) of a run trains: its source and, per micro-batch, the global batch
    (epoch, index) and the row keys."""

    step: int
    source: str
    batches: list[tuple[int, int]]
    keys: list[list[str]]


def step_rows(config: Config, layout: DataOrder, first: int, count: int) -> list[StepRows]:
    """The rows of steps ``first..first+count-1`` of a run of ``config``: a pure function of the config and
    the shards (the source sequence, then each source's order), whatever the world size or restarts. Reads
    only the ``key`` column of the sources involved."""
    sampler = SourceSampler(mixture(config.data), config.data.seed)
    accum = config.train.grad_accum
    drawn = [next(sampler) for _ in range(first + count - 1)]
    keys = {name: read_keys(layout.sources[name], config.storage) for name in set(drawn[first - 1 :])}
    out = []
    for step in range(first, first + count):
        name = drawn[step - 1]
        before = drawn[: step - 1].count(name) * accum  # global batches of the source trained before
        batches = layout.batches(name, 0, before, accum)  # epoch 0 from the start: epochs roll over
        rows = [layout.order(name, e).rows_of_batch(b) for e, b in batches]
        out.append(
            StepRows(
                step, name, batches, [[keys[name][s][r] for s, r in zip(*sr, strict=True)] for sr in rows]
            )
        )
    return out


def data_order(config: Config) -> tuple[DataOrder, dict[str, Manifest], dict[str, list[str]]]:
    """The train datasets of the sources with ratio > 0, verified (``check_shards``), as the run orders
    them: (the order, the manifests, per source the shards left out as "file: reason"). Needs no Ray."""
    data = config.data
    named = data.named_sources()
    manifests, sources, skipped_shards = {}, {}, {}
    for name in mixture(data):
        source = named[name]
        manifest, good, bad = check_shards(
            source.train, config.storage, data.verify_checksums, data.on_corrupt_shard
        )
        if manifest.kind != source.kind:
            raise ValueError(
                f"{data.key_of(name)}: {source.train} holds a {manifest.kind!r} dataset, not {source.kind!r}"
            )
        manifests[name] = manifest
        sources[name] = source_shards(name, source.kind, source.train, good)
        if bad:
            skipped_shards[name] = bad
    layout = DataOrder(
        sources,
        global_rows=data.batch_size * config.train.num_workers,
        partitions=partitions_for(*config.train.worker_range),
        shuffle_window=data.shuffle_window,
        seed=data.seed,
    )
    return layout, manifests, skipped_shards


def reference_losses(config: Config) -> dict[str, float] | None:
    """``data.mixing=doremi``'s reference: the final loss per source of the run in ``data.mixing_reference``
    (its ``source_losses.json``); a missing file or source is a ``ValueError`` naming it."""
    data = config.data
    if data.mixing != "doremi":
        return None
    if not data.mixing_reference:
        raise ValueError("data.mixing=doremi needs data.mixing_reference: a finished run's directory")
    uri = storage.join(data.mixing_reference, SOURCE_LOSSES)
    if not storage.exists(uri, config.storage):
        raise ValueError(
            f"data.mixing_reference: {uri} not found (a finished run of this project writes it; give that "
            "run's directory, <train.storage_path>/<train.run_name>)"
        )
    losses = json.loads(storage.read_bytes(uri, config.storage))
    missing = sorted(set(mixture(data)) - set(losses))
    if missing:
        raise ValueError(f"data.mixing_reference: {uri} has no loss for source(s) {missing}")
    return {name: float(losses[name]) for name in mixture(data)}


def build_train_data(config: Config, tokenizer: WordPieceTokenizer) -> TrainData:
    """``data_order`` plus what the workers need to read and prepare the rows (needs ``ray.init`` done: the
    skip counter is an actor, placed on the driver's node so that it outlives any worker node)."""
    data = config.data
    layout, manifests, skipped_shards = data_order(config)
    # validation decodes images even when no image kind is trained (a text-only mix in a sweep)
    held_out = {
        f"val.{name}": shard_format.read_manifest(source.val, config.storage)
        for name, source in data.named_sources().items()
        if source.val and source.kind != "text"
    }
    params = transform_params(config, tokenizer, image_size_of({**manifests, **held_out}))
    here = ray.get_runtime_context().get_node_id()
    counter = SkipCounter.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote()
    spec = StreamSpec(
        ratios=mixture(data),
        layout=layout,
        params=params,
        tokenizer=tokenizer,
        storage=config.storage,
        on_changed_data=data.on_changed_data,
        skip_counter=counter,
        corrupt_shards={name: len(bad) for name, bad in skipped_shards.items()},
        read_ahead=data.read_ahead,
        stall_timeout_s=data.stall_timeout_s,
        named=data.named,
        mixing=mixing_spec(data, reference_losses(config)),
    )
    return TrainData(spec, manifests, skipped_shards)
