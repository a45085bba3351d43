"""Which rows form global batch ``b`` of epoch ``e`` of a source: a pure function of the seed, the source, the
epoch, the batch index and the manifest's shards (pure numpy, no Ray, no torch).

The rows of an epoch are laid out as MosaicML Streaming lays out its "canonical nodes", so that the order
never depends on the number of workers and every worker reads only its own rows:

1. the epoch's shard order is a permutation seeded by ``(seed, source, epoch)``; their rows, concatenated in
   that order, are cut into ``partitions`` equal contiguous regions (the tail that does not fill a whole
   batch of every partition is left out of this epoch; the next epoch's shard order brings it in);
2. each region is shuffled within windows of ``window`` consecutive rows, each window with its own seed
   ``(seed, source, epoch, partition, window)``;
3. global batch ``b`` is the concatenation, in partition order, of rows ``[b*g, (b+1)*g)`` of every
   partition's shuffled region, ``g = global_rows / partitions``.

A rank of ``world`` takes the partitions ``[r*P/W, (r+1)*P/W)``: its micro-batch is a fixed slice of the
global batch, and at any world size that divides ``partitions`` the global batch is the same set of rows
in the same order. ``partitions`` is the least common multiple of the world sizes a run may have
(``train.min_workers..train.num_workers``), so a fixed-size run has one partition per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# seeds are tuples of non-negative ints; this tag keeps them apart from the augmentation's
_ORDER = 1


def partitions_for(fewest: int, most: int) -> int:
    """The least common multiple of every world size in ``fewest..most``."""
    return math.lcm(*range(fewest, most + 1))


@dataclass(frozen=True)
class EpochOrder:
    """The row order of one epoch of one source. ``shard_rows``: rows of each shard in manifest order."""

    shard_rows: tuple[int, ...]
    global_rows: int  # rows of a global (micro-)batch
    partitions: int
    shuffle_window: int  # rows of a partition shuffled together, rounded up to whole batches (``window``)
    seed: int
    seed_index: int
    epoch: int

    def __post_init__(self) -> None:
        if self.global_rows % self.partitions:
            raise ValueError(
                f"{self.partitions} partitions cannot split a global batch of {self.global_rows}"
            )

    @property
    def window(self) -> int:
        """Rows of a partition shuffled together: ``shuffle_window`` rounded up to whole batches, so that
        no batch straddles two windows."""
        g = self.rows_per_partition_batch
        return -(-self.shuffle_window // g) * g

    @property
    def rows_per_partition_batch(self) -> int:
        return self.global_rows // self.partitions

    @cached_property
    def shard_order(self) -> np.ndarray:
        rng = np.random.default_rng((_ORDER, self.seed, self.seed_index, self.epoch))
        return rng.permutation(len(self.shard_rows))

    @cached_property
    def _starts(self) -> np.ndarray:
        """Offset of each shard (in this epoch's order) in the concatenated rows."""
        rows = np.asarray(self.shard_rows, dtype=np.int64)[self.shard_order]
        return np.concatenate([[0], np.cumsum(rows)])

    @property
    def batches(self) -> int:
        """Global batches in this epoch."""
        return int(self._starts[-1]) // self.partitions // self.rows_per_partition_batch

    @property
    def region_rows(self) -> int:
        return self.batches * self.rows_per_partition_batch

    def _window_permutation(self, partition: int, window: int) -> np.ndarray:
        size = min(self.window, self.region_rows - window * self.window)
        rng = np.random.default_rng((_ORDER, self.seed, self.seed_index, self.epoch, partition, window))
        return rng.permutation(size)

    def positions(self, partition: int, first: int, stop: int) -> np.ndarray:
        """Positions in the concatenated rows of partition ``partition``'s shuffled rows ``first..stop-1``."""
        base = partition * self.region_rows
        out = np.empty(stop - first, dtype=np.int64)
        i = first
        while i < stop:
            window = i // self.window
            offset = window * self.window
            perm = self._window_permutation(partition, window)
            end = min(stop, offset + len(perm))
            out[i - first : end - first] = base + offset + perm[i - offset : end - offset]
            i = end
        return out

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index in manifest order, row in that shard) of each position."""
        slot = np.searchsorted(self._starts, positions, side="right") - 1
        return self.shard_order[slot], positions - self._starts[slot]

    def partitions_of(self, rank: int, world: int) -> range:
        if self.partitions % world:
            raise ValueError(f"{world} ranks cannot split {self.partitions} partitions")
        per_rank = self.partitions // world
        return range(rank * per_rank, (rank + 1) * per_rank)

    def rows_of_batch(self, batch: int, partitions: range | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of the rows of global batch ``batch`` (of ``partitions`` only: a rank's slice)."""
        g = self.rows_per_partition_batch
        parts = range(self.partitions) if partitions is None else partitions
        positions = np.concatenate([self.positions(p, batch * g, (batch + 1) * g) for p in parts])
        return self.locate(positions)


@dataclass(frozen=True)
class SourceShards:
    """One source's train dataset as the order needs it (its shards verified on the driver)."""

    name: str
    kind: str
    seed_index: int  # pipeline.data.mixing.seed_index of the name
    uri: str
    files: tuple[str, ...]  # the usable shards, in manifest order
    rows: tuple[int, ...]
    identity: str  # fingerprint of exactly these shards: a resume into other data is refused


@dataclass(frozen=True)
class DataOrder:
    """The order of every source's rows in a run: the sources by name, the settings ``EpochOrder`` takes."""

    sources: dict[str, SourceShards] = field(hash=False)
    global_rows: int  # data.batch_size x train.num_workers
    partitions: int  # partitions_for(train.min_workers..train.num_workers)
    shuffle_window: int
    seed: int

    def order(self, source_name: str, epoch: int) -> EpochOrder:
        source = self.sources[source_name]
        return EpochOrder(
            source.rows,
            self.global_rows,
            self.partitions,
            self.shuffle_window,
            self.seed,
            source.seed_index,
            epoch,
        )

    def batches(self, source_name: str, epoch: int, first: int, count: int) -> list[tuple[int, int]]:
        """(epoch, batch) of ``count`` global batches from batch ``first`` of ``epoch`` on (``first`` may
        count past the epoch's end), into the next epochs as they end."""
        out = []
        while len(out) < count:
            total = self.order(source_name, epoch).batches
            if total == 0:
                raise ValueError(
                    f"the {source_name} data holds no full global batch of {self.global_rows} rows"
                )
            if first >= total:  # ``first`` counts on through the epochs
                epoch, first = epoch + 1, first - total
                continue
            out += [(epoch, b) for b in range(first, min(total, first + count - len(out)))]
            epoch, first = epoch + 1, 0
        return out
