"""The per-kind reader thread of the mixed stream, without Ray: order, errors, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.data.stream import DataStallError, ReadAhead


def counting(n: int, fail_at: int | None = None, closed: threading.Event | None = None):
    try:
        for i in range(n):
            if i == fail_at:
                raise OSError(f"item {i} unreadable")
            yield i
    finally:
        if closed is not None:
            closed.set()


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_items_arrive_in_order_whatever_the_depth(depth):
    reader = ReadAhead(counting(20), depth)
    assert [reader.get() for _ in range(20)] == list(range(20))
    reader.close()


def test_a_source_error_is_raised_where_the_item_is_taken():
    reader = ReadAhead(counting(10, fail_at=3), depth=4)
    assert [reader.get() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="item 3 unreadable"):
        reader.get()


def test_it_reads_ahead_only_depth_items_and_close_ends_the_source():
    """Event-driven: the source says when each item is asked for; no sleeping on a loaded machine."""
    closed = threading.Event()
    asked = [threading.Event() for _ in range(6)]

    def source():
        try:
            for i in range(1000):
                if i < len(asked):
                    asked[i].set()
                yield i
        finally:
            closed.set()

    reader = ReadAhead(source(), depth=3)
    assert asked[3].wait(5)  # items 0-2 queued, item 3 held by the thread until there is room
    assert not asked[4].wait(0.3)  # bounded: nothing more is read while the consumer takes nothing
    assert reader.get() == 0
    assert asked[4].wait(5)  # one taken, one more read
    reader.close()
    assert closed.wait(5) and not reader._thread.is_alive()


def test_a_source_that_stops_answering_is_an_error_naming_it_after_the_stall_timeout():
    answer = threading.Event()

    def hanging():
        yield 0
        answer.wait()  # storage that went away: Ray Data's own retries keep the read blocked for minutes
        yield 1

    reader = ReadAhead(hanging(), depth=2, stall_timeout_s=0.5, source_name="the image dataset s3://b/img")
    assert reader.get() == 0
    started = time.monotonic()
    with pytest.raises(DataStallError, match=r"s3://b/img within 0.5 s \(data.stall_timeout_s\)"):
        reader.get()
    assert 0.5 <= time.monotonic() - started < 3
    answer.set()
    reader.close()


def test_a_slow_source_within_the_stall_timeout_is_waited_for():
    def slow():
        for i in range(3):
            time.sleep(0.3)
            yield i

    reader = ReadAhead(slow(), depth=1, stall_timeout_s=2)
    assert [reader.get() for _ in range(3)] == [0, 1, 2]
    reader.close()
