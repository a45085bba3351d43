"""Inside a Train worker: one stream of batches whose source follows the ratios, identical on every rank.

A source is a named train dataset of one kind (``data.sources``; or one per kind, named after it); a
batch's kind is its source's kind. Why every rank agrees without talking to the others:
- the source of each step comes from the mixing policy (``pipeline.data.mixing``: static ratios, or online
  weights updated from the all-reduced losses), seeded with ``data.seed`` on every rank and checkpointed;
- which rows form global batch ``b`` of epoch ``e`` of a source is a pure function of the seed, the
  source, ``e``, ``b`` and the shards (``pipeline.data.order``), and a rank's batch is its fixed slice of
  it (``pipeline.data.reader``): every rank is at the same batch of a source at the same step, an epoch
  has the same number of batches everywhere, and none of it depends on the world size or on restarts;
- the augmentation (flips, masks, ITM negatives) of each partition's share of a batch is seeded by the
  batch's place in that order, so it does not depend on the world size either.

The data position (per source: epoch, next batch) is part of the checkpoint: a resumed or resized run reads
exactly the rest of the interrupted epoch, nothing twice and nothing skipped. Each source is read ahead by a
thread (``ReadAhead``) across epoch boundaries, so that a new epoch's reading overlaps the training of the
batches still queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np

from pipeline.data.datasets import StreamSpec
from pipeline.data.reader import (
    BOOKKEEPING,
    SourceReader,
    keys_digest,
    skipped,
)
from pipeline.data.transforms import augment_batch, batch_rng

log = logging.getLogger(__name__)


class DataStallError(RuntimeError):
    """No batch within ``data.stall_timeout_s``: the worker fails (and Ray Train restarts it within
    ``train.max_failures``) instead of waiting on storage that does not answer."""


class DataReadError(OSError):
    """A read of a dataset failed (after the storage client's and Ray's retries); names the dataset."""


class ReadAhead:
    """Items of ``source`` (a data source's ``(epoch, batch, rows)``), pulled by a daemon thread up to
    ``depth`` ahead, so that the source's next epoch starts while queued batches still train; an error of
    ``source`` is raised where the item is taken. ``depth`` 0 pulls in the caller's thread (no read-ahead,
    no stall timeout).

    Reads are retried at several levels (the S3 client's attempts, Ray's task retries), so storage that went
    away could hang the step for a long time: a wait of more than ``stall_timeout_s`` (0: no limit) raises
    ``DataStallError`` naming ``source_name``.
    """

    def __init__(self, source: Iterator, depth: int, stall_timeout_s: float = 0, source_name: str = "data"):
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._stall_timeout_s = stall_timeout_s or None
        self._source_name = source_name
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._pull, daemon=True)
            self._thread.start()

    def _pull(self) -> None:
        try:
            for item in self._source:
                while not self._closed.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._closed.is_set():
                    break
        except BaseException as e:  # handed to the consumer, in the training loop's thread
            self._queue.put(e)
        finally:
            self._source.close()  # ends the Ray Data execution of an epoch left unfinished

    def get(self):
        if self._thread is None:
            item = next(self._source)
        else:
            try:
                item = self._queue.get(timeout=self._stall_timeout_s)
            except queue.Empty:
                raise DataStallError(
                    f"no batch from {self._source_name} within {self._stall_timeout_s:g} s "
                    "(data.stall_timeout_s): is its storage reachable?"
                ) from None
        if isinstance(item, Exception):  # named after the dataset: Ray Data's wrapping ends in a hint
            first = next((line for line in str(item).splitlines() if line.strip()), type(item).__name__)
            raise DataReadError(f"reading {self._source_name} failed: {first}") from item
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout_s: float = 10.0) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        else:
            self._source.close()


AUGMENT = 2  # keeps the augmentation's seeds apart from the order's and validation's


class MixedStream:
    """Iterator of model batches (numpy dicts with ``kind``), their sources mixed by the spec's ratios.

    In a Train worker ``rank`` and ``world`` come from Ray Train; elsewhere (preview, tests) pass them.
    A rank's batches hold ``spec.rows_per_rank(world)`` rows: its share of the global batch."""

    def __init__(self, spec: StreamSpec, rank: int | None = None, world: int | None = None):
        self.spec = spec
        if rank is None or world is None:
            import ray.train

            context = ray.train.get_context()
            rank, world = context.get_world_rank(), context.get_world_size()
        self.rank, self.world = rank, world
        self.batch_rows = spec.rows_per_rank(world)
        self._sampler = spec.mixing.policy(spec.ratios, spec.layout.seed)
        self._source_readers = {name: SourceReader(spec, name, rank, world) for name in spec.sources}
        self._readers: dict[str, ReadAhead | None] = dict.fromkeys(spec.sources)
        self._position = {name: (0, 0) for name in spec.sources}  # (epoch, next global batch) handed out
        self._samples: Counter = Counter()
        self._batches: Counter = Counter()
        self._key_hashes: list[np.ndarray] = []  # of the batches handed out since take_key_hashes
        self.restarted: list[str] = []  # sources whose changed data restarted their epoch on resume
        self._wait_s = 0.0
        self._augment_s = 0.0

    def __iter__(self) -> MixedStream:
        return self

    def __next__(self) -> dict:
        return self.next_of(self.next_source())

    def next_source(self) -> str:
        """The next step's source; with gradient accumulation, draw it once and ``next_of`` it k times."""
        return next(self._sampler)

    def observe(self, source: str, loss: float) -> None:
        """The step's loss of ``source`` on one scale, alike on every rank: online mixing learns from it."""
        self._sampler.observe(source, loss)

    @property
    def mixing(self):
        """The mixing policy: its current weights (``current()``) and, online, their time average."""
        return self._sampler

    def next_of(self, name: str) -> dict:
        start = time.perf_counter()
        epoch, batch_index, rows = self._reader(name).get()
        waited = time.perf_counter()
        expected = self._position[name]
        if (epoch, batch_index) != expected and (epoch, batch_index) != (expected[0] + 1, 0):
            raise RuntimeError(f"{name}: read batch {batch_index} of epoch {epoch}, expected {expected}")
        if epoch != expected[0]:
            log.info("source %s: starting epoch %d", name, epoch)
        batch = self._augment(name, epoch, batch_index, rows)
        self._augment_s += time.perf_counter() - waited
        self._wait_s += waited - start
        self._position[name] = (epoch, batch_index + 1)
        self._key_hashes.append(rows["key_hash"])
        replaced = skipped(rows)
        if replaced and self.spec.skip_counter is not None:  # rows trained, counted once over all ranks
            self.spec.skip_counter.add.remote({f"{name}/{reason}": n for reason, n in replaced.items()})
        self._batches[name] += 1
        self._samples[name] += self.batch_rows
        return batch

    def _augment(self, name: str, epoch: int, batch_index: int, rows: dict) -> dict:
        """Each partition's share of the batch augmented with its own seed (the batch's place in the order
        and the partition), so that the augmentation does not depend on how the partitions are spread."""
        source = self.spec.layout.sources[name]
        order = self._source_readers[name].order(epoch)
        g = order.rows_per_partition_batch
        parts = []
        for i, partition in enumerate(order.partitions_of(self.rank, self.world)):
            share = {k: v[i * g : (i + 1) * g] for k, v in rows.items() if k not in BOOKKEEPING}
            rng = batch_rng(self.spec.layout.seed, AUGMENT, source.seed_index, epoch, batch_index, partition)
            parts.append(augment_batch(source.kind, share, self.spec.params, rng))
        return {k: source.kind if k == "kind" else np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _reader(self, name: str) -> ReadAhead:
        reader = self._readers[name]
        if reader is None:
            source = self.spec.layout.sources[name]
            reader = self._readers[name] = ReadAhead(
                self._source_readers[name].epochs(*self._position[name]),
                self.spec.read_ahead,
                self.spec.stall_timeout_s,
                f"the {name} dataset {source.uri}",
            )
        return reader

    def take_key_hashes(self) -> np.ndarray:
        """The key hashes (``reader.key_hash``) of the rows this rank was handed since the last call."""
        hashes, self._key_hashes = self._key_hashes, []
        return np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.int64)

    def take_keys_digest(self) -> int:
        """The fingerprint of the rows this rank trained on since the last take (``reader.keys_digest``):
        summed over the ranks (mod 2**52), that of the global batches."""
        return keys_digest(self.take_key_hashes())

    def close(self) -> None:
        """Stops the read-ahead threads (and the epochs they started); the stream ends here."""
        for reader in self._readers.values():
            if reader is not None:
                reader.close()

    def state_dict(self) -> dict:
        """The source sequence, and per source the data position and the identity of the data it is in."""
        return {
            "sampler": self._sampler.state_dict(),
            "position": {name: list(position) for name, position in self._position.items()},
            "identity": {name: source.identity for name, source in self.spec.layout.sources.items()},
            "samples": dict(self._samples),
            "batches": dict(self._batches),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues the saved source sequence and every source's epoch exactly where it was. A source whose
        data changed since (shards or checksums differ) is an error, or under ``data.on_changed_data=
        restart_epoch`` starts its epoch afresh over the new data; ``restarted`` lists those sources."""
        if any(reader is not None for reader in self._readers.values()):
            raise RuntimeError("load_state_dict must come before the first batch is drawn")
        self._sampler.load_state_dict(state["sampler"])
        for name in self.spec.sources:
            epoch, batch = state["position"].get(name, (0, 0))
            saved = state["identity"].get(name)
            source = self.spec.layout.sources[name]
            if saved is not None and saved != source.identity:
                if self.spec.on_changed_data != "restart_epoch":
                    raise ChangedDataError(
                        f"the {name} dataset {source.uri} changed since the checkpoint (its shards or their "
                        "checksums differ): resuming would not continue the same order. Restore the data, or "
                        "set data.on_changed_data=restart_epoch to start this source's epoch afresh"
                    )
                log.warning(
                    "source %s: %s changed since the checkpoint; epoch %d starts afresh",
                    name,
                    source.uri,
                    epoch,
                )
                self.restarted.append(name)
                batch = 0
            self._position[name] = (epoch, batch)
        self._samples = Counter(state["samples"])
        self._batches = Counter(state["batches"])

    def counters(self) -> dict[str, float]:
        """Per-rank consumption and wait time; ``skipped_rows/...`` are pipeline-wide (log from rank 0)."""
        out: dict[str, float] = {
            "steps": self._sampler.steps,
            "data_wait_s": self._wait_s,
            "augment_s": self._augment_s,
        }
        for name in self.spec.sources:
            out[f"samples/{name}"] = self._samples[name]
            out[f"batches/{name}"] = self._batches[name]
            out[f"epoch/{name}"] = self._position[name][0]
        for name, n in self.spec.corrupt_shards.items():
            out[f"skipped_shards/{name}"] = n
        for key, n in skipped_rows(self.spec).items():
            out[f"skipped_rows/{key}"] = n
        return out


class ChangedDataError(RuntimeError):
    """A resume into a dataset whose shards differ from the checkpoint's."""


def skipped_rows(spec: StreamSpec, timeout_s: float = 10.0) -> dict[str, int]:
    """Rows replaced in the batches trained so far, by "source/reason"; empty if unreachable (warned)."""
    if spec.skip_counter is None:
        return {}
    import ray

    try:
        return ray.get(spec.skip_counter.get.remote(), timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        log.warning("skipped-row counts unavailable: %s", e)
        return {}


def to_torch(batch: dict, device="cpu") -> dict:
    """The numpy batch as torch tensors on ``device`` (``kind`` stays a str); zero-copy on CPU."""
    import torch

    return {
        k: v
        if isinstance(v, str)
        else torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True)
        for k, v in batch.items()
    }
