"""Reading the rows of ``pipeline.data.order``: one source, one rank, one epoch at a time, in Ray Data tasks.

An epoch of a rank is a list of read tasks of about ``ROWS_PER_TASK`` rows each (a range of rows of a chunk
of the rank's partitions): a task reads from the shards only the row groups holding its rows, puts the rows
in the epoch's order and prepares them (decode, normalise, tokenise). ``SourceReader`` runs the tasks in
parallel with Ray Data and streams their results in task order (``preserve_order``), then cuts the rank's
micro-batch ``b`` out of them: every partition's rows ``[b*g, (b+1)*g)``, in partition order.

A row that cannot be prepared (an undecodable image, an empty caption) is replaced by the next usable row
of the same piece of its partition (``stand_in_piece`` rows, whole batches, counted from the region's
start, so the same at every world size and task size), and counted by reason: the batch keeps its size and
its place in the order, and nothing is dropped silently. A piece with no usable row is an error naming the
dataset.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.data.order import EpochOrder, SourceShards
from pipeline.data.transforms import SKIP_REASONS, TransformParams, prepare_columns

KEY_HASH_BITS = 52  # per-row key hashes whose sums stay exact in a float64 (an MLflow metric)
COLUMNS = {
    "image": ("key", "image", "dvae_codes", "dvae_codes_flipped"),
    "text": ("key", "text"),
    "image_text": ("key", "image", "dvae_codes", "dvae_codes_flipped", "text"),
}


def key_hash(keys: list[str]) -> np.ndarray:
    """A 52-bit hash per row key: sums of them fingerprint a batch's multiset of rows."""
    mask = (1 << KEY_HASH_BITS) - 1
    return np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") & mask for k in keys],
        dtype=np.int64,
    )


def keys_digest(hashes: np.ndarray) -> int:
    """The order-free fingerprint of a multiset of rows: the sum of their key hashes mod 2**52."""
    return int(np.asarray(hashes, dtype=np.uint64).sum() % np.uint64(1 << KEY_HASH_BITS))


STAND_IN_ROWS = 64  # rows of a partition among which an unusable row finds its stand-in (whole batches)
ROWS_PER_TASK = 128  # rows a read task prepares: fewer, larger tasks amortise Ray Data's per-task cost


def stand_in_piece(order: EpochOrder) -> int:
    g = order.rows_per_partition_batch
    return -(-STAND_IN_ROWS // g) * g


@dataclass(frozen=True)
class ReadTask:
    """Rows ``start..stop-1`` of some partitions' regions of one epoch: what a Ray Data task reads and
    prepares (``start`` at a stand-in piece's start)."""

    start: int
    stop: int
    partitions: tuple[int, ...]
    first_row: int  # rows of the task before this one are not wanted (a resume inside the task)


def tasks_for(order: EpochOrder, partitions: range, first_batch: int, rows_per_task: int) -> list[ReadTask]:
    """The read tasks of a rank's ``partitions`` from global batch ``first_batch`` to the epoch's end."""
    piece = stand_in_piece(order)
    chunk = max(1, rows_per_task // piece)  # partitions per task
    span = max(1, rows_per_task // (piece * min(chunk, len(partitions)))) * piece  # rows per partition
    first = first_batch * order.rows_per_partition_batch
    starts = range(first // piece * piece, order.region_rows, span)
    return [
        ReadTask(lo, min(lo + span, order.region_rows), tuple(partitions[i : i + chunk]), max(0, first - lo))
        for lo in starts
        for i in range(0, len(partitions), chunk)
    ]


def read_rows(
    source: SourceShards, storage_cfg: StorageConfig, shards: np.ndarray, rows: np.ndarray
) -> dict[str, object]:
    """The rows (``shards[i]``, ``rows[i]``) of the source in that order, as the transforms take columns;
    only the row groups holding them are read."""
    tables, index = [], np.empty(len(rows), dtype=np.int64)
    read = 0
    for shard in np.unique(shards):
        uri = storage.join(source.uri, source.files[shard])
        fs, path = storage.resolve(uri, storage_cfg)
        try:
            f = fs.open_input_file(path)
        except OSError as e:  # storage gone after its retries: say which file, not only the client's error
            raise OSError(f"cannot read {uri}: {e}") from e
        with f:
            parquet = pq.ParquetFile(f)
            sizes = np.array([parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            wanted = np.flatnonzero(shards == shard)
            group_of = np.searchsorted(starts, rows[wanted], side="right") - 1
            groups = np.unique(group_of)
            tables.append(parquet.read_row_groups(groups.tolist(), columns=list(COLUMNS[source.kind])))
        before = np.concatenate([[0], np.cumsum(sizes[groups])])  # rows read before each group
        index[wanted] = read + before[np.searchsorted(groups, group_of)] + rows[wanted] - starts[group_of]
        read += tables[-1].num_rows
    # shards written apart may differ in nullability (a shard with a null image): unify, not refuse
    return table_columns(pa.concat_tables(tables, promote_options="default").take(pa.array(index)))


def table_columns(table: pa.Table | pa.RecordBatch) -> dict[str, object]:
    """Shard columns as the transforms take them; the codes are a zero-copy reshape of the list values."""
    columns: dict[str, object] = {}
    for name in table.column_names:
        column = table.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if name.startswith("dvae_codes"):
            columns[name] = column.flatten().to_numpy().reshape(len(table), -1)
        else:
            columns[name] = column.to_pylist()
    return columns


def stand_ins(unusable: np.ndarray, size: int, piece: int) -> np.ndarray:
    """For each row, the row that takes its place: itself, or for an unusable row the next usable row of
    the same piece (cyclically); ``unusable`` holds partitions of ``size`` rows one after the other, each
    cut into pieces of ``piece`` rows (the last one may be shorter)."""
    out = np.arange(len(unusable))
    for lo in range(0, len(unusable), size):
        for a in range(lo, lo + size, piece):
            b = min(a + piece, lo + size)
            good = np.flatnonzero(~unusable[a:b]) + a
            if not len(good):
                raise ValueError(f"all {b - a} rows of a piece are unusable")
            for i in np.flatnonzero(unusable[a:b]) + a:
                later = good[good > i]
                out[i] = later[0] if len(later) else good[0]
    return out


BOOKKEEPING = ("key_hash", "skip_reason")  # columns of a read batch that are not model inputs


def skipped(rows: dict[str, np.ndarray]) -> Counter:
    """Rows of a read batch that stand in for unusable ones, by reason."""
    codes = rows["skip_reason"]
    return Counter(SKIP_REASONS[c] for c in codes[codes >= 0])


def read_task(
    task: ReadTask,
    order: EpochOrder,
    source: SourceShards,
    storage_cfg: StorageConfig,
    params: TransformParams,
    tokenizer,
) -> dict[str, np.ndarray]:
    """The prepared rows of a task: partition after partition, each partition's rows from
    ``task.first_row`` on, in epoch order, with the ``BOOKKEEPING`` columns: the row's key hash, and for a
    replaced row the reason (an index into ``SKIP_REASONS``; -1 for a row that is itself)."""
    positions = np.concatenate([order.positions(p, task.start, task.stop) for p in task.partitions])
    columns = read_rows(source, storage_cfg, *order.locate(positions))
    prepared, reasons = prepare_columns(
        source.kind, columns, params, tokenizer if source.kind != "image" else None
    )
    prepared["key_hash"] = key_hash(columns["key"])
    unusable = np.array([r is not None for r in reasons], dtype=bool)
    size = task.stop - task.start
    try:
        use = stand_ins(unusable, size, stand_in_piece(order))
    except ValueError as e:
        raise ValueError(
            f"{source.uri}: {e} (epoch {order.epoch}, rows {task.start}..{task.stop - 1} of partitions "
            f"{list(task.partitions)})"
        ) from None
    wanted = np.concatenate(
        [np.arange(i * size + task.first_row, (i + 1) * size) for i in range(len(task.partitions))]
    )
    out = {name: values[use[wanted]] for name, values in prepared.items()}
    out["skip_reason"] = np.array([SKIP_REASONS.index(r) if r else -1 for r in reasons], np.int8)[wanted]
    return out


def micro_batches(
    results: Iterator[tuple[ReadTask, dict[str, np.ndarray]]], order: EpochOrder, partitions: range
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(global batch index, the rank's rows of it) from a rank's task results in task order: batch ``b``
    takes rows ``[b*g, (b+1)*g)`` of each of the rank's partitions, in partition order, once all of them
    have arrived (a rank's partitions may be read by several tasks)."""
    g = order.rows_per_partition_batch
    pending: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    for task, rows in results:
        count = len(rows["key_hash"]) // (g * len(task.partitions))
        first = (task.start + task.first_row) // g
        for i, p in enumerate(task.partitions):
            for j in range(count):
                lo = (i * count + j) * g
                pending.setdefault(first + j, {})[p] = {k: v[lo : lo + g] for k, v in rows.items()}
        while pending and len(pending[min(pending)]) == len(partitions):
            parts = pending.pop(batch := min(pending))
            yield batch, {k: np.concatenate([parts[p][k] for p in partitions]) for k in rows}


def _read_tasks(batch: dict[str, np.ndarray], tasks, orders, source, storage_cfg, params, tokenizer):
    """The ``map_batches`` function: task index -> its prepared rows."""
    (index,) = batch["task"]
    epoch, task = tasks[index]
    rows = read_task(task, orders[epoch], source, storage_cfg, params, tokenizer)
    return {**rows, "task": np.full(len(rows["key_hash"]), index)}


TASKS_PER_DATASET = (
    64  # a small epoch shares its Ray Data dataset with the next ones: each costs CPU to start
)


class SourceReader:
    """A rank's batches of one source, epoch after epoch, from a data position on: Ray Data datasets of read
    tasks (``tasks_for``; one epoch each, or several small ones) run in parallel, consumed in order."""

    def __init__(self, spec, source_name: str, rank: int, world: int, prefetch_blocks: int = 2):
        self.spec, self.source = spec, spec.layout.sources[source_name]
        self.rank, self.world = rank, world
        self.prefetch_blocks = prefetch_blocks

    def order(self, epoch: int) -> EpochOrder:
        order = self.spec.layout.order(self.source.name, epoch)
        if order.batches == 0:
            raise RuntimeError(
                f"the {self.source.name} train dataset {self.source.uri} has {sum(self.source.rows)} "
                f"rows, too few for one global batch of {order.global_rows} rows in "
                f"{order.partitions} partition(s) (fewer workers or a smaller data.batch_size)"
            )
        return order

    def epochs(self, epoch: int, first_batch: int) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(epoch, global batch index, the rank's rows) from batch ``first_batch`` of ``epoch`` on."""
        order = self.order(epoch)
        per_epoch = len(tasks_for(order, order.partitions_of(self.rank, self.world), 0, ROWS_PER_TASK))
        span = -(-TASKS_PER_DATASET // per_epoch)
        while True:
            yield from self._read(range(epoch, epoch + span), first_batch)
            epoch, first_batch = epoch + span, 0

    def epoch(self, epoch: int, first_batch: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(global batch index, the rank's rows) of one epoch from batch ``first_batch`` to its end."""
        for _, batch, rows in self._read(range(epoch, epoch + 1), first_batch):
            yield batch, rows

    def _read(self, epochs: range, first_batch: int) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        import ray.data

        orders = {e: self.order(e) for e in epochs}
        partitions = orders[epochs[0]].partitions_of(self.rank, self.world)
        tasks = [
            (e, task)
            for e in epochs
            for task in tasks_for(orders[e], partitions, first_batch if e == epochs[0] else 0, ROWS_PER_TASK)
        ]
        if not tasks:  # a resume at the very end of an epoch
            return
        ds = ray.data.from_items([{"task": i} for i in range(len(tasks))], override_num_blocks=len(tasks))
        ds = ds.map_batches(
            _read_tasks,
            fn_kwargs=dict(
                tasks=tasks,
                orders=orders,
                source=self.source,
                storage_cfg=self.spec.storage,
                params=self.spec.params,
                tokenizer=self.spec.tokenizer,
            ),
            batch_size=1,
            batch_format="numpy",
        )
        ds.context.execution_options.preserve_order = True  # the epochs' order is the tasks' order
        ds.context.enable_progress_bars = False  # bars in a worker only fill the job log (and cost CPU)
        ds.context.raise_original_map_exception = True  # the read error itself, not "UDF failed"
        if _IdleBackoff not in ds.context.custom_execution_callback_classes:
            ds.context.custom_execution_callback_classes.append(_IdleBackoff)
        blocks = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch_blocks)
        results = (
            (tasks[int(block["task"][0])], {k: v for k, v in block.items() if k != "task"})
            for block in blocks
        )
        for epoch, group in itertools.groupby(results, key=lambda result: result[0][0]):
            per_task = ((task, rows) for (_, task), rows in group)
            for batch, rows in micro_batches(per_task, orders[epoch], partitions):
                yield epoch, batch, rows


class _IdleBackoff(ExecutionCallback):
    """A Ray Data execution callback: a loop step with no task running (the output is backpressured: the
    trainer has its read-ahead) sleeps a little. Ray Data's scheduling loop only waits on running tasks, so
    a dataset whose consumer is ahead spins a CPU core; on a training node that core is the trainer's."""

    IDLE_SLEEP_S = 0.1  # as long as the loop waits for a running task

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None) or {}
        if not any(op.num_active_tasks() for op in topology):
            time.sleep(self.IDLE_SLEEP_S)
