"""The reader in Ray Data (``pipeline.data.reader``): exactly the rows ``pipeline.data.order`` names, the
same global batches at every world size, a resume that reads on from the data position."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageConfig, load_config
from pipeline.data import reader
from pipeline.data.datasets import build_train_data
from pipeline.data.reader import SourceReader, key_hash, stand_ins
from pipeline.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def spec(ray_cluster, tokenizer, tmp_path_factory):
    """image_text: 96 clean rows in 4 shards; 2 workers of batch 8: global batches of 16 from 2 partitions,
    6 an epoch, shuffled within windows of 16 rows."""
    uri = str(tmp_path_factory.mktemp("reader") / "image_text")
    write_synthetic_dataset(uri, "image_text", 96, 4, 64, StorageConfig())
    config = load_config(
        None,
        [f"data.train={{image_text: {uri}}}", "data.ratios={image_text: 1}", "data.batch_size=8"]
        + ["data.shuffle_window=16", "data.val={}"],
    )
    return build_train_data(config, tokenizer).spec


def batches(
    spec, rank: int, world: int, epoch: int, first: int, count: int
) -> list[tuple[int, int, np.ndarray]]:
    reader = SourceReader(spec, "image_text", rank, world).epochs(epoch, first)
    try:
        return [(e, b, rows["key_hash"]) for (e, b, rows), _ in zip(reader, range(count), strict=False)]
    finally:
        reader.close()


def test_the_reader_reads_exactly_the_rows_the_order_names(spec):
    source = spec.layout.sources["image_text"]
    keys = [
        pq.read_table(f"{source.uri}/{name}", columns=["key"]).column("key").to_pylist()
        for name in source.files
    ]
    order = SourceReader(spec, "image_text", 0, 1).order(0)
    for e, b, hashes in batches(spec, 0, 1, 0, 0, 6):
        shards, rows = order.rows_of_batch(b)
        assert (
            e == 0
            and hashes.tolist() == key_hash([keys[s][r] for s, r in zip(shards, rows, strict=True)]).tolist()
        )


def test_a_global_batch_is_the_same_rows_with_one_and_two_workers(spec):
    whole = batches(spec, 0, 1, 0, 0, 8)  # crosses into the second epoch
    halves = [batches(spec, rank, 2, 0, 0, 8) for rank in (0, 1)]
    assert [(e, b) for e, b, _ in whole] == [(0, b) for b in range(6)] + [(1, 0), (1, 1)]
    for i, (_, _, keys) in enumerate(whole):
        assert keys.tolist() == halves[0][i][2].tolist() + halves[1][i][2].tolist()
        assert len(set(halves[0][i][2]) & set(halves[1][i][2])) == 0  # disjoint shares


def test_tasks_that_split_a_ranks_partitions_give_the_same_batches(spec, monkeypatch):
    whole = batches(spec, 0, 1, 0, 1, 4)  # one task per 128 rows: both partitions in a task
    monkeypatch.setattr(reader, "ROWS_PER_TASK", 8)  # one task per batch slice of one partition
    monkeypatch.setattr(reader, "STAND_IN_ROWS", 8)  # (clean rows: where stand-ins come from is moot)
    assert len(reader.tasks_for(reader.SourceReader(spec, "image_text", 0, 1).order(0), range(2), 1, 8)) == 10
    split = batches(spec, 0, 1, 0, 1, 4)
    assert [(e, b, k.tolist()) for e, b, k in split] == [(e, b, k.tolist()) for e, b, k in whole]


def test_a_resume_reads_on_from_the_data_position(spec):
    straight = batches(spec, 0, 2, 0, 0, 9)
    resumed = batches(spec, 0, 2, 0, 4, 5)  # batch 4 of epoch 0 on: the rest of the epoch, then the next
    assert [(e, b, k.tolist()) for e, b, k in resumed] == [(e, b, k.tolist()) for e, b, k in straight[4:]]


def test_an_unusable_row_is_replaced_by_the_next_usable_row_of_its_piece():
    unusable = np.array([False, True, False, True, True, False, True, False])
    assert stand_ins(unusable, size=8, piece=4).tolist() == [0, 2, 2, 0, 5, 5, 7, 7]
    # two partitions of 5 rows, pieces of 3: the last piece of each partition is shorter
    unusable = np.array([False, True, True, False, True] + [True, False, False, True, False])
    assert stand_ins(unusable, size=5, piece=3).tolist() == [0, 0, 0, 3, 3, 6, 6, 7, 9, 9]
    with pytest.raises(ValueError, match="all 4 rows of a piece are unusable"):
        stand_ins(np.array([False] * 4 + [True] * 4), size=8, piece=4)
