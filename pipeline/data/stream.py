"""Inside a Train worker: one stream of batches whose kind follows the ratios, identical on every rank.

Why every rank agrees without talking to the others:
- the kind of each step comes from a ``KindSampler`` seeded with ``data.seed`` on every rank;
- every kind is split by ``streaming_split(equal=True)`` (the default ``DataConfig``), so every rank gets
  the same number of rows of a kind per epoch, and batches are cut with ``drop_last``: all ranks run
  out of a kind at the same step and start its next epoch together (``start_epoch`` is itself a barrier);
- ``get_dataset_shard`` (a barrier) is called for the kinds in the same fixed order on every rank.

Each kind is read ahead by a thread (``ReadAhead``) that starts the kind's next epoch as soon as it has
pulled the last batch of the current one, so that an epoch restart (a new Ray Data execution behind the
split's barrier) overlaps the training of the batches still queued instead of stalling a step.
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
from pipeline.data.mixing import KindSampler
from pipeline.data.transforms import augment_batch, batch_rng

log = logging.getLogger(__name__)


class DataStallError(RuntimeError):
    """No batch within ``data.stall_timeout_s``: the worker fails (and Ray Train restarts it within
    ``train.max_failures``) instead of waiting on storage that does not answer."""


class ReadAhead:
    """Items of ``source`` (a kind's ``(epoch, rows)``), pulled by a daemon thread up to ``depth`` ahead,
    so that the kind's next epoch starts while queued batches still train; a source error is raised where
    the item is taken. ``depth`` 0 pulls in the caller's thread (no read-ahead, no stall timeout).

    Ray Data retries a read that fails with a network error for minutes (10 attempts with backoff, at
    every level of the read), so storage that went away would otherwise hang the step: a wait of more than
    ``stall_timeout_s`` (0: no limit) raises ``DataStallError`` naming ``source_name``.
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
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout_s: float = 10.0) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        else:
            self._source.close()


class MixedStream:
    """Iterator of model batches (numpy dicts with ``kind``), mixed by the spec's ratios.

    ``shards`` defaults to ``ray.train.get_dataset_shard`` of every kind; pass ``DataIterator``s (e.g.
    ``dataset.iterator()``) to run the same stream outside Train (preview, tests). A rank's batches hold
    ``spec.rows_per_rank(world_size)`` rows: the global batch split over the ranks there are.
    """

    def __init__(
        self, spec: StreamSpec, shards: dict | None = None, rank: int | None = None, world_size: int = 0
    ):
        self.spec = spec
        if shards is None:
            import ray.train

            shards = {kind: ray.train.get_dataset_shard(spec.dataset_names[kind]) for kind in spec.kinds}
            context = ray.train.get_context()
            rank = context.get_world_rank() if rank is None else rank
            world_size = world_size or context.get_world_size()
        missing = [k for k in spec.kinds if k not in shards]
        if missing:
            raise ValueError(f"no dataset shard for kind(s) {missing}")
        self.rank = rank or 0
        self.batch_rows = spec.rows_per_rank(world_size or spec.full_world)
        self._shards = shards
        self._sampler = KindSampler(spec.ratios, spec.seed)
        self._readers: dict[str, ReadAhead | None] = dict.fromkeys(spec.kinds)
        self._epoch = dict.fromkeys(spec.kinds, 0)
        self._batches_in_epoch = dict.fromkeys(spec.kinds, 0)
        self._samples: Counter = Counter()
        self._batches: Counter = Counter()
        self._wait_s = 0.0
        self._augment_s = 0.0

    def __iter__(self) -> MixedStream:
        return self

    def __next__(self) -> dict:
        return self.next_of(self.next_kind())

    def next_kind(self) -> str:
        """The kind of the next step; with gradient accumulation, draw it once and ``next_of`` it k times."""
        return next(self._sampler)

    def next_of(self, kind: str) -> dict:
        start = time.perf_counter()
        rows = self._next_rows(kind)
        waited = time.perf_counter()
        rng = batch_rng(
            self.spec.seed,
            self.rank,
            self.spec.kinds.index(kind),
            self._epoch[kind],
            self._batches_in_epoch[kind],
        )
        batch = augment_batch(kind, rows, self.spec.params, rng)
        self._augment_s += time.perf_counter() - waited
        self._wait_s += waited - start
        self._batches_in_epoch[kind] += 1
        self._batches[kind] += 1
        self._samples[kind] += len(batch["attention_mask" if kind == "text" else "pixel_values"])
        return batch

    def _open_epoch(self, kind: str, epoch: int):
        seed = int(
            np.random.default_rng([self.spec.seed, self.rank, self.spec.kinds.index(kind), epoch]).integers(
                2**31
            )
        )
        return self._shards[kind].iter_batches(
            batch_size=self.batch_rows,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=self.spec.shuffle_buffer or None,
            local_shuffle_seed=seed if self.spec.shuffle_buffer else None,
            prefetch_batches=self.spec.prefetch_batches,
        )

    def _epochs(self, kind: str, epoch: int) -> Iterator[tuple[int, dict | None]]:
        """``(epoch, rows)`` of every batch, epoch after epoch; ``None`` rows for an epoch with no batch."""
        while True:
            empty = True
            for rows in self._open_epoch(kind, epoch):
                empty = False
                yield epoch, rows
            if empty:
                yield epoch, None
                return
            epoch += 1

    def _next_rows(self, kind: str) -> dict:
        reader = self._readers[kind]
        if reader is None:
            reader = self._readers[kind] = ReadAhead(
                self._epochs(kind, self._epoch[kind]),
                self.spec.read_ahead,
                self.spec.stall_timeout_s,
                f"the {kind} dataset {self.spec.sources.get(kind, '')}".rstrip(),
            )
        epoch, rows = reader.get()
        # every rank runs out at this same step (equal splits, drop_last), so all restart together
        if epoch != self._epoch[kind]:
            self._epoch[kind], self._batches_in_epoch[kind] = epoch, 0
            log.info("kind %s: starting epoch %d", kind, epoch)
        if rows is None:
            raise RuntimeError(
                f"the {kind} train dataset yields no full batch of {self.batch_rows} per rank in an "
                "epoch (too few rows for batch_size x workers, or every row was skipped: see counters())"
            )
        return rows

    def close(self) -> None:
        """Stops the read-ahead threads (and the epochs they started); the stream ends here."""
        for reader in self._readers.values():
            if reader is not None:
                reader.close()

    def state_dict(self) -> dict:
        """Kind sequence state and per-kind progress (the position inside an epoch is not restored)."""
        return {
            "sampler": self._sampler.state_dict(),
            "epoch": dict(self._epoch),
            "started": [k for k, reader in self._readers.items() if reader is not None],
            "samples": dict(self._samples),
            "batches": dict(self._batches),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues the saved kind sequence; each kind starts its next epoch with a fresh pass."""
        if any(reader is not None for reader in self._readers.values()):
            raise RuntimeError("load_state_dict must come before the first batch is drawn")
        self._sampler.load_state_dict(state["sampler"])
        # a kind not drawn yet has not begun its epoch 0: it must not skip to epoch 1 (exact resume)
        started = set(state.get("started", state["epoch"]))
        for kind in self.spec.kinds:
            saved = state["epoch"].get(kind)
            self._epoch[kind] = 0 if saved is None else saved + (kind in started)
        self._samples = Counter(state["samples"])
        self._batches = Counter(state["batches"])

    def counters(self) -> dict[str, float]:
        """Per-rank consumption and wait time; ``skipped_rows/...`` are pipeline-wide (log from rank 0)."""
        out: dict[str, float] = {
            "steps": self._sampler.steps,
            "data_wait_s": self._wait_s,
            "augment_s": self._augment_s,
        }
        for kind in self.spec.kinds:
            out[f"samples/{kind}"] = self._samples[kind]
            out[f"batches/{kind}"] = self._batches[kind]
            out[f"epoch/{kind}"] = self._epoch[kind]
        for kind, n in self.spec.corrupt_shards.items():
            out[f"skipped_shards/{kind}"] = n
        for key, n in skipped_rows(self.spec).items():
            out[f"skipped_rows/{key}"] = n
        return out


def skipped_rows(spec: StreamSpec, timeout_s: float = 10.0) -> dict[str, int]:
    """Rows the prepare tasks dropped so far, by "kind/reason"; empty (with a warning) if unreachable."""
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
