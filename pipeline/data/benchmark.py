"""Input-pipeline throughput on the same shards and transforms, three ways, in one run.

- per-core bound: one process reads, prepares, batches and augments (no parallelism, no transfer);
- torch DataLoader with W persistent worker processes preparing shards, the main process batching and
  augmenting, one iterator per epoch (as a training loop uses it);
- Ray Data: the training job's own reader (``pipeline.data.reader.SourceReader``: read tasks that read,
  order and prepare the rows, run by Ray Data on a local cluster of W CPUs), read as a Train worker reads
  it (``SourceReader.epochs``: consecutive epochs stream from one execution) and augmented exactly as
  the Train worker's ``MixedStream`` does; its stream is closed at the end of each round, so that it does
  not work ahead while the other paths are timed.
Each path runs one warm-up round (worker start-up, imports) and then timed rounds of consecutive epochs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch.utils.data

from pipeline import storage
from pipeline.config import Config, StorageConfig
from pipeline.data.datasets import build_train_data, transform_params
from pipeline.data.reader import BOOKKEEPING, SourceReader, table_columns
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.data.tokenizer import WordPieceTokenizer, load_or_train_tokenizer, train_tokenizer
from pipeline.data.transforms import TransformParams, augment_batch, batch_rng, prepare_rows
from pipeline.shards import format as shard_format


@dataclass
class Setup:
    config: Config
    kind: str
    dataset: str
    paths: list[str]
    storage: StorageConfig
    params: TransformParams
    tokenizer: WordPieceTokenizer | None
    batch_size: int
    prepare_rows: int
    rows: int


def make_setup(
    config: Config, kind: str, dataset: str, rows: int, image_size: int, prepare_rows_: int
) -> Setup:
    if not dataset:
        dataset = tempfile.mkdtemp(prefix="flava-bench-")
        write_synthetic_dataset(dataset, kind, rows, max(4, rows // 128), image_size, config.storage)
    manifest = shard_format.read_manifest(dataset, config.storage)
    config.data.train, config.data.val, config.data.ratios = {kind: dataset}, {}, {kind: 1.0}
    config.train.num_workers, config.train.min_workers = 1, 0  # one consumer: its batch is the global batch
    if kind == "image":  # no captions: the params still want token ids, which image batches never use
        tokenizer = train_tokenizer(iter(["image only"]), 64, config.data.max_text_length)
    else:
        tokenizer = load_or_train_tokenizer(config)
    params = transform_params(config, tokenizer, manifest.image_size)
    paths = [storage.join(dataset, e.file) for e in manifest.shards]
    return Setup(
        config,
        kind,
        dataset,
        paths,
        config.storage,
        params,
        tokenizer,
        config.data.batch_size,
        prepare_rows_,
        manifest.rows,
    )


def prepared_chunks(setup: Setup, paths: list[str]) -> Iterator[dict[str, np.ndarray]]:
    for uri in paths:
        fs, path = storage.resolve(uri, setup.storage)
        for table_batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(
            batch_size=setup.prepare_rows
        ):
            columns = table_columns(table_batch)
            yield prepare_rows(setup.kind, columns, setup.params, setup.tokenizer)[0]


def rebatch(chunks: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches from variable-size chunks (the last partial batch is dropped, as in training)."""
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for chunk in chunks:
        pending.append(chunk)
        have += len(next(iter(chunk.values())))
        while have >= size:
            merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            have -= size
            pending = [rest] if have else []


Batches = Iterator[tuple[int, int, dict[str, np.ndarray]]]  # (epoch, batch index, prepared rows)


def consume(setup: Setup, batches: Batches) -> tuple[int, float]:
    """Samples augmented, and when the last one was (a stream's shutdown after it is not training time)."""
    samples, last = 0, time.perf_counter()
    for epoch, i, rows in batches:
        batch = augment_batch(setup.kind, rows, setup.params, batch_rng(0, epoch, i))
        samples += len(batch["attention_mask" if setup.kind == "text" else "pixel_values"])
        last = time.perf_counter()
    return samples, last


def numbered(epochs: range, epoch_batches) -> Batches:
    for epoch in epochs:
        for i, rows in enumerate(epoch_batches()):
            yield epoch, i, rows


def bench_single(setup: Setup):
    def chunks():
        return rebatch(prepared_chunks(setup, setup.paths), setup.batch_size)

    return lambda epochs: consume(setup, numbered(epochs, chunks))


class ShardChunks(torch.utils.data.IterableDataset):
    """Each DataLoader worker prepares its own share of the shards."""

    def __init__(self, setup: Setup):
        self.setup = setup

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        paths = self.setup.paths if info is None else self.setup.paths[info.id :: info.num_workers]
        yield from prepared_chunks(self.setup, paths)


def bench_dataloader(setup: Setup, workers: int):
    loader = torch.utils.data.DataLoader(
        ShardChunks(setup), batch_size=None, num_workers=workers, persistent_workers=True, prefetch_factor=4
    )

    def chunks():  # tensors come via shared memory
        return rebatch(({k: v.numpy() for k, v in chunk.items()} for chunk in loader), setup.batch_size)

    return lambda epochs: consume(setup, numbered(epochs, chunks))


def bench_ray(setup: Setup, workers: int):
    import ray

    ray.init(
        address="local",  # its own CPUs, even where a `ray start` cluster is up
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    return ray_reader_epochs(setup)


def ray_reader_epochs(setup: Setup):
    """The Ray Data path on the cluster this process is connected to: its read tasks go wherever Ray
    finds a free CPU, its consumer is this process."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = build_train_data(setup.config, setup.tokenizer).spec
    reader = SourceReader(spec, setup.kind, rank=0, world=1)  # what a Train worker reads

    def stream(epochs: range) -> Batches:
        rows_of = reader.epochs(epochs.start, 0)
        try:
            for epoch, i, rows in rows_of:
                if epoch >= epochs.stop:
                    return
                yield epoch, i, {k: v for k, v in rows.items() if k not in BOOKKEEPING}
        finally:
            rows_of.close()  # stops its execution: no work ahead while the next path is timed

    return lambda epochs: consume(setup, stream(epochs))


@contextlib.contextmanager
def benchmark_setup(
    config: Config, kind: str, dataset: str, rows: int, image_size: int, prepare_rows_: int
) -> Iterator[Setup]:
    """``make_setup``, and the synthetic shards it made (no ``dataset`` given) removed at the end."""
    setup = make_setup(config, kind, dataset, rows, image_size, prepare_rows_)
    try:
        yield setup
    finally:
        if not dataset:
            shutil.rmtree(setup.dataset, ignore_errors=True)


def run(setup: Setup, workers: int, rounds: int, epochs_per_round: int = 2) -> dict[str, float]:
    """Median samples/s per path over ``rounds`` rounds of ``epochs_per_round`` epochs, the paths
    interleaved round by round so that a change in machine load hits all of them alike (each path has
    one untimed warm-up round first)."""
    import ray

    print(
        f"{setup.kind}: {setup.rows} rows in {len(setup.paths)} shards at {setup.dataset}, "
        f"{setup.params.image_size}px, batch {setup.batch_size}, {workers} worker CPU(s), {rounds} round(s) "
        f"of {epochs_per_round} epoch(s)"
    )
    paths = {"single process (per-core bound)": bench_single(setup)}
    # DataLoader workers fork before Ray starts its threads
    paths[f"torch DataLoader ({workers} workers)"] = bench_dataloader(setup, workers)
    paths[f"torch DataLoader ({workers} workers)"](range(1))
    paths[f"Ray Data ({workers} CPUs)"] = bench_ray(setup, workers)
    try:
        return time_paths(paths, rounds, epochs_per_round)
    finally:
        ray.shutdown()


def time_paths(paths: dict, rounds: int, epochs_per_round: int) -> dict[str, float]:
    """Median samples/s per path; every path but the DataLoader (warmed before Ray started: its workers
    fork) gets its untimed warm-up round here."""
    for name, epochs in paths.items():
        if not name.startswith("torch"):
            epochs(range(epochs_per_round))
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(1, rounds + 1):
        for name, epochs in paths.items():
            start = time.perf_counter()
            samples, last = epochs(range(r * epochs_per_round, (r + 1) * epochs_per_round))
            rates[name].append(samples / (last - start))
    return {name: float(np.median(values)) for name, values in rates.items()}


def format_table(results: dict[str, float], workers: int) -> str:
    names = list(results)
    single, loader, ray_sps = (results[n] for n in names)
    lines = [f"{'path':<36}{'samples/s':>12}{'vs 1 core':>11}{'per CPU / 1 core':>18}"]
    for name in names:
        cpus = 1 if name.startswith("single") else workers
        sps = results[name]
        lines.append(f"{name:<36}{sps:>12.1f}{sps / single:>10.2f}x{sps / cpus / single:>17.0%}")
    lines.append(
        f"Ray Data / DataLoader: {ray_sps / loader:.2f}x (target >= 1.00); "
        f"Ray Data per CPU / per-core bound: {ray_sps / workers / single:.0%} (target >= 70%)"
    )
    return "\n".join(lines)
