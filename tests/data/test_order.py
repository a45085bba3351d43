"""The row order of an epoch (``pipeline.data.order``): a pure function of seed, kind, epoch and shards,
the same global batches at every world size, real shuffling, every row at most once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.order import EpochOrder, partitions_for

SHARDS = (50, 13, 64, 7, 40)  # 174 rows


def order(epoch: int = 0, seed: int = 3, partitions: int = 4, window: int = 16, global_rows: int = 8):
    return EpochOrder(SHARDS, global_rows, partitions, window, seed, seed_index=1, epoch=epoch)


def keys(rows: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, int]]:
    return list(zip(rows[0].tolist(), rows[1].tolist(), strict=True))


def test_partitions_are_the_lcm_of_the_world_sizes():
    assert partitions_for(2, 2) == 2 and partitions_for(1, 2) == 2
    assert partitions_for(2, 4) == 12 and partitions_for(4, 8) == 840


def test_every_row_at_most_once_and_all_but_the_tail():
    o = order()
    seen = [k for b in range(o.batches) for k in keys(o.rows_of_batch(b))]
    assert len(seen) == len(set(seen)) == o.batches * 8
    assert o.batches == sum(SHARDS) // 4 // 2  # 174 rows, 4 partitions of whole 2-row shares
    assert all(0 <= row < SHARDS[shard] for shard, row in seen)


def test_a_global_batch_is_the_same_rows_at_every_world_size():
    o = order()
    for b in (0, 5, o.batches - 1):
        whole = keys(o.rows_of_batch(b))
        for world in (1, 2, 4):
            slices = [keys(o.rows_of_batch(b, o.partitions_of(r, world))) for r in range(world)]
            assert sum(slices, []) == whole  # rank slices, in rank order, are the global batch
    with pytest.raises(ValueError, match="3 ranks cannot split 4 partitions"):
        o.partitions_of(0, 3)


def test_order_is_a_pure_function_and_reshuffles_every_epoch():
    first = [keys(order().rows_of_batch(b)) for b in range(order().batches)]
    assert first == [keys(order().rows_of_batch(b)) for b in range(order().batches)]
    second = [keys(order(epoch=1).rows_of_batch(b)) for b in range(order(epoch=1).batches)]
    assert first != second
    other_seed = [keys(order(seed=4).rows_of_batch(b)) for b in range(order(seed=4).batches)]
    assert first != other_seed


def test_shuffling_is_real_within_windows_and_across_shards():
    o = order()
    flat = [k for b in range(o.batches) for k in keys(o.rows_of_batch(b, range(0, 1)))]  # partition 0
    rows_in_order = sorted(flat, key=lambda k: (list(o.shard_order).index(k[0]), k[1]))
    assert flat != rows_in_order  # not read in file order
    assert len({s for s, _ in keys(o.rows_of_batch(0))}) > 1  # a batch mixes shards (its partitions')
    # the shard order itself changes with the epoch
    assert any(not np.array_equal(order(epoch=e).shard_order, o.shard_order) for e in range(1, 4))


def test_batches_count_on_through_epochs():
    from pipeline.data.order import DataOrder, SourceShards

    source = SourceShards(
        "text", "text", 2, "/d", ("a", "b"), (20, 13), "id"
    )  # 33 rows: 4 batches of 8 an epoch
    layout = DataOrder({"text": source}, global_rows=8, partitions=1, shuffle_window=8, seed=0)
    assert layout.order("text", 0).batches == 4
    assert layout.batches("text", 0, 0, 6) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert layout.batches("text", 0, 9, 2) == [(2, 1), (2, 2)]
