"""The part index: SQLite tables (standard library ``sqlite3``), the cache's checkpoint.

One row per part, keyed by (object id, part size, part number), carrying its
length, CRC-64, last access and access count. A row whose ``writer`` is set
is a *reservation*: its bytes count against the size limit while that
process writes the data, so every process sharing the cache dir sees every
other's writes in flight. Triggers keep running totals (parts, bytes,
objects), so totals never need a scan; the eviction order is an index on
(hot, atime), so picking victims is O(log n) per part.

Connections are a fixed pool, whatever the number of threads: libfuse calls
in from C threads whose Python thread state is new on every call, so
anything per-thread (``threading.local``) would open a connection per call.

Only SQLITE_CORRUPT and SQLITE_NOTADB mean "corrupt"; every other error (a
full or failing disk, a lock, a read-only dir) is transient and never costs
the cache its contents (see ``is_corrupt``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..parts import PartRecord

#: Bump when the schema changes incompatibly.
SCHEMA_VERSION = 1
#: SQLite primary result codes that mean the file itself is damaged.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    parts INTEGER NOT NULL, bytes INTEGER NOT NULL, objects INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0, 0);
CREATE TABLE IF NOT EXISTS objects (
    name_id TEXT PRIMARY KEY, oid TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL,
    etag TEXT NOT NULL, size INTEGER NOT NULL, part_sizes TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_oid ON objects (oid);
CREATE TABLE IF NOT EXISTS parts (
    oid TEXT NOT NULL, part_size INTEGER NOT NULL, number INTEGER NOT NULL,
    length INTEGER NOT NULL, crc INTEGER NOT NULL, atime REAL NOT NULL,
    hits INTEGER NOT NULL, writer TEXT,
    PRIMARY KEY (oid, part_size, number)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS parts_by_age ON parts (hits > 1, atime) WHERE writer IS NULL;
CREATE INDEX IF NOT EXISTS parts_in_writing ON parts (writer) WHERE writer IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS parts_added AFTER INSERT ON parts BEGIN
    UPDATE totals SET parts = parts + 1, bytes = bytes + NEW.length WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS parts_removed AFTER DELETE ON parts BEGIN
    UPDATE totals SET parts = parts - 1, bytes = bytes - OLD.length WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS parts_resized AFTER UPDATE OF length ON parts BEGIN
    UPDATE totals SET bytes = bytes - OLD.length + NEW.length WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS objects_added AFTER INSERT ON objects BEGIN
    UPDATE totals SET objects = objects + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS objects_removed AFTER DELETE ON objects BEGIN
    UPDATE totals SET objects = objects - 1 WHERE id = 0; END;
"""


def is_corrupt(exc: BaseException) -> bool:
    """True only when SQLite says the database file itself is damaged."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _signed(crc: int) -> int:
    """CRC-64 as SQLite's signed 64-bit INTEGER."""
    return crc - (1 << 64) if crc >= 1 << 63 else crc


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


@dataclass(frozen=True)
class PartId:
    object_id: str
    part_size: int
    number: int


class ObjectRow(NamedTuple):
    name_id: str
    oid: str
    bucket: str
    key: str
    etag: str
    size: int
    part_sizes: tuple[int, ...]


class Totals(NamedTuple):
    parts: int  # rows, reservations included
    bytes: int  # bytes of every row, reservations included
    objects: int


class Victim(NamedTuple):
    pid: PartId
    length: int


class FairLock:
    """A lock handed to waiters in arrival order.

    A thread that releases and at once re-acquires a plain lock (the eviction
    loop) can keep other threads out indefinitely; here each release hands the
    lock to the longest waiter.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append(baton)
        baton.acquire()  # released by the owner's release(): the lock is ours

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _private_file(path: Path) -> None:
    """Create `path` readable by its owner only (SQLite gives -wal and -shm the same mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class PartIndex:
    """The index database at `path`: a fixed pool of connections, short transactions."""

    def __init__(self, path: Path, *, connections: int = 4, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(connections)
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()  # guards _all and _closed
        self._closed = False
        # Writers of this process queue here in order, not in SQLite's busy handler,
        # which sleeps up to 100 ms between tries and so loses to a tight loop.
        self._writers = FairLock()
        created = not path.exists()
        if created:
            _private_file(path)
        with self._connection() as conn:
            self._setup(conn)
        st = os.stat(path)
        #: (device, inode) of the file opened: a different one means the dir was replaced.
        self.identity = (st.st_dev, st.st_ino)

    def _setup(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"index schema version {version} is newer than this program's {SCHEMA_VERSION}"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # transactions are explicit and short
            check_same_thread=False,  # pooled: used by one thread at a time
        )
        try:
            # WAL: readers never block the writer or each other. NORMAL: a commit is
            # durable against a process crash; a power cut may lose the last rows, whose
            # parts are then fetched again (data is always fsynced before its row).
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        with self._lock:
            self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        self._slots.acquire()
        try:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                conn = self._open()
            try:
                yield conn
            finally:
                with self._lock:
                    closed = self._closed
                if closed:
                    conn.close()
                else:
                    self._pool.put(conn)
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for queries (each statement sees the latest commit)."""
        if self._closed:
            raise sqlite3.ProgrammingError("the cache index is closed")
        with self._connection() as conn:
            yield conn

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue here, not at commit).

        The queue is taken before a connection, so a writer never holds a pooled
        connection while it waits (a write transaction may still run reads on a
        second connection without any risk of the pool running dry).
        """
        if self._closed:
            raise sqlite3.ProgrammingError("the cache index is closed")
        with self._writers, self._connection() as conn:
            self._begin(conn)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, polling every few ms while another process holds the lock:
        SQLite's own busy handler backs off to 100 ms sleeps, so a writer of another
        process could wait for a whole eviction pass between its short batches."""
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + self._busy_timeout
            delay = 0.0005
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    text = str(exc)
                    if "locked" not in text and "busy" not in text:
                        raise
                    if time.monotonic() >= deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 0.004)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = []
            while True:
                try:
                    idle.append(self._pool.get_nowait())
                except queue.Empty:
                    break
        for conn in idle:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- parts ------------------------------------------------------------

    def part(self, pid: PartId) -> PartRecord | None:
        """The record of a part whose data is durable (reservations are not parts yet)."""
        with self.reading() as conn:
            return self.part_in(conn, pid)

    @staticmethod
    def part_in(conn: sqlite3.Connection, pid: PartId) -> PartRecord | None:
        row = conn.execute(
            "SELECT length, crc, atime, hits FROM parts "
            "WHERE oid = ? AND part_size = ? AND number = ? AND writer IS NULL",
            (pid.object_id, pid.part_size, pid.number),
        ).fetchone()
        if row is None:
            return None
        return PartRecord(row[0], _unsigned(row[1]), row[2], row[3])

    @staticmethod
    def row_state(conn: sqlite3.Connection, pid: PartId) -> str | None:
        """None (no row), "ready", or the writer token of a reservation."""
        row = conn.execute(
            "SELECT writer FROM parts WHERE oid = ? AND part_size = ? AND number = ?",
            (pid.object_id, pid.part_size, pid.number),
        ).fetchone()
        if row is None:
            return None
        return row[0] or "ready"

    @staticmethod
    def reserve(conn: sqlite3.Connection, pid: PartId, record: PartRecord, writer: str) -> None:
        conn.execute(
            "INSERT INTO parts (oid, part_size, number, length, crc, atime, hits, writer) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                pid.object_id,
                pid.part_size,
                pid.number,
                record.length,
                _signed(record.crc),
                record.atime,
                record.hits,
                writer,
            ),
        )

    @staticmethod
    def add_parts(conn: sqlite3.Connection, parts: Iterable[tuple[PartId, PartRecord]]) -> None:
        """Insert parts whose data is already durable, in the caller's transaction (bulk
        loads: a benchmark, a migration). The triggers keep the totals as for any insert."""
        conn.executemany(
            "INSERT INTO parts (oid, part_size, number, length, crc, atime, hits, writer) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
            (
                (p.object_id, p.part_size, p.number, r.length, _signed(r.crc), r.atime, r.hits)
                for p, r in parts
            ),
        )

    def commit_part(self, pid: PartId, writer: str) -> bool:
        """Turn a reservation into a part; False if the reservation was dropped meanwhile."""
        with self.writing() as conn:
            cur = conn.execute(
                "UPDATE parts SET writer = NULL "
                "WHERE oid = ? AND part_size = ? AND number = ? AND writer = ?",
                (pid.object_id, pid.part_size, pid.number, writer),
            )
            return cur.rowcount == 1

    @staticmethod
    def delete_part(conn: sqlite3.Connection, pid: PartId, *, writer: str | None = None) -> bool:
        """Delete a part's row (with `writer`: only that writer's reservation)."""
        sql = "DELETE FROM parts WHERE oid = ? AND part_size = ? AND number = ?"
        args: tuple[object, ...] = (pid.object_id, pid.part_size, pid.number)
        if writer is not None:
            sql += " AND writer = ?"
            args += (writer,)
        return conn.execute(sql, args).rowcount == 1

    def touch_parts(self, touched: Iterable[tuple[PartId, float]]) -> None:
        """Record accesses: one window more of hits for each, newer atime (one transaction)."""
        rows = [(atime, p.object_id, p.part_size, p.number, atime) for p, atime in touched]
        if not rows:
            return
        with self.writing() as conn:
            conn.executemany(
                "UPDATE parts SET atime = ?, hits = hits + 1 "
                "WHERE oid = ? AND part_size = ? AND number = ? AND writer IS NULL AND atime < ?",
                rows,
            )

    @staticmethod
    def oldest(conn: sqlite3.Connection, limit: int) -> list[Victim]:
        """Eviction order: parts read in one window only first, then hot ones; oldest first."""
        rows = conn.execute(
            "SELECT oid, part_size, number, length FROM parts WHERE writer IS NULL "
            "ORDER BY hits > 1, atime LIMIT ?",
            (limit,),
        ).fetchall()
        return [Victim(PartId(r[0], r[1], r[2]), r[3]) for r in rows]

    def parts_of(self, oid: str) -> dict[PartId, PartRecord | str]:
        """Every row of one object: its record, or the writer token of a reservation."""
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT part_size, number, length, crc, atime, hits, writer FROM parts "
                "WHERE oid = ?",
                (oid,),
            ).fetchall()
        return {
            PartId(oid, r[0], r[1]): r[6] or PartRecord(r[2], _unsigned(r[3]), r[4], r[5])
            for r in rows
        }

    def scan(self, after: PartId | None, limit: int) -> list[tuple[PartId, PartRecord | str]]:
        """Rows in key order after `after` (keyset pagination: O(log n) per page)."""
        key = (after.object_id, after.part_size, after.number) if after else ("", -1, -1)
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT oid, part_size, number, length, crc, atime, hits, writer FROM parts "
                "WHERE (oid, part_size, number) > (?, ?, ?) "
                "ORDER BY oid, part_size, number LIMIT ?",
                (*key, limit),
            ).fetchall()
        return [
            (PartId(r[0], r[1], r[2]), r[7] or PartRecord(r[3], _unsigned(r[4]), r[5], r[6]))
            for r in rows
        ]

    def writers(self) -> dict[str, int]:
        """Writer token -> reserved bytes, for every reservation."""
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT writer, sum(length) FROM parts WHERE writer IS NOT NULL GROUP BY writer"
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def reservations_of(self, writer: str) -> list[PartId]:
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT oid, part_size, number FROM parts WHERE writer = ?", (writer,)
            ).fetchall()
        return [PartId(*r) for r in rows]

    # -- totals and settings -------------------------------------------------

    @staticmethod
    def totals_in(conn: sqlite3.Connection) -> Totals:
        row = conn.execute("SELECT parts, bytes, objects FROM totals WHERE id = 0").fetchone()
        return Totals(*row)

    def totals(self) -> Totals:
        with self.reading() as conn:
            return self.totals_in(conn)

    def setting(self, name: str) -> object:
        with self.reading() as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, name: str, value: object) -> None:
        with self.writing() as conn:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def add_counters(self, counts: dict[str, int]) -> None:
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return
        with self.writing() as conn:
            conn.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                [(f"stat:{k}", v) for k, v in counts.items()],
            )

    # -- objects ----------------------------------------------------------

    def object_by_name(self, name_id: str) -> ObjectRow | None:
        with self.reading() as conn:
            return self.object_in(conn, name_id)

    @staticmethod
    def object_in(conn: sqlite3.Connection, name_id: str) -> ObjectRow | None:
        row = conn.execute(
            "SELECT name_id, oid, bucket, key, etag, size, part_sizes FROM objects "
            "WHERE name_id = ?",
            (name_id,),
        ).fetchone()
        if row is None:
            return None
        sizes = tuple(int(s) for s in row[6].split(",") if s)
        return ObjectRow(*row[:6], sizes)

    @staticmethod
    def put_object(conn: sqlite3.Connection, row: ObjectRow) -> None:
        conn.execute(
            "INSERT INTO objects (name_id, oid, bucket, key, etag, size, part_sizes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name_id) DO UPDATE SET "
            "oid = excluded.oid, bucket = excluded.bucket, key = excluded.key, "
            "etag = excluded.etag, size = excluded.size, part_sizes = excluded.part_sizes",
            (*row[:6], ",".join(str(s) for s in row.part_sizes)),
        )

    @staticmethod
    def delete_object(conn: sqlite3.Connection, name_id: str) -> None:
        conn.execute("DELETE FROM objects WHERE name_id = ?", (name_id,))

    def object_names(self, after: str, limit: int) -> list[str]:
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT name_id FROM objects WHERE name_id > ? ORDER BY name_id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def oid_in_use(self, oid: str) -> bool:
        with self.reading() as conn:
            return (
                conn.execute("SELECT 1 FROM objects WHERE oid = ? LIMIT 1", (oid,)).fetchone()
                is not None
            )
