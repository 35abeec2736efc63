"""The part cache under faults and sharing: transient errors, corruption, other
processes, crashes mid-operation, leaks, privacy, bounded connections."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ossfs_resume.cache import PartCache, PartId, cache_exists, object_id
from ossfs_resume.cache import partcache as partcache_module
from ossfs_resume.cache.admin import clear_all
from ossfs_resume.cache.index import PartIndex, PartRecord, is_corrupt
from ossfs_resume.cache.writers import writer_alive, writer_token

pytestmark = pytest.mark.usefixtures("watchdog")

STORE = "s3+http://127.0.0.1:9000"
PART = 1000


def _pid(number: int = 0, key: str = "k", etag: str = "e1") -> PartId:
    return PartId(object_id(STORE, "bkt", key, etag), PART, number)


def _data(length: int = PART, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 256 for i in range(length))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("ossfs_resume.cache")
    ]


def _rows(root: Path) -> dict[tuple[str, int, int], tuple[int, str | None]]:
    conn = sqlite3.connect(f"file:{root / 'index.db'}?mode=ro", uri=True)
    try:
        return {
            (r[0], r[1], r[2]): (r[3], r[4])
            for r in conn.execute("SELECT oid, part_size, number, length, writer FROM parts")
        }
    finally:
        conn.close()


def _files(root: Path) -> dict[tuple[str, int, int], int]:
    out = {}
    for path in (root / "parts").glob("*/*/*"):
        if path.name.startswith("."):
            out[("tmp", 0, len(out))] = -1
            continue
        size, number = path.name.split("-")
        out[(path.parent.name, int(size), int(number))] = path.stat().st_size
    return out


def assert_consistent(root: Path) -> None:
    rows, files = _rows(root), _files(root)
    assert {k: v[0] for k, v in rows.items()} == files
    assert all(writer is None for _, writer in rows.values())


# -- transient faults never cost the cache ------------------------------------


def test_a_transient_index_error_degrades_then_recovers_without_losing_parts(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pid = _pid()
    assert cache.store(pid, _data())
    caplog.set_level(logging.WARNING)
    real_part = PartIndex.part

    def failing(self: PartIndex, p: PartId) -> PartRecord | None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(PartIndex, "part", failing)
    assert cache.read(pid, 0, 10) is None  # "not cached": the reader goes to the store
    assert cache.read(pid, 0, 10) is None  # no retry until RETRY_SECONDS have passed
    assert cache.store(_pid(1), _data()) is False
    # Only this cache's lines: a background thread of an earlier test's cache may still log.
    ours = [w for w in _warnings(caplog) if str(cache.root) in w]
    assert len(ours) == 1 and "disk I/O error" in ours[0]
    assert not list(cache.root.glob("index.broken-*"))
    monkeypatch.setattr(PartIndex, "part", real_part)
    monkeypatch.setattr(partcache_module, "RETRY_SECONDS", 0.0)
    cache._retry_at = 0.0  # the retry time has come
    assert cache.read(pid, 0, 10) == _data()[:10]
    assert any("usable again" in w for w in _warnings(caplog))
    assert cache.store(_pid(1), _data())


@pytest.mark.parametrize(
    "message", ["database or disk is full", "attempt to write a readonly database"]
)
def test_full_or_read_only_index_is_not_corruption(message: str) -> None:
    assert not is_corrupt(sqlite3.OperationalError(message))
    assert not is_corrupt(OSError(28, "No space left on device"))
    assert is_corrupt(sqlite3.DatabaseError("database disk image is malformed"))
    assert is_corrupt(sqlite3.DatabaseError("file is not a database"))


def test_an_index_that_cannot_be_created_gives_a_cache_that_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_init = PartIndex.__init__

    def locked(self: PartIndex, *args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(PartIndex, "__init__", locked)
    caplog.set_level(logging.WARNING)
    cache = PartCache(tmp_path / "c")
    try:
        assert cache.index_problem() == "database is locked"
        assert cache.store(_pid(), _data()) is False
        monkeypatch.setattr(PartIndex, "__init__", real_init)
        cache._retry_at = 0.0
        assert cache.store(_pid(), _data())
        assert cache.read(_pid(), 0, 4) == _data()[:4]
    finally:
        cache.close()


def test_maintenance_never_moves_a_damaged_index_aside(tmp_path: Path) -> None:
    first = PartCache(tmp_path)
    assert first.store(_pid(), _data())
    first.close()
    garbage = b"not a database at all" * 200
    (tmp_path / "index.db").write_bytes(garbage)
    for extra in tmp_path.glob("index.db-*"):
        extra.unlink()
    admin = PartCache(tmp_path, repair=False)
    try:
        assert admin.index_problem() is not None
        with pytest.raises(sqlite3.Error):
            admin.stats()
    finally:
        admin.close()
    assert (tmp_path / "index.db").read_bytes() == garbage
    assert admin.part_path(_pid()).exists()
    assert not list(tmp_path.glob("index.broken-*"))


def test_a_cache_dir_removed_under_a_running_cache_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    cache = PartCache(root)
    try:
        assert cache.store(_pid(0), _data())
        import shutil

        shutil.rmtree(root)
        caplog.set_level(logging.WARNING)
        cache.check_health()
        assert any("removed or replaced" in w for w in _warnings(caplog))
        assert cache.index_path.exists()
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert cache.read(_pid(0), 0, 4) is None
        assert cache.store(_pid(1), _data())
        assert cache.read(_pid(1), 0, 4) == _data()[:4]
        assert_consistent(root)
    finally:
        cache.close()


# -- sharing one cache dir --------------------------------------------------


def test_the_size_limit_is_stored_with_the_cache_and_shared(tmp_path: Path) -> None:
    first = PartCache(tmp_path, max_bytes=5 * PART, min_free_bytes=0)
    second = PartCache(tmp_path)  # no --cache-size: takes the stored one
    try:
        assert second.max_bytes == 5 * PART and second.min_free_bytes == 0
        third = PartCache(tmp_path, max_bytes=7 * PART)
        third.close()
        first.flush_access()  # housekeeping rereads the shared limit
        assert first.max_bytes == 7 * PART
    finally:
        first.close()
        second.close()


def test_reservations_are_visible_to_every_process(tmp_path: Path) -> None:
    a = PartCache(tmp_path, max_bytes=3 * PART, min_free_bytes=0)
    b = PartCache(tmp_path)
    try:
        record = PartRecord(PART, 0, 1.0, 0)
        assert a.evictor.reserve(_pid(0), record, f"{os.getppid()}-0")
        assert b.totals().bytes == PART  # b sees a's write in flight
        assert b.store(_pid(1), _data())
        assert b.store(_pid(2), _data())
        # Full: the reservation cannot be evicted, so b evicted its own oldest part.
        assert b.store(_pid(3), _data())
        assert b.totals().bytes <= 3 * PART
        assert b.record(_pid(0)) is None  # a reservation is not a part yet
    finally:
        a.close()
        b.close()


def test_a_part_reserved_by_another_writer_is_not_written_twice(cache: PartCache) -> None:
    record = PartRecord(PART, 0, 1.0, 0)
    someone_else = f"{os.getppid()}-0"  # a live process (start time not recorded)
    assert cache.evictor.reserve(_pid(), record, someone_else)
    assert cache.store(_pid(), _data()) is True  # someone else is putting it there
    assert not cache.part_path(_pid()).exists()
    assert cache.writes_refused() is None


def test_eviction_keeps_within_the_limit_and_runs_in_the_background(tmp_path: Path) -> None:
    cache = PartCache(tmp_path, max_bytes=20 * PART, min_free_bytes=0)
    try:
        for n in range(60):
            assert cache.store(_pid(n), _data())
            assert cache.totals().bytes <= 20 * PART
        cache.evictor.evict_pass()
        assert cache.totals().bytes <= 18 * PART
        assert_consistent(tmp_path)
    finally:
        cache.close()


def test_verify_during_another_process_eviction_reports_nothing_bad(tmp_path: Path) -> None:
    cache = PartCache(tmp_path, max_bytes=1 << 30, min_free_bytes=0)
    other = PartCache(tmp_path)
    try:
        for n in range(200):
            assert cache.store(_pid(n), _data(seed=n))
        stop = threading.Event()

        def evict() -> None:
            n = 200
            while not stop.is_set() and n < 400:
                other.drop(_pid(n - 200))
                n += 1

        thread = threading.Thread(target=evict)
        thread.start()
        try:
            checked, bad = cache.verify_all()
        finally:
            stop.set()
            thread.join()
        assert bad == []
        assert checked <= 200
    finally:
        cache.close()
        other.close()


# -- nothing leaked --------------------------------------------------------


def _deleted_open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)") and "/parts/" in target:
            out.append(target)
    return out


def test_no_handle_to_a_part_evicted_elsewhere_outlives_its_readers(tmp_path: Path) -> None:
    reader = PartCache(tmp_path, max_bytes=1 << 30, min_free_bytes=0)
    evictor = PartCache(tmp_path)
    try:
        for n in range(10):
            assert reader.store(_pid(n), _data())
            assert reader.read(_pid(n), 0, 1) is not None  # handle kept open
        for n in range(10):
            evictor.drop(_pid(n))
        assert len(_deleted_open_files()) == 10
        reader.flush_access()  # housekeeping lets go of evicted parts
        assert _deleted_open_files() == []
    finally:
        reader.close()
        evictor.close()


def test_a_handle_is_not_kept_for_a_part_dropped_while_it_was_opened(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = _pid()
    assert cache.store(pid, _data())
    real_check = cache.files.check

    def check_then_evicted(handle, rec):  # type: ignore[no-untyped-def]
        ok = real_check(handle, rec)
        cache.drop(pid)  # evicted by another thread while this reader verified it
        return ok

    cache._verified.clear()
    monkeypatch.setattr(cache.files, "check", check_then_evicted)
    handle = cache.open_verified(pid)
    assert handle is not None  # this reader is served
    assert not cache.is_verified(pid)
    del handle
    assert _deleted_open_files() == []


def test_a_crash_during_clear_leaves_nothing_unaccounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = PartCache(tmp_path)
    for n in range(300):
        assert cache.store(_pid(n), _data())
    cache.close()
    cache = PartCache(tmp_path)
    real_unlink = cache.files.unlink
    calls = 0

    def crash_after_some(pid: PartId) -> None:
        nonlocal calls
        calls += 1
        if calls == 150:
            raise KeyboardInterrupt  # the process dies here, mid-batch
        real_unlink(pid)

    monkeypatch.setattr(cache.files, "unlink", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        clear_all(cache._current_index(), cache.files)
    monkeypatch.undo()
    cache.close()
    rows, files = _rows(tmp_path), _files(tmp_path)
    assert set(files) <= set(rows)  # no file without a row
    after = PartCache(tmp_path)
    try:
        assert after.check_consistency() == len(set(rows) - set(files))
        assert_consistent(tmp_path)
    finally:
        after.close()


def test_the_sweep_removes_what_dead_writers_left_and_keeps_live_writes(tmp_path: Path) -> None:
    cache = PartCache(tmp_path)
    try:
        assert cache.store(_pid(0), _data())
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        dead_token = f"{dead.stdout.strip()}-1"
        assert not writer_alive(dead_token) and writer_alive(writer_token())
        index = cache._current_index()
        record = PartRecord(PART, 0, 1.0, 0)
        # A dead writer's reservation whose file made it to its final name ...
        with index.writing() as conn:
            index.reserve(conn, _pid(1), record, dead_token)
            index.reserve(conn, _pid(2), record, writer_token())  # a live write
        cache.part_path(_pid(1)).write_bytes(_data())
        obj = cache.object_dir(_pid(0).object_id)
        (obj / f".{PART}-3.{dead_token}.1.tmp").write_bytes(b"partial")
        live_tmp = obj / f".{PART}-2.{writer_token()}.1.tmp"
        live_tmp.write_bytes(b"partial")
        stray = cache.part_path(_pid(9, key="gone"))
        stray.parent.mkdir(parents=True)
        stray.write_bytes(b"no row for me")
        assert cache.check_consistency() == 0
        rows = _rows(tmp_path)
        assert (_pid(1).object_id, PART, 1) not in rows
        assert not cache.part_path(_pid(1)).exists()
        assert (_pid(2).object_id, PART, 2) in rows
        assert live_tmp.exists()
        assert not (obj / f".{PART}-3.{dead_token}.1.tmp").exists()
        assert not stray.exists()
        assert cache.read(_pid(0), 0, 4) == _data()[:4]
    finally:
        cache.close()


# -- bounded connections -----------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_connections_stay_bounded_however_many_threads(tmp_path: Path) -> None:
    cache = PartCache(tmp_path, connections=4)
    try:
        assert cache.store(_pid(0), _data())
        oid = cache.note_version(STORE, "bkt", "k", "e1", PART, PART)
        before = _open_fds()

        def open_like_fuse() -> None:  # a fresh thread per call, as libfuse's are to Python
            assert cache.note_version(STORE, "bkt", "k", "e1", PART, PART) == oid
            assert cache.has(_pid(0))

        for _ in range(40):
            threads = [threading.Thread(target=open_like_fuse) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert _open_fds() <= before + 8  # at most the pool's remaining connections
    finally:
        cache.close()


def test_opening_a_known_version_writes_nothing(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.note_version(STORE, "bkt", "k", "e1", PART, PART)

    def no_writes(self: PartIndex) -> None:
        raise AssertionError("an open of a known version wrote to the index")

    monkeypatch.setattr(PartIndex, "writing", no_writes)
    assert cache.note_version(STORE, "bkt", "k", "e1", PART, PART) == object_id(
        STORE, "bkt", "k", "e1"
    )


# -- private by default ----------------------------------------------------------


def test_cache_dir_and_index_are_private(tmp_path: Path) -> None:
    cache = PartCache(tmp_path / "c")
    try:
        assert cache.store(_pid(), _data())
        assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700
        for name in ("index.db", "index.db-wal", "index.db-shm"):
            path = tmp_path / "c" / name
            if path.exists():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert stat.S_IMODE(cache.part_path(_pid()).stat().st_mode) == 0o600
    finally:
        cache.close()


def test_a_cache_dir_open_to_others_is_tightened_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    caplog.set_level(logging.WARNING)
    PartCache(root).close()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert len([w for w in _warnings(caplog) if "readable by others" in w]) == 1


# -- an earlier version's index ------------------------------------------------


def test_the_index_of_the_earlier_format_is_migrated(tmp_path: Path) -> None:
    pid = _pid(2)
    data = _data()
    path = tmp_path / "parts" / pid.object_id[:2] / pid.object_id / f"{PART}-2"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    from ossfs_resume.checksum import crc64

    (tmp_path / "index").mkdir()
    old = sqlite3.connect(tmp_path / "index" / "cache.db")
    old.execute("CREATE TABLE Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, value BLOB)")
    old.execute(
        "INSERT INTO Cache (key, raw, value) VALUES (?, 1, ?)",
        (f"p:{pid.object_id}:{PART}:2", f"{PART}:{crc64(data)}:100:3"),
    )
    old.execute("INSERT INTO Cache (key, raw, value) VALUES ('meta:bytes', 1, 1000)")
    old.commit()
    old.close()
    assert cache_exists(tmp_path)
    cache = PartCache(tmp_path)
    try:
        assert cache.read(pid, 0, PART) == data
        assert not (tmp_path / "index").exists()
        assert cache.totals().bytes == PART
    finally:
        cache.close()


def test_the_index_write_queue_hands_the_lock_over_in_arrival_order() -> None:
    from ossfs_resume.cache.index import FairLock

    lock = FairLock()
    order: list[int] = []
    lock.acquire()
    arrived = threading.Semaphore(0)
    threads = []
    for n in range(5):

        def wait_turn(n: int = n) -> None:
            arrived.release()
            with lock:
                order.append(n)

        t = threading.Thread(target=wait_turn)
        t.start()
        arrived.acquire()
        # Wait until this thread is queued before starting the next one.
        while len(lock._waiters) < n + 1:
            threading.Event().wait(0.001)
        threads.append(t)
    lock.release()  # each release now goes to the longest waiter
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3, 4]


def test_a_reservation_of_a_dead_writer_is_taken_over(cache: PartCache) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    record = PartRecord(PART, 0, 1.0, 0)
    assert cache.evictor.reserve(_pid(), record, f"{dead.stdout.strip()}-1")
    assert cache.store(_pid(), _data())
    assert cache.read(_pid(), 0, 4) == _data()[:4]
    assert cache.totals().bytes == PART  # the dead reservation no longer counts


def test_a_deferred_version_is_recorded_by_the_next_flush(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = cache.note_version(STORE, "bkt", "k", "e0", PART, PART)
    assert cache.store(PartId(old, PART, 0), _data())
    real_writing = PartIndex.writing
    writes: list[str] = []

    def counting(self: PartIndex):  # type: ignore[no-untyped-def]
        writes.append("write")
        return real_writing(self)

    monkeypatch.setattr(PartIndex, "writing", counting)
    new = cache.note_version(STORE, "bkt", "k", "e1", PART, PART, defer=True)
    assert new != old and writes == []  # the open wrote nothing
    assert cache.has(PartId(old, PART, 0))
    monkeypatch.undo()
    cache.flush_access()
    assert not cache.has(PartId(old, PART, 0))  # the replaced version's parts went
    row = cache._current_index().object_by_name(partcache_module.name_id(STORE, "bkt", "k"))
    assert row is not None and row.oid == new


def test_writes_that_fail_and_succeed_in_turn_are_one_outage(
    cache: PartCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A nearly full disk: eviction frees a little, one write works, the next fails."""
    real_write = cache.files.write
    full = {"now": False}

    def write(pid: PartId, data: object, writer: str) -> None:
        if full["now"]:
            raise OSError(28, "No space left on device")
        real_write(pid, data, writer)  # type: ignore[arg-type]

    monkeypatch.setattr(cache.files, "write", write)
    caplog.set_level(logging.WARNING)
    for n in range(6):
        full["now"] = n % 2 == 0
        assert cache.store(_pid(n), _data()) is (not full["now"])
    ours = [w for w in _warnings(caplog) if str(cache.root) in w]
    assert len(ours) == 1 and "No space left" in ours[0]
    assert cache.writes_refused() is not None  # still the same outage
    monkeypatch.setattr(partcache_module, "WRITE_RECOVERY_SECONDS", 0.0)
    full["now"] = False
    assert cache.store(_pid(9), _data())
    assert cache.writes_refused() is None
    assert any("accepts writes again" in w for w in _warnings(caplog))


def test_the_health_check_keeps_sqlite_s_locks_for_other_processes(tmp_path: Path) -> None:
    """POSIX locks belong to a process and file: closing any descriptor of the index in
    this process drops SQLite's locks on it. Then another process closing its last
    connection thinks itself the last user and removes the WAL under us (the mount's
    reads failed with 'disk I/O error' right after a prefetch process exited)."""
    cache = PartCache(tmp_path)
    try:
        assert cache.store(_pid(0), _data())
        for _ in range(3):
            cache.check_health()  # reads the index file's header
        other = (
            "import sys; from ossfs_resume.cache import PartCache, PartId\n"
            "c = PartCache(sys.argv[1]); c.store(PartId('o' * 40, 1000, 1), b'x' * 1000)\n"
            "c.close()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", other, str(tmp_path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "index.db-wal").exists()  # we still use it: not removed
        assert cache.has(PartId("o" * 40, 1000, 1)) and cache.has(_pid(0))
        assert cache.index_problem() is None
    finally:
        cache.close()
