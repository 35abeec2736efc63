"""PartCache: durable part files, a checksummed index, version changes, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ossfs_resume.cache import CHECK_CHUNK, PartCache, PartId, object_id
from ossfs_resume.checksum import crc64

STORE = "s3+http://127.0.0.1:9000"
BUCKET = "bkt"
PART = 1000


# Fails a test that hangs (a deadlock) instead of stalling the run: see conftest.py.
pytestmark = pytest.mark.usefixtures("watchdog")


def _data(length: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 256 for i in range(length))


@pytest.fixture
def reopen() -> Iterator[Callable[[PartCache], PartCache]]:
    """The same cache dir in a fresh instance: like the next process to use it.

    A process trusts the parts it stored itself; verification happens the
    first time a *different* (or restarted) process serves a part.
    """
    opened: list[PartCache] = []

    def make(cache: PartCache) -> PartCache:
        fresh = PartCache(cache.root)
        opened.append(fresh)
        return fresh

    yield make
    for fresh in opened:
        fresh.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name.endswith("cache")]


def _pid(number: int = 0, etag: str = "e1", key: str = "k") -> PartId:
    return PartId(object_id(STORE, BUCKET, key, etag), PART, number)


def test_object_id_depends_on_every_field() -> None:
    base = object_id(STORE, BUCKET, "k", "e1")
    assert base == object_id(STORE, BUCKET, "k", "e1")
    others = {
        object_id("oss+http://other", BUCKET, "k", "e1"),
        object_id(STORE, "other", "k", "e1"),
        object_id(STORE, BUCKET, "k2", "e1"),
        object_id(STORE, BUCKET, "k", "e2"),
        # No ambiguity from joining fields.
        object_id(STORE, BUCKET + "k", "", "e1"),
    }
    assert base not in others
    assert len(others) == 5


def test_store_then_open_verified_returns_exact_bytes(cache: PartCache) -> None:
    pid = _pid()
    data = _data(PART)
    assert cache.record(pid) is None
    assert not cache.has(pid)
    assert cache.open_verified(pid) is None
    assert cache.store(pid, data) is True
    rec = cache.record(pid)
    assert rec is not None and (rec.length, rec.crc) == (PART, crc64(data))
    assert cache.has(pid)
    assert cache.part_path(pid).read_bytes() == data
    handle = cache.open_verified(pid)
    assert handle is not None
    assert handle.length == PART
    assert handle.pread(0, PART) == data
    assert handle.pread(123, 45) == data[123:168]
    assert handle.pread(990, 100) == data[990:]  # short at the end
    # No temp files left behind.
    assert sorted(p.name for p in cache.part_path(pid).parent.iterdir()) == [
        cache.part_path(pid).name
    ]


def test_store_accepts_memoryview_and_bytearray(cache: PartCache) -> None:
    data = bytearray(_data(PART, seed=3))
    assert cache.store(_pid(0), memoryview(data))
    assert cache.store(_pid(1), data)
    for number in (0, 1):
        handle = cache.open_verified(_pid(number))
        assert handle is not None and handle.pread(0, PART) == bytes(data)


def test_parts_are_keyed_by_part_size_and_number(cache: PartCache) -> None:
    oid = object_id(STORE, BUCKET, "k", "e1")
    a, b, c = PartId(oid, PART, 0), PartId(oid, PART, 1), PartId(oid, 2 * PART, 0)
    cache.store(a, b"a" * 10)
    cache.store(b, b"b" * 10)
    cache.store(c, b"c" * 10)
    for pid, byte in ((a, b"a"), (b, b"b"), (c, b"c")):
        handle = cache.open_verified(pid)
        assert handle is not None and handle.pread(0, 10) == byte * 10


def test_flipped_byte_is_detected_and_dropped(
    cache: PartCache, reopen: Callable[[PartCache], PartCache], caplog: pytest.LogCaptureFixture
) -> None:
    pid = _pid()
    data = _data(PART)
    cache.store(pid, data)
    path = cache.part_path(pid)
    corrupt = bytearray(data)
    corrupt[500] ^= 0x01
    path.write_bytes(corrupt)
    later = reopen(cache)
    caplog.set_level(logging.WARNING)
    assert later.open_verified(pid) is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "checksum" in warnings[0].getMessage()
    assert later.record(pid) is None
    assert cache.record(pid) is None  # the row is gone from the shared index
    assert not path.exists()
    # Fetched again and stored again: served normally, also to the next process.
    assert later.store(pid, data)
    handle = reopen(cache).open_verified(pid)
    assert handle is not None and handle.pread(0, PART) == data


def test_intact_part_verifies_in_a_new_process(
    cache: PartCache, reopen: Callable[[PartCache], PartCache]
) -> None:
    pid = _pid()
    data = _data(PART)
    cache.store(pid, data)
    later = reopen(cache)
    handle = later.open_verified(pid)
    assert handle is not None and handle.pread(0, PART) == data
    rec = later.record(pid)
    assert rec is not None and (rec.length, rec.crc) == (PART, crc64(data))


@pytest.mark.parametrize("flip", [None, CHECK_CHUNK + 5, 2 * CHECK_CHUNK + 99])
def test_parts_larger_than_a_check_chunk_are_checked_whole(
    cache: PartCache, reopen: Callable[[PartCache], PartCache], flip: int | None
) -> None:
    pid = _pid()
    data = _data(2 * CHECK_CHUNK + 100)
    cache.store(pid, data)
    if flip is not None:
        raw = bytearray(data)
        raw[flip] ^= 0x80
        cache.part_path(pid).write_bytes(raw)
    handle = reopen(cache).open_verified(pid)
    if flip is None:
        assert handle is not None and handle.pread(0, len(data)) == data
    else:
        assert handle is None


def test_missing_part_file_drops_row(
    cache: PartCache, reopen: Callable[[PartCache], PartCache], caplog: pytest.LogCaptureFixture
) -> None:
    pid = _pid()
    cache.store(pid, _data(PART))
    cache.part_path(pid).unlink()
    later = reopen(cache)
    caplog.set_level(logging.WARNING)
    assert later.open_verified(pid) is None
    assert later.record(pid) is None
    assert any("missing" in r.getMessage() for r in _warnings(caplog))


@pytest.mark.parametrize("length", [PART - 1, PART + 1, 0])
def test_wrong_length_file_is_rejected(
    cache: PartCache, reopen: Callable[[PartCache], PartCache], length: int
) -> None:
    pid = _pid()
    data = _data(PART)
    cache.store(pid, data)
    path = cache.part_path(pid)
    # Same prefix (or the same bytes plus one), so only the length is wrong.
    path.write_bytes((data + b"\x00")[:length])
    later = reopen(cache)
    assert later.open_verified(pid) is None
    assert later.record(pid) is None


def test_repeated_hits_do_not_deadlock(cache: PartCache) -> None:
    # Hits on a handle already in the LRU (every read after the first) must
    # return: the watchdog turns a self-deadlock on the cache lock into a failure.
    pid = _pid()
    cache.store(pid, _data(PART))
    for _ in range(3):
        handle = cache.open_verified(pid)
        assert handle is not None and handle.pread(0, 4) == _data(4)


def test_verified_handle_is_reused(cache: PartCache) -> None:
    pid = _pid()
    cache.store(pid, _data(PART))
    first = cache.open_verified(pid)
    assert first is not None
    assert cache.open_verified(pid) is first


def _count_checks(monkeypatch: pytest.MonkeyPatch, cache: PartCache) -> list[PartId]:
    """Record every full checksum read `cache` does (its first-use verification)."""
    checked: list[PartId] = []
    real = cache.files.check

    def counting(handle, rec):  # type: ignore[no-untyped-def]
        checked.append(handle.file.name)
        return real(handle, rec)

    monkeypatch.setattr(cache.files, "check", counting)
    return checked


def test_a_verified_part_is_not_reread_after_its_handle_is_closed(
    tmp_path: Path, reopen: Callable[[PartCache], PartCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = PartCache(tmp_path / "c")
    pids = [_pid(n) for n in range(3)]
    for n, pid in enumerate(pids):
        first.store(pid, _data(PART, seed=n))
    first.close()
    later = PartCache(tmp_path / "c", open_handles=1)  # every open pushes the last handle out
    try:
        checked = _count_checks(monkeypatch, later)
        for _ in range(2):
            for n, pid in enumerate(pids):
                handle = later.open_verified(pid)
                assert handle is not None and handle.pread(0, PART) == _data(PART, seed=n)
        assert len(checked) == 3  # once per part, not once per reopen
        assert all(later.is_verified(pid) for pid in pids)
    finally:
        later.close()


def test_a_part_file_replaced_on_disk_is_checked_again(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = _pid()
    data = _data(PART)
    cache.store(pid, data)
    checked = _count_checks(monkeypatch, cache)
    cache._handles.clear()  # as if the handle had aged out of the LRU
    path = cache.part_path(pid)
    corrupt = bytearray(data)
    corrupt[7] ^= 0x40
    tmp = path.with_name("swap")
    tmp.write_bytes(corrupt)
    os.replace(tmp, path)  # a new inode: the memo of the old file must not vouch for it
    assert cache.open_verified(pid) is None
    assert checked == [str(path)]
    assert cache.record(pid) is None


def test_concurrent_first_readers_check_a_part_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = PartCache(tmp_path / "c")
    pid = _pid()
    first.store(pid, _data(PART))
    first.close()
    later = PartCache(tmp_path / "c")
    try:
        checked = _count_checks(monkeypatch, later)
        start = threading.Barrier(6)
        handles: list[object] = []

        def read() -> None:
            start.wait()
            handles.append(later.open_verified(pid))

        threads = [threading.Thread(target=read) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(handles) == 6 and all(h is handles[0] for h in handles)
        assert len(checked) == 1
        assert not later._verify_locks  # nothing left behind
    finally:
        later.close()


def test_drop_removes_row_and_file(cache: PartCache) -> None:
    pid = _pid()
    cache.store(pid, _data(PART))
    assert cache.open_verified(pid) is not None
    cache.drop(pid)
    assert cache.record(pid) is None
    assert not cache.part_path(pid).exists()
    assert cache.open_verified(pid) is None  # not served from the handle LRU either
    cache.drop(pid)  # dropping twice is harmless


def _store_object(cache: PartCache, etag: str, size: int, part_size: int = PART) -> list[PartId]:
    oid = cache.note_version(STORE, BUCKET, "obj", etag, size, part_size)
    assert oid == object_id(STORE, BUCKET, "obj", etag)
    pids = []
    for number in range(-(-size // part_size)):
        pid = PartId(oid, part_size, number)
        length = min(part_size, size - number * part_size)
        assert cache.store(pid, _data(length, seed=number))
        pids.append(pid)
    return pids


def test_note_version_same_etag_keeps_parts(cache: PartCache) -> None:
    pids = _store_object(cache, "v1", 2500)
    for pid in pids:
        assert cache.open_verified(pid) is not None
    oid = cache.note_version(STORE, BUCKET, "obj", "v1", 2500, PART)
    assert oid == pids[0].object_id
    assert all(cache.has(pid) for pid in pids)


def test_note_version_new_etag_drops_old_parts(cache: PartCache) -> None:
    old = _store_object(cache, "v1", 2500)
    # Another part size of the same version, e.g. from an earlier mount.
    old_big = _store_object(cache, "v1", 2500, part_size=2 * PART)
    for pid in old:
        assert cache.open_verified(pid) is not None  # put handles in the LRU
    old_dir = cache.object_dir(old[0].object_id)
    assert old_dir.exists()
    # Another object must be untouched.
    other = PartId(object_id(STORE, BUCKET, "other", "v1"), PART, 0)
    cache.store(other, b"other")

    new = _store_object(cache, "v2", 1800)
    for pid in old + old_big:
        assert cache.record(pid) is None
        assert not cache.part_path(pid).exists()
        assert cache.open_verified(pid) is None
    assert not old_dir.exists()
    for pid in new:
        handle = cache.open_verified(pid)
        assert handle is not None
        length = min(PART, 1800 - pid.number * PART)
        assert handle.pread(0, PART) == _data(length, seed=pid.number)
    assert cache.has(other)
    # Noting v2 again keeps it.
    cache.note_version(STORE, BUCKET, "obj", "v2", 1800, PART)
    assert all(cache.has(pid) for pid in new)


def test_note_version_is_per_key_and_store(cache: PartCache) -> None:
    a = cache.note_version(STORE, BUCKET, "a", "v1", 10, PART)
    cache.store(PartId(a, PART, 0), b"a" * 10)
    b = cache.note_version("oss+http://elsewhere", BUCKET, "a", "v2", 10, PART)
    cache.store(PartId(b, PART, 0), b"b" * 10)
    # Same key, other store: not a new version of the first.
    assert cache.has(PartId(a, PART, 0))
    assert cache.has(PartId(b, PART, 0))


def test_store_under_a_regular_file_fails_with_one_warning(
    cache: PartCache, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cache.files.dir = blocker / "parts"  # mkdir fails even for root
    caplog.set_level(logging.WARNING)
    assert cache.store(_pid(0), b"abc") is False
    assert cache.store(_pid(1), b"def") is False
    assert cache.record(_pid(0)) is None
    assert cache.record(_pid(1)) is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "cannot write" in warnings[0].getMessage()


def test_store_on_full_disk_fails_cleanly(
    cache: PartCache,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_write = os.write
    root = str(tmp_path.resolve())

    def full_write(fd: int, data: bytes | memoryview) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(root):
            # Write a little, then run out of space, like a real disk.
            if not getattr(full_write, "partial", False):
                full_write.partial = True  # type: ignore[attr-defined]
                return real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_write)
    caplog.set_level(logging.WARNING)
    pid = _pid()
    assert cache.store(pid, _data(PART)) is False
    assert cache.store(_pid(1), _data(PART)) is False
    monkeypatch.undo()
    assert cache.record(pid) is None
    assert cache.open_verified(pid) is None
    assert not cache.part_path(pid).exists()
    leftovers = list(cache.part_path(pid).parent.iterdir())
    assert leftovers == []  # the temp file was removed
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "No space left" in warnings[0].getMessage()
    # Space is back: storing works again.
    assert cache.store(pid, _data(PART))
    assert cache.open_verified(pid) is not None


def test_second_instance_sees_parts_of_the_first(tmp_path: Path) -> None:
    first = PartCache(tmp_path / "shared")
    second = PartCache(tmp_path / "shared")
    try:
        pid = _pid()
        data = _data(PART)
        assert second.open_verified(pid) is None
        assert first.store(pid, data)
        handle = second.open_verified(pid)
        assert handle is not None and handle.pread(0, PART) == data
        # A version change noted by one is seen by the other.
        first.note_version(STORE, BUCKET, "obj", "v1", 10, PART)
        oid1 = object_id(STORE, BUCKET, "obj", "v1")
        first.store(PartId(oid1, PART, 0), b"0123456789")
        second.note_version(STORE, BUCKET, "obj", "v2", 10, PART)
        assert first.record(PartId(oid1, PART, 0)) is None
    finally:
        first.close()
        second.close()


def test_reopened_cache_keeps_parts(tmp_path: Path) -> None:
    pid = _pid()
    data = _data(PART)
    c = PartCache(tmp_path / "c")
    c.store(pid, data)
    c.close()
    reopened = PartCache(tmp_path / "c")
    try:
        handle = reopened.open_verified(pid)
        assert handle is not None and handle.pread(0, PART) == data
    finally:
        reopened.close()


def test_a_damaged_index_is_moved_aside_and_its_parts_swept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = PartCache(tmp_path)
    pid = PartId("ab" * 32, 1 << 20, 0)
    assert first.store(pid, b"x" * 1000)
    first.close()
    db = tmp_path / "index.db"
    db.write_bytes(b"this is not a SQLite database" * 100)
    for extra in tmp_path.glob("index.db-*"):
        extra.unlink()
    with caplog.at_level(logging.WARNING, logger="ossfs_resume.cache"):
        fresh = PartCache(tmp_path)
    assert "is damaged" in caplog.text
    assert list(tmp_path.glob("index.broken-*")), "the broken index was not kept aside"
    assert fresh.record(pid) is None  # starts empty, never serves unindexed data
    fresh.check_consistency()  # the orphaned part file goes
    assert not fresh.part_path(pid).exists()
    assert fresh.store(pid, b"y" * 1000)
    assert fresh.read(pid, 0, 3) == b"yyy"
    fresh.close()
