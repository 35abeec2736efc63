"""PartFetcher and ObjectReader over a MemoryStore (behind a FaultyStore) and a real PartCache."""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ossfs_resume
from ossfs_resume.cache import PartCache, PartId, object_id
from ossfs_resume.client import ObjectMeta
from ossfs_resume.engine import ObjectRef, PartFetcher
from ossfs_resume.errors import (
    CacheWriteError,
    ChecksumError,
    PreconditionFailedError,
    StoreUnavailableError,
)
from ossfs_resume.objectstore import FaultyStore, MemoryStore
from ossfs_resume.prefetch import prefetch_object
from ossfs_resume.reader import ObjectReader

PART = 1000
ETAG = "etag-v1"
KEY = "dir/object.bin"


# Fails a test that hangs (a deadlock) instead of stalling the run: see conftest.py.
pytestmark = pytest.mark.usefixtures("watchdog")


def _payload(size: int) -> bytes:
    return bytes((i * 13 + (i >> 8) * 5) % 256 for i in range(size))


@dataclass(frozen=True)
class Call:
    key: str
    start: int
    end: int
    if_match: str | None


def _store(data: bytes) -> FaultyStore[MemoryStore]:
    """The object in a MemoryStore, behind a FaultyStore to fail or hold its GETs."""
    memory = MemoryStore("bkt", endpoint="http://fake")
    memory.put(KEY, data, etag=ETAG, mtime=1_700_000_000.0)
    return FaultyStore(memory)


def _gets(store: FaultyStore[MemoryStore]) -> list[Call]:
    """The GETs the engine made, in order."""
    return [Call(c.key, c.start or 0, c.end or 0, c.if_match) for c in store.calls_to("get_range")]


def _parts_fetched(store: FaultyStore[MemoryStore]) -> list[int]:
    return sorted(start // PART for start, _ in store.ranges())


def _ref(size: int, etag: str = ETAG) -> ObjectRef:
    meta = ObjectMeta(KEY, size, etag, 1_700_000_000.0)
    return ObjectRef(meta, object_id("s3+http://fake", "bkt", KEY, etag), PART)


@pytest.fixture
def make_fetcher(cache: PartCache) -> Iterator[Callable[..., PartFetcher]]:
    fetchers: list[PartFetcher] = []

    def make(client: FaultyStore[MemoryStore], **kwargs: Any) -> PartFetcher:
        fetcher = PartFetcher(client, cache, **kwargs)  # type: ignore[arg-type]
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        fetcher.shutdown()


def _wait_idle(fetcher: PartFetcher, timeout: float = 5.0) -> None:
    """Wait until no fetch or cache write is in flight (read-ahead included)."""
    assert fetcher.wait_idle(timeout), "fetches still in flight"
    with fetcher._lock:
        assert not fetcher._inflight and fetcher._inflight_bytes == 0


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


_ENGINE = os.path.dirname(ossfs_resume.__file__) + os.sep


def _blocked_in_engine(thread: threading.Thread) -> bool:
    """True if `thread` is parked in a wait (an event, a future, a join) inside ossfs_resume.

    Observes where a thread is instead of sleeping in the hope it got there.
    """
    frame = sys._current_frames().get(thread.ident or -1)
    waits = ("wait", "_wait_for_tstate_lock")
    if frame is None or frame.f_code.co_filename != threading.__file__:
        return False
    if frame.f_code.co_name not in waits:
        return False
    while frame is not None:
        if frame.f_code.co_filename.startswith(_ENGINE):
            return True
        frame = frame.f_back
    return False


# -- PartFetcher -------------------------------------------------------------


def test_concurrent_readers_of_one_part_share_one_fetch(
    make_fetcher: Callable[..., PartFetcher],
) -> None:
    data = _payload(5 * PART)
    client = _store(data)
    gate = client.hold("get_range")
    fetcher = make_fetcher(client)
    ref = _ref(len(data))
    barrier = threading.Barrier(8)
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fetcher.read(ref, 2, i * 10, 100)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    # All eight wait in the engine while one GET is held: seven on the fetch they share.
    _wait_for(lambda: all(_blocked_in_engine(t) for t in threads))
    assert gate.held == 1
    gate.release()
    for t in threads:
        t.join(10)
    assert not errors
    assert client.count("get_range") == 1
    assert _gets(client)[0] == Call(KEY, 2 * PART, 3 * PART - 1, ETAG)
    for i in range(8):
        assert results[i] == data[2 * PART + i * 10 : 2 * PART + i * 10 + 100]
    _wait_idle(fetcher)


def test_fetched_part_is_cached(make_fetcher: Callable[..., PartFetcher], cache: PartCache) -> None:
    data = _payload(3 * PART)
    client = _store(data)
    fetcher = make_fetcher(client)
    ref = _ref(len(data))
    assert fetcher.read(ref, 1, 0, PART) == data[PART : 2 * PART]
    _wait_idle(fetcher)
    assert cache.has(ref.part_id(1))
    # Served from the cache: no second request.
    assert fetcher.read(ref, 1, 10, 20) == data[PART + 10 : PART + 30]
    assert client.count("get_range") == 1


def test_short_last_part(make_fetcher: Callable[..., PartFetcher]) -> None:
    data = _payload(2 * PART + 123)
    client = _store(data)
    fetcher = make_fetcher(client)
    ref = _ref(len(data))
    assert fetcher.read(ref, 2, 0, PART) == data[2 * PART :]
    assert _gets(client) == [Call(KEY, 2 * PART, 2 * PART + 122, ETAG)]


def test_precondition_failed_propagates_and_caches_nothing(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache
) -> None:
    data = _payload(3 * PART)
    client = _store(data)
    client.fail("get_range", PreconditionFailedError("changed", status=412, key=KEY))
    fetcher = make_fetcher(client)
    ref = _ref(len(data))
    with pytest.raises(PreconditionFailedError):
        fetcher.read(ref, 0, 0, 10)
    assert not cache.has(ref.part_id(0))
    _wait_idle(fetcher)
    # Not stuck in flight: the next read tries again.
    client.clear()
    assert fetcher.read(ref, 0, 0, 10) == data[:10]
    assert client.count("get_range") == 2


def test_prefetch_respects_byte_budget(make_fetcher: Callable[..., PartFetcher]) -> None:
    data = _payload(20 * PART)
    client = _store(data)
    gate = client.hold("get_range")
    fetcher = make_fetcher(client, max_parallel=8, max_inflight_bytes=3 * PART)
    ref = _ref(len(data))
    try:
        assert fetcher.prefetch(ref, range(0, 10)) == 3
        assert gate.wait_held(3)
        assert client.active("get_range") == 3
        # Budget used up: nothing more is scheduled, even for other parts.
        assert fetcher.prefetch(ref, range(3, 10)) == 0
        # Parts already in flight are not scheduled twice.
        assert fetcher.prefetch(ref, range(0, 3)) == 0
    finally:
        gate.release()
    _wait_idle(fetcher)
    # Idle, so the counts are final: never more than 3 GETs in flight, none for other parts.
    assert client.max_active("get_range") == 3
    assert _parts_fetched(client) == [0, 1, 2]
    # Budget is free again; cached parts are skipped.
    assert fetcher.prefetch(ref, range(0, 5)) == 2
    _wait_idle(fetcher)
    assert _parts_fetched(client) == [0, 1, 2, 3, 4]


def test_prefetch_stops_at_end_of_object(make_fetcher: Callable[..., PartFetcher]) -> None:
    data = _payload(2 * PART + 1)
    client = _store(data)
    fetcher = make_fetcher(client)
    ref = _ref(len(data))
    assert fetcher.prefetch(ref, range(1, 10)) == 2
    _wait_idle(fetcher)
    assert _parts_fetched(client) == [1, 2]


def test_reader_waits_for_inflight_readahead(make_fetcher: Callable[..., PartFetcher]) -> None:
    data = _payload(4 * PART)
    client = _store(data)
    gate = client.hold("get_range")
    fetcher = make_fetcher(client)
    ref = _ref(len(data))
    assert fetcher.prefetch(ref, [1]) == 1
    assert gate.wait_held(1)
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(fetcher.read(ref, 1, 5, 10)))
    reader.start()
    _wait_for(lambda: _blocked_in_engine(reader))
    # Waiting on the in-flight read-ahead, not fetching again (that GET would be held too).
    assert gate.held == 1 and client.count("get_range") == 1
    assert not result
    gate.release()
    reader.join(5)
    assert result == [data[PART + 5 : PART + 15]]
    assert client.count("get_range") == 1


def test_shutdown_does_not_strand_waiting_readers(cache: PartCache) -> None:
    data = _payload(4 * PART)
    client = _store(data)
    gate = client.hold("get_range")
    fetcher = PartFetcher(client, cache, max_parallel=1)  # type: ignore[arg-type]
    ref = _ref(len(data))
    assert fetcher.prefetch(ref, [0, 1]) == 2  # part 1 queued behind part 0
    assert gate.wait_held(1)
    outcome: list[object] = []

    def read_part_1() -> None:
        try:
            outcome.append(fetcher.read(ref, 1, 0, 10))
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read_part_1, daemon=True)
    reader.start()
    _wait_for(lambda: _blocked_in_engine(reader))  # waiting on the queued part 1
    assert gate.held == 1
    stopper = threading.Thread(target=fetcher.shutdown, daemon=True)
    stopper.start()
    _wait_for(lambda: _blocked_in_engine(stopper))  # queued work cancelled, joining the pool
    gate.release()
    stopper.join(5)
    reader.join(1)
    finished = not reader.is_alive()
    if not finished:  # unblock the stranded reader so the thread does not linger
        with fetcher._lock:
            stranded = list(fetcher._inflight.values())
        for future in stranded:
            if not future.done():
                future.set_exception(RuntimeError("stranded"))
        reader.join(2)
    assert finished, "reader still waiting on a cancelled read-ahead"


# -- ObjectReader --------------------------------------------------------------


def _setup_reader(
    make_fetcher: Callable[..., PartFetcher],
    parts: int,
    *,
    max_readahead_parts: int = 8,
    tail: int = 0,
    **fetcher_kwargs: Any,
) -> tuple[FaultyStore[MemoryStore], PartFetcher, ObjectReader, bytes]:
    data = _payload(parts * PART + tail)
    client = _store(data)
    fetcher = make_fetcher(client, **fetcher_kwargs)
    reader = ObjectReader(fetcher, _ref(len(data)), max_readahead_parts=max_readahead_parts)
    return client, fetcher, reader, data


@pytest.mark.parametrize(
    ("max_parts", "highest_after_each_read"),
    [
        # window 1, 2, 4, 8, 8, ...: part i read -> parts up to i + window scheduled
        (8, [1, 3, 6, 11, 12, 13]),
        # window capped at 4
        (4, [1, 3, 6, 7, 8, 9]),
        # window capped at 2
        (2, [1, 3, 4, 5, 6, 7]),
    ],
)
def test_sequential_reads_grow_readahead_window(
    make_fetcher: Callable[..., PartFetcher], max_parts: int, highest_after_each_read: list[int]
) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 40, max_readahead_parts=max_parts)
    for i, highest in enumerate(highest_after_each_read):
        assert reader.read(i * PART, PART) == data[i * PART : (i + 1) * PART]
        _wait_idle(fetcher)
        # Every part up to the window's edge fetched exactly once, nothing beyond.
        assert _parts_fetched(client) == list(range(highest + 1)), f"after read {i}"


def test_sequential_small_reads_within_a_part(make_fetcher: Callable[..., PartFetcher]) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 40, max_readahead_parts=8)
    # Many 100-byte reads in part 0: the window does not grow while in the same part.
    for offset in range(0, PART, 100):
        assert reader.read(offset, 100) == data[offset : offset + 100]
    _wait_idle(fetcher)
    assert _parts_fetched(client) == [0, 1]


def test_sequential_read_of_whole_object(make_fetcher: Callable[..., PartFetcher]) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 30, tail=321, max_readahead_parts=8)
    out = bytearray()
    offset = 0
    while True:
        chunk = reader.read(offset, 700)  # not aligned with the parts
        if not chunk:
            break
        out += chunk
        offset += len(chunk)
    assert bytes(out) == data
    _wait_idle(fetcher)
    assert _parts_fetched(client) == list(range(31))  # each part once, none past the end


def test_random_reads_fetch_only_their_bytes_and_do_not_read_ahead(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache
) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 40, max_readahead_parts=8)
    offsets = [17_500, 3_200, 30_100, 9_900, 25_000, 38_950, 12_000, 21_000]
    expected: list[Call] = []
    for offset in offsets:
        assert reader.read(offset, 100) == data[offset : offset + 100]
        _wait_idle(fetcher)
        # Only the bytes asked for, one GET per part touched (38_950 straddles 38 and 39).
        cut = min(offset + 100, (offset // PART + 1) * PART)
        expected.append(Call(KEY, offset, cut - 1, ETAG))
        if cut < offset + 100:
            expected.append(Call(KEY, cut, offset + 99, ETAG))
        assert _gets(client) == expected
    assert client.count("get_range") == 9
    assert not any(cache.has(reader.ref.part_id(n)) for n in range(40))


def test_a_part_touched_twice_by_random_reads_is_cached_whole(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache
) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 40, max_readahead_parts=8)
    pid = reader.ref.part_id(20)
    for offset in (20_100, 5_000, 20_700):  # part 20, elsewhere, part 20 again
        assert reader.read(offset, 100) == data[offset : offset + 100]
    _wait_idle(fetcher)
    assert cache.has(pid)
    assert Call(KEY, 20 * PART, 21 * PART - 1, ETAG) in _gets(client)
    calls = client.count("get_range")
    again = ObjectReader(fetcher, reader.ref, max_readahead_parts=8)  # a new open of the file
    assert again.read(20_400, 300) == data[20_400:20_700]  # from the cache now
    assert again.read(5_000, 100) == data[5_000:5_100]  # part 5 touched twice: cached too
    _wait_idle(fetcher)
    assert cache.has(reader.ref.part_id(5))
    assert client.count("get_range") == calls + 2  # part 5's bytes, then part 5 whole


def test_readahead_stops_at_end_of_object(make_fetcher: Callable[..., PartFetcher]) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 3, max_readahead_parts=8)
    for i in range(3):
        assert reader.read(i * PART, PART) == data[i * PART : (i + 1) * PART]
    _wait_idle(fetcher)
    assert _parts_fetched(client) == [0, 1, 2]


def test_reads_at_and_past_end(make_fetcher: Callable[..., PartFetcher]) -> None:
    _client, fetcher, reader, data = _setup_reader(make_fetcher, 2, tail=50)
    size = len(data)
    assert reader.read(size, 10) == b""
    assert reader.read(size + 5000, 10) == b""
    assert reader.read(size - 20, 1000) == data[-20:]
    assert reader.read(0, 0) == b""
    _wait_idle(fetcher)


def test_read_across_part_boundaries(make_fetcher: Callable[..., PartFetcher]) -> None:
    client, _fetcher, reader, data = _setup_reader(make_fetcher, 6, max_readahead_parts=0)
    assert reader.read(PART - 10, 2 * PART + 20) == data[PART - 10 : 3 * PART + 10]
    assert _parts_fetched(client) == [0, 1, 2, 3]
    assert reader.read(0, 6 * PART) == data
    assert client.count("get_range") == 6


def test_readahead_in_flight_is_bounded_by_budget(
    make_fetcher: Callable[..., PartFetcher],
) -> None:
    client, fetcher, reader, data = _setup_reader(
        make_fetcher, 40, max_readahead_parts=16, max_parallel=16, max_inflight_bytes=3 * PART
    )
    client.delay("get_range", 0.02)
    for i in range(12):
        assert reader.read(i * PART, PART) == data[i * PART : (i + 1) * PART]
    _wait_idle(fetcher)
    # Read-ahead never takes in-flight bytes past the budget; the reader's own
    # fetch of a part that was not scheduled may add one more.
    assert client.max_active("get_range") <= 4
    assert sorted(set(_parts_fetched(client))) == _parts_fetched(client)  # no part twice


def test_readahead_failure_reaches_the_reader(make_fetcher: Callable[..., PartFetcher]) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 10, max_readahead_parts=4)
    assert reader.read(0, PART) == data[:PART]
    _wait_idle(fetcher)
    client.fail("get_range", PreconditionFailedError("object changed", status=412, key=KEY))
    with pytest.raises(PreconditionFailedError):
        for i in range(1, 10):
            reader.read(i * PART, PART)


def test_precondition_failed_propagates_to_reader(
    make_fetcher: Callable[..., PartFetcher],
) -> None:
    client, fetcher, reader, _data = _setup_reader(make_fetcher, 10, max_readahead_parts=4)
    client.fail("get_range", PreconditionFailedError("object changed", status=412, key=KEY))
    with pytest.raises(PreconditionFailedError):
        reader.read(0, 10)
    _wait_idle(fetcher)


def test_other_store_errors_propagate(make_fetcher: Callable[..., PartFetcher]) -> None:
    client, _fetcher, reader, _data = _setup_reader(make_fetcher, 4, max_readahead_parts=0)
    client.fail("get_range", StoreUnavailableError("down"))
    with pytest.raises(StoreUnavailableError):
        reader.read(PART, 10)


def test_every_fetch_is_pinned_to_the_etag(make_fetcher: Callable[..., PartFetcher]) -> None:
    client, fetcher, reader, _data = _setup_reader(make_fetcher, 20, max_readahead_parts=8)
    for i in range(0, 20 * PART, 900):
        reader.read(i, 900)
    reader.read(5 * PART + 3, 10)
    _wait_idle(fetcher)
    assert _gets(client)
    assert {c.if_match for c in _gets(client)} == {ETAG}
    assert {c.key for c in _gets(client)} == {KEY}


def test_cached_parts_need_no_requests(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache
) -> None:
    client, fetcher, reader, data = _setup_reader(make_fetcher, 5, max_readahead_parts=8)
    assert reader.read(0, 5 * PART) == data
    _wait_idle(fetcher)
    calls = client.count("get_range")
    second = ObjectReader(fetcher, reader.ref, max_readahead_parts=8)
    for i in range(5):
        assert second.read(i * PART, PART) == data[i * PART : (i + 1) * PART]
    _wait_idle(fetcher)
    assert client.count("get_range") == calls


# -- writing behind the reader, verifying ahead of it --------------------------


def test_readers_get_a_part_before_it_is_written_to_the_cache(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(2 * PART)
    client = _store(data)
    disk = threading.Event()
    real_store = cache.store

    def slow_store(pid, buf):  # type: ignore[no-untyped-def]
        assert disk.wait(10), "test never released the disk"
        return real_store(pid, buf)

    monkeypatch.setattr(cache, "store", slow_store)
    fetcher = make_fetcher(client)
    ref = _ref(len(data))
    pid = ref.part_id(0)
    # The reader is served while the write is still blocked...
    assert fetcher.read(ref, 0, 0, PART) == data[:PART]
    assert not cache.has(pid)
    # ...and so is the next reader of that part, from memory, with no second GET.
    assert fetcher.read(ref, 0, 100, 50) == data[100:150]
    assert client.count("get_range") == 1
    durable: list[bool] = []
    waiter = threading.Thread(
        target=lambda: durable.append(bool(fetcher.fetch(ref, 0, durable=True)) and cache.has(pid))
    )
    waiter.start()
    _wait_for(lambda: _blocked_in_engine(waiter))
    assert not durable  # durable=True waits for the write
    disk.set()
    waiter.join(5)
    assert durable == [True]
    _wait_idle(fetcher)
    assert client.count("get_range") == 1


def test_a_refused_cache_write_still_serves_the_reader(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(PART)
    client = _store(data)
    monkeypatch.setattr(cache, "store", lambda pid, buf: False)
    fetcher = make_fetcher(client, max_recent_bytes=0)  # nothing kept in memory either
    ref = _ref(len(data))
    assert fetcher.read(ref, 0, 0, PART) == data
    _wait_idle(fetcher)
    assert not cache.has(ref.part_id(0))
    assert fetcher.read(ref, 0, 0, 10) == data[:10]  # fetched again, not lost
    assert client.count("get_range") == 2


def test_recently_fetched_parts_are_served_from_memory(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(4 * PART)
    client = _store(data)
    fetcher = make_fetcher(client, max_recent_bytes=2 * PART)
    ref = _ref(len(data))
    for n in range(4):
        fetcher.fetch(ref, n, durable=True)
    assert all(cache.has(ref.part_id(n)) for n in range(4))
    disk_reads: list[int] = []
    real_read_into = cache.read_into

    def counting_read_into(pid, offset, view):  # type: ignore[no-untyped-def]
        disk_reads.append(pid.number)
        return real_read_into(pid, offset, view)

    monkeypatch.setattr(cache, "read_into", counting_read_into)
    for n in range(4):
        assert fetcher.read(ref, n, 10, 20) == data[n * PART + 10 : n * PART + 30]
    assert disk_reads == [0, 1]  # the last two parts fetched were still in memory
    assert client.count("get_range") == 4


def test_the_budget_pushes_out_parts_already_read_before_parts_not_yet_read(
    make_fetcher: Callable[..., PartFetcher],
) -> None:
    data = _payload(6 * PART)
    client = _store(data)
    fetcher = make_fetcher(client, max_inflight_bytes=4 * PART)
    ref = _ref(len(data))

    def in_memory() -> list[int]:
        with fetcher._lock:
            return sorted(pid.number for pid in fetcher._recent)

    for n in range(3):
        fetcher.fetch(ref, n, durable=True)
    assert in_memory() == [0, 1, 2]
    fetcher.read(ref, 1, 0, PART)  # read part 1, then part 0: 1 is the least recently read
    fetcher.read(ref, 0, 0, PART)
    fetcher.fetch(ref, 3, durable=True)  # fits: 4 parts
    assert in_memory() == [0, 1, 2, 3]
    fetcher.fetch(ref, 4, durable=True)  # pushes out part 1, read longest ago
    assert in_memory() == [0, 2, 3, 4]
    fetcher.fetch(ref, 5, durable=True)  # then part 0; parts 2-4, never read, stay
    assert in_memory() == [2, 3, 4, 5]
    assert client.count("get_range") == 6
    for n in range(6):  # every byte still right, from memory or from the cache
        assert fetcher.read(ref, n, 0, PART) == data[n * PART : (n + 1) * PART]


def test_readahead_verifies_cached_parts_ahead_of_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(6 * PART)
    client = _store(data)
    ref = _ref(len(data))
    first = PartCache(tmp_path / "c")
    fetcher = PartFetcher(client, first)  # type: ignore[arg-type]
    for n in range(6):
        fetcher.fetch(ref, n, durable=True)
    fetcher.shutdown()
    first.close()
    calls = client.count("get_range")

    later = PartCache(tmp_path / "c")  # a remount: nothing verified in this process yet
    checked: list[str] = []
    real_check = later.files.check
    monkeypatch.setattr(
        later.files, "check", lambda h, rec: checked.append(h.file.name) or real_check(h, rec)
    )
    fetcher = PartFetcher(client, later)  # type: ignore[arg-type]
    try:
        reader = ObjectReader(fetcher, ref, max_readahead_parts=4)
        assert reader.read(0, PART) == data[:PART]
        assert reader.read(PART, PART) == data[PART : 2 * PART]
        # Parts the reader has not reached are verified by read-ahead, not fetched.
        _wait_for(lambda: later.is_verified(ref.part_id(3)))
        assert client.count("get_range") == calls
        for n in range(2, 6):
            assert reader.read(n * PART, PART) == data[n * PART : (n + 1) * PART]
        _wait_idle(fetcher)
        assert len(checked) == 6  # each part checked once, by whoever got there first
        assert client.count("get_range") == calls
    finally:
        fetcher.shutdown()
        later.close()


def test_prefetch_of_a_file_the_cache_refuses_fails_with_one_clear_error(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(3 * PART)
    client = _store(data)

    def full_disk(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.files, "write", full_disk)
    meta = ObjectMeta(KEY, len(data), ETAG, 1_700_000_000.0)
    with pytest.raises(CacheWriteError) as info:
        prefetch_object(client, cache, meta, PART, threads=2)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert "cannot write to the cache" in message and f"s3://bkt/{KEY}" in message
    assert "No space left" in message


def test_prefetch_is_not_failed_by_a_concurrent_eviction_of_its_parts(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = _payload(3 * PART)
    client = _store(data)
    real_store = cache.store

    def store_then_evicted(pid: PartId, buf: memoryview) -> bool:
        assert real_store(pid, buf)
        cache.drop(pid)  # another process's eviction, right after
        return True

    monkeypatch.setattr(cache, "store", store_then_evicted)
    caplog.set_level(logging.WARNING)
    meta = ObjectMeta(KEY, len(data), ETAG, 1_700_000_000.0)
    result = prefetch_object(client, cache, meta, PART, threads=2)  # type: ignore[arg-type]
    assert result.parts_fetched == 3
    assert cache.writes_refused() is None
    assert not [r for r in caplog.records if "cannot write" in r.getMessage()]


def test_a_cached_part_cut_short_under_the_reader_fails_the_read(
    make_fetcher: Callable[..., PartFetcher], cache: PartCache
) -> None:
    _client, fetcher, reader, data = _setup_reader(
        make_fetcher, 3, max_readahead_parts=0, max_recent_bytes=0
    )
    assert reader.read(0, 3 * PART) == data  # fetched and stored
    assert fetcher.wait_idle(5)
    assert reader.read(0, 3 * PART) == data  # served from the cache: the handles stay open
    os.truncate(cache.part_path(reader.ref.part_id(1)), PART // 2)
    with pytest.raises(ChecksumError, match=r"part 1 .* ended after 500 bytes"):
        reader.read(0, 3 * PART)  # never a short read that would look like the end of file
