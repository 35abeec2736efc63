"""The part cache: index + part files + eviction behind one interface.

Knows parts, nothing about FUSE or HTTP. A part is named by
(store, bucket, key, ETag) -> object id, plus part size and part number, so a
changed ETag can never serve old parts.

Write order (crash safety): a reservation row (the part's length and CRC,
marked with its writer) is committed first; the data goes to a temp file, is
fsynced, renamed into place and the directory fsynced; only then does the row
become a part. A crash leaves a reservation of a dead writer (swept, with its
file, by the start-up check) or a part whose data is durable. Each part's
CRC-64 is checked the first time this process serves it; the file's identity
(inode, size, mtime) is then remembered, so reopening it needs no re-read,
while a file replaced on disk is checked again.

Faults: the index and the disk fail in two ways. SQLite reporting the file
as damaged (``index.is_corrupt``) moves the index aside and starts a fresh
one. Anything else (a full disk, an I/O error, a lock, a read-only dir) is
transient: the cache answers "not cached" with one warning, reads go to the
store, and the index is tried again every few seconds, so the cache comes
back by itself. A cache dir deleted or replaced under a running process is
noticed by ``check_health`` and started afresh.

Lock order: ``_reopen_lock`` (swapping the index) before ``_lock`` (the
in-memory maps: handles, verified identities, access times, pins), which is
never held during I/O. A part's verification lock (``_verify_locks``) is
taken before ``_lock`` and held across that part's checksum read, so
concurrent first readers of a part read it from disk once. SQLite's own
write lock (per transaction) is innermost: nothing of ours is taken inside it
except ``_lock`` for a moment in the eviction callback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import cachetools

from ..checksum import Buffer, crc64
from ..parts import PartRecord
from .admin import (
    cache_stats,
    clear_all,
    drop_object_parts,
    migrate_legacy_index,
    sweep,
    verify_parts,
)
from .eviction import CacheFullError, Evictor, Limits
from .index import ObjectRow, PartId, PartIndex, Totals, is_corrupt
from .partfiles import PartFiles, VerifiedPart
from .writers import writer_token

log = logging.getLogger("ossfs_resume.cache")

T = TypeVar("T")

#: A transient index failure is retried after this long.
RETRY_SECONDS = 5.0
#: A part write that works this soon after one failed is the same outage, not its end:
#: on a nearly full disk, writes fail and succeed in turn as eviction frees space, and
#: each turn would otherwise log "cannot write" and "accepts writes again" anew.
WRITE_RECOVERY_SECONDS = 5.0
INDEX_NAME = "index.db"
#: A version this process knows is recorded: (object id, part sizes).
KnownVersion = tuple[str, tuple[int, ...]]
#: Every SQLite database file starts with these bytes (written when WAL mode is set).
_SQLITE_HEADER = b"SQLite format 3\x00"


def object_id(store_id: str, bucket: str, key: str, etag: str) -> str:
    """Stable id of one object version; every part of it hangs off this id."""
    raw = "\0".join((store_id, bucket, key, etag)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


def name_id(store_id: str, bucket: str, key: str) -> str:
    raw = "\0".join((store_id, bucket, key)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


def default_cache_limit(root: Path) -> tuple[int, int]:
    """(size limit, free-space floor): 10% of the disk (at least 1 GiB) and 5% free (<= 4 GiB)."""
    st = os.statvfs(root)
    disk = st.f_blocks * st.f_frsize
    return max(disk // 10, 1 << 30), min(disk // 20, 4 << 30)


def make_private_dir(path: Path) -> None:
    """Create `path` (0700), or tighten an existing dir of ours that others can read."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)
        log.warning(
            "the cache dir %s was readable by others (mode %o); made it 0700",
            path,
            stat.S_IMODE(st.st_mode),
        )


def _tighten(path: Path) -> None:
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)


class _VerifyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class PartCache:
    """Part files under ``root/parts``, the index in ``root/index.db``."""

    def __init__(
        self,
        root: Path | str,
        *,
        max_bytes: int | None = None,
        min_free_bytes: int | None = None,
        open_handles: int = 64,
        connections: int = 4,
        repair: bool = True,
    ) -> None:
        self.root = Path(root)
        # False for maintenance commands: a damaged index is reported, never moved aside.
        self._repair = repair
        self._sweeper: threading.Thread | None = None
        make_private_dir(self.root)
        self.files = PartFiles(self.root)
        os.makedirs(self.files.dir, mode=0o700, exist_ok=True)
        self._connections = connections
        self._lock = threading.Lock()
        self._reopen_lock = threading.Lock()
        self._index: PartIndex | None = None
        self._retry_at = 0.0
        self._outage: str | None = None  # why the index is unusable, while it is
        self._write_fault: str | None = None  # why the last part write failed, until one works
        self._write_fault_at = 0.0  # when the last part write failed (monotonic)
        self._handles: cachetools.LRUCache[PartId, VerifiedPart] = cachetools.LRUCache(
            maxsize=open_handles
        )
        # Parts whose CRC this process checked, by file identity (ino, size, mtime_ns).
        self._verified: cachetools.LRUCache[PartId, tuple[int, int, int]] = cachetools.LRUCache(
            maxsize=1 << 16
        )
        self._verify_locks: dict[PartId, _VerifyLock] = {}
        self._touched: dict[PartId, float] = {}
        self._reading: dict[PartId, int] = {}  # parts being served right now: never evicted
        # Drops since a handle was opened: a handle opened before its part was dropped
        # must not be kept (see _open_and_check).
        self._drops = 0
        self._dropped: cachetools.LRUCache[PartId, int] = cachetools.LRUCache(maxsize=4096)
        self.hits = 0
        self.misses = 0
        self.fetched_bytes = 0
        self._unflushed = {"hits": 0, "misses": 0, "fetched": 0}
        # Object versions seen by opens, written by the next flush (note_version(defer=True)).
        self._pending_versions: dict[str, ObjectRow] = {}
        # A descriptor of the index file for the header check, kept open: closing any
        # descriptor of a file drops every POSIX lock this process holds on it, SQLite's
        # included, and another process would then delete the WAL under our connections.
        self._header_fd: tuple[int, int] | None = None  # (fd, inode)
        # Versions (object id, part sizes) by name id that this process recorded or found
        # recorded: opening one again needs no index read. Another process recording a
        # newer version meanwhile changes no byte served (parts are keyed by ETag).
        self._known_versions: cachetools.LRUCache[str, KnownVersion] = cachetools.LRUCache(
            maxsize=1 << 16
        )
        self._open_index(first=True)
        self.limits = self._settle_limits(max_bytes, min_free_bytes)
        self.evictor = Evictor(
            self._current_index,
            self.files,
            self.limits,
            busy=self._busy,
            forget=self._forget,
            before_pass=self._flush_quietly,
        )

    # -- the index and its faults -------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _open_index(self, *, first: bool = False) -> PartIndex | None:
        path = self.index_path
        try:
            fresh = not path.exists()
            index = PartIndex(path, connections=self._connections)
            if fresh:
                migrate_legacy_index(self.root, index)
            for extra in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                _tighten(extra)
        except sqlite3.Error as exc:
            if is_corrupt(exc) and self._repair:
                return self._replace_corrupt(exc, None)
            self._index_down(exc)
            return None
        except OSError as exc:
            self._index_down(exc)
            return None
        self._index = index
        if self._outage is not None and not first:
            log.warning("the cache index %s is usable again", path)
        self._outage = None
        return index

    def _current_index(self) -> PartIndex:
        index = self._index
        if index is None:
            raise sqlite3.OperationalError(self._outage or "the cache index is not open")
        return index

    def _usable(self) -> PartIndex | None:
        """The index, reopening it if an outage's retry time has come; None while down."""
        index = self._index
        if index is not None:
            return index
        if time.monotonic() < self._retry_at:
            return None
        with self._reopen_lock:
            if self._index is not None:
                return self._index
            if time.monotonic() < self._retry_at:
                return None
            return self._open_index()

    def _index_down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        if self._outage is None:
            log.warning(
                "the cache index %s is unusable (%s); reading straight from the store "
                "until it recovers",
                self.index_path,
                exc,
            )
        self._outage = str(exc)

    def _replace_corrupt(self, exc: BaseException, broken: PartIndex | None) -> PartIndex | None:
        """Move a damaged index aside and start a fresh one; its parts are swept as orphans."""
        path = self.index_path
        aside = path.with_name(f"index.broken-{int(time.time())}")
        log.warning(
            "the cache index %s is damaged (%s); moved it to %s and started a fresh one "
            "(cached parts will be fetched again)",
            path,
            exc,
            aside,
        )
        if broken is not None:
            broken.close()
        self._index = None
        try:
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(
                        path.with_name(path.name + suffix), aside.with_name(aside.name + suffix)
                    )
        except OSError as move_error:
            self._index_down(move_error)
            return None
        with self._lock:
            self._handles.clear()
            self._verified.clear()
        index = self._open_index()
        if index is not None:
            self.check_consistency(background=True)
        return index

    def _failed(self, exc: BaseException, index: PartIndex, *, confirmed: bool = False) -> None:
        """Handle an index error: corrupt -> replace; anything else -> an outage."""
        with self._reopen_lock:
            if self._index is not index:
                return  # already handled by another thread
            if is_corrupt(exc) and self._repair and (confirmed or self._really_corrupt()):
                self._replace_corrupt(exc, index)
                return
            index.close()
            self._index = None
            self._index_down(exc)

    def _really_corrupt(self) -> bool:
        """Confirm a "malformed" error with a fresh connection's quick check.

        After a write fails on a failing disk (EIO), SQLite can report the database
        as malformed to the other connections of the process: a disk fault, not a
        damaged file, and the cache must not be thrown away for it. A fresh
        connection then gets the I/O error itself, or finds the file sound.
        """
        try:
            conn = sqlite3.connect(self.index_path, timeout=1.0)
            try:
                row = conn.execute("PRAGMA quick_check(1)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return is_corrupt(exc)
        return row is None or row[0] != "ok"

    def _with_index(self, fn: Callable[[PartIndex], T], default: T) -> T:
        index = self._usable()
        if index is None:
            return default
        try:
            return fn(index)
        except sqlite3.Error as exc:
            self._failed(exc, index)
            return default

    def check_health(self) -> None:
        """Notice a cache dir deleted or replaced under us, and start afresh there."""
        index = self._index
        if index is None:
            self._usable()
            return
        try:
            st = os.stat(self.index_path)
            same = (st.st_dev, st.st_ino) == index.identity
        except OSError:
            same = False
        if same:
            if not self._header_intact():
                # SQLite may serve this process from its page cache for a long time;
                # others (and our next start) would find the file damaged.
                self._failed(
                    sqlite3.DatabaseError("file is not a database (header lost)"),
                    index,
                    confirmed=True,
                )
            return
        with self._reopen_lock:
            if self._index is not index:
                return
            log.warning(
                "the cache dir %s was removed or replaced; starting a fresh cache there",
                self.root,
            )
            index.close()
            self._index = None
            with self._lock:
                self._handles.clear()
                self._verified.clear()
            try:
                make_private_dir(self.root)
                os.makedirs(self.files.dir, mode=0o700, exist_ok=True)
            except OSError as exc:
                self._index_down(exc)
                return
            self._open_index()

    def _header_intact(self) -> bool:
        """False if the index file no longer starts with SQLite's header (overwritten or
        truncated under us); True if it does, or cannot be read right now.

        Read through a descriptor opened once per index file and closed only with the
        cache (see ``_header_fd``): never an open and close per check."""
        try:
            inode = os.stat(self.index_path).st_ino
            held = self._header_fd
            if held is None or held[1] != inode:
                fd = os.open(self.index_path, os.O_RDONLY | os.O_CLOEXEC)
                self._header_fd = (fd, inode)
                if held is not None:
                    os.close(held[0])  # a replaced file: our connections to it are gone
                held = self._header_fd
            return os.pread(held[0], len(_SQLITE_HEADER), 0) == _SQLITE_HEADER
        except OSError:
            return True  # a disk fault: the index reports it when it is used

    def _settle_limits(self, max_bytes: int | None, min_free_bytes: int | None) -> Limits:
        """One limit per cache dir: given values are stored for every process; else stored
        values are used; else the defaults."""
        default_max, default_floor = default_cache_limit(self.root)
        limits = Limits(
            max_bytes if max_bytes is not None else default_max,
            min_free_bytes if min_free_bytes is not None else default_floor,
        )

        def settle(index: PartIndex) -> None:
            for name, given in (("max_bytes", max_bytes), ("min_free_bytes", min_free_bytes)):
                if given is not None:
                    index.set_setting(name, given)
                else:
                    stored = index.setting(name)
                    if isinstance(stored, int):
                        setattr(limits, name, stored)

        self._with_index(settle, None)
        return limits

    def _reload_limits(self, index: PartIndex) -> None:
        for name in ("max_bytes", "min_free_bytes"):
            stored = index.setting(name)
            if isinstance(stored, int) and stored != getattr(self.limits, name):
                setattr(self.limits, name, stored)

    @property
    def max_bytes(self) -> int:
        return self.limits.max_bytes

    @property
    def min_free_bytes(self) -> int:
        return self.limits.min_free_bytes

    def close(self) -> None:
        self.evictor.stop()
        with contextlib.suppress(Exception):
            self.flush_access()
        with self._lock:
            self._handles.clear()
        index = self._index
        if index is not None:
            index.close()
        held, self._header_fd = self._header_fd, None
        if held is not None:
            with contextlib.suppress(OSError):
                os.close(held[0])  # after the index's connections: no lock left to drop

    # -- paths ------------------------------------------------------------

    @property
    def parts_dir(self) -> Path:
        return self.files.dir

    def object_dir(self, oid: str) -> Path:
        return self.files.object_dir(oid)

    def part_path(self, pid: PartId) -> Path:
        return self.files.path(pid)

    # -- lookups ----------------------------------------------------------

    def record(self, pid: PartId) -> PartRecord | None:
        return self._with_index(lambda index: index.part(pid), None)

    def has(self, pid: PartId) -> bool:
        return self.record(pid) is not None

    def is_verified(self, pid: PartId) -> bool:
        """True if this process checked the part's CRC already (no I/O: memory only)."""
        with self._lock:
            return pid in self._handles or pid in self._verified

    def _open_handle(self, pid: PartId) -> VerifiedPart | None:
        with self._lock:
            handle = self._handles.get(pid)
            if handle is None:
                return None
        if handle.unlinked():  # evicted by another process: let it go
            with self._lock:
                if self._handles.get(pid) is handle:
                    del self._handles[pid]
            return None
        with self._lock:
            self._touched[pid] = time.time()
        return handle

    @contextlib.contextmanager
    def _verifying(self, pid: PartId) -> Iterator[None]:
        """One verification of a part at a time; later callers wait and reuse its result."""
        with self._lock:
            entry = self._verify_locks.get(pid)
            if entry is None:
                entry = self._verify_locks[pid] = _VerifyLock()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.users -= 1
                if not entry.users:
                    del self._verify_locks[pid]

    def open_verified(self, pid: PartId) -> VerifiedPart | None:
        """A verified handle for a cached part, or None if it is not (validly) cached.

        The first use in this process reads the whole part and checks its
        CRC-64 (which also brings it into the page cache); a part that fails is
        dropped so the caller fetches it again.
        """
        handle = self._verified_handle(pid)
        self._count("hits" if handle is not None else "misses")
        return handle

    def _verified_handle(self, pid: PartId) -> VerifiedPart | None:
        handle = self._open_handle(pid)
        if handle is None:
            with self._verifying(pid):  # the thread we waited for may have opened it
                handle = self._open_handle(pid) or self._open_and_check(pid)
        return handle

    def _open_and_check(self, pid: PartId) -> VerifiedPart | None:
        with self._lock:
            drops = self._drops
        rec = self.record(pid)
        if rec is None:
            return None
        path = self.files.path(pid)
        try:
            handle = self.files.open(pid, rec.length)
            identity = handle.identity()
            with self._lock:
                known = self._verified.get(pid) == identity
            ok = known or self.files.check(handle, rec)
        except FileNotFoundError:
            if self._drop_if_still(pid, rec):
                log.warning("cached part %s is missing on disk; fetching it again", path)
            return None
        except OSError as exc:
            log.warning("cached part %s is unreadable (%s); fetching it again", path, exc)
            self.drop(pid)
            return None
        if not ok:
            self.drop(pid)
            return None
        with self._lock:
            # Dropped (evicted) while we opened it: serve this reader, keep nothing.
            if not (self._drops != drops and pid in self._dropped):
                self._handles[pid] = handle
                self._verified[pid] = identity
            self._touched[pid] = time.time()
        return handle

    def _drop_if_still(self, pid: PartId, rec: PartRecord) -> bool:
        """Drop a part whose file is missing, unless it was evicted meanwhile (then its row
        is gone by the time we hold the write lock). True if it really was missing."""

        def confirm(index: PartIndex) -> bool:
            with index.writing() as conn:
                if index.row_state(conn, pid) != "ready" or self.files.path(pid).exists():
                    return False
                return index.delete_part(conn, pid)

        dropped = self._with_index(confirm, False)
        self._forget(pid)
        return dropped

    def advise_willneed(self, pid: PartId) -> None:
        """Ask the kernel to read a verified part into the page cache, ahead of its reader.

        Parts are written with O_DIRECT and so are not in the page cache; this
        starts the disk read without waiting for it and without copying a byte
        into this process.
        """
        handle = self._verified_handle(pid)  # verified before: reopening reads nothing
        if handle is not None:
            with contextlib.suppress(OSError, ValueError):
                os.posix_fadvise(handle.file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    def touch(self, pid: PartId, *, hit: bool = False) -> None:
        """Count a use of a part served from memory, without an index write; `hit`: it was
        not fetched for this read (it came from a recent fetch kept in memory)."""
        with self._lock:
            self._touched[pid] = time.time()
        if hit:
            self._count("hits")

    def read(self, pid: PartId, offset: int, size: int) -> bytes | None:
        """Bytes of a cached part, or None if it is not (validly) cached."""
        buf = bytearray(size)
        n = self.read_into(pid, offset, memoryview(buf))
        return None if n is None else bytes(buf[:n])

    def read_into(self, pid: PartId, offset: int, view: memoryview) -> int | None:
        """Copy a cached part's bytes from `offset` into `view`; None if it is not (validly)
        cached, else the bytes copied (fewer only past the part's end).

        The part is pinned while it is read, so this process never evicts it
        mid-read (another process evicting it is harmless: the open file
        outlives its name).
        """
        with self._lock:
            self._reading[pid] = self._reading.get(pid, 0) + 1
        try:
            handle = self.open_verified(pid)
            if handle is None:
                return None
            try:
                return handle.preadinto(offset, view)
            except OSError as exc:
                log.warning("cached part %s is unreadable (%s); fetching it again", pid, exc)
                self.drop(pid)
                return None
        finally:
            with self._lock:
                left = self._reading[pid] - 1
                if left:
                    self._reading[pid] = left
                else:
                    del self._reading[pid]

    def _busy(self) -> set[PartId]:
        with self._lock:
            return set(self._reading)

    # -- writes -----------------------------------------------------------

    def store(self, pid: PartId, data: Buffer) -> bool:
        """Store a part durably; True if it is in the cache afterwards (or another writer
        is putting it there), False if the cache refused it (one warning per outage)."""
        length = len(memoryview(data))
        crc = crc64(data)
        writer = writer_token()
        index = self._usable()
        if index is None:
            return False
        record = PartRecord(length, crc, time.time(), 0)  # hits=0: fetched, not yet read
        try:
            if not self.evictor.reserve(pid, record, writer):
                return True
        except CacheFullError as exc:
            log.debug("not caching part %s: %s", pid, exc)
            return False
        except sqlite3.Error as exc:
            self._failed(exc, index)
            return False
        except OSError as exc:  # statvfs of a vanished dir, and the like
            self._write_failed(exc)
            return False
        try:
            self.files.write(pid, data, writer)
        except OSError as exc:
            self._abandon(index, pid, writer)
            self._write_failed(exc)
            return False
        try:
            committed = index.commit_part(pid, writer)
        except sqlite3.Error as exc:
            self.files.unlink(pid)  # no row will say it is there: do not leave it behind
            self._failed(exc, index)
            return False
        if not committed:  # dropped (clear, a new version) while we wrote: not ours to keep
            self.files.unlink(pid)
            return False
        with contextlib.suppress(OSError):
            st = os.stat(self.files.path(pid))
            with self._lock:
                # We checksummed these very bytes: serve them without re-reading.
                self._verified[pid] = (st.st_ino, st.st_size, st.st_mtime_ns)
        if (
            self._write_fault is not None
            and time.monotonic() - self._write_fault_at >= WRITE_RECOVERY_SECONDS
        ):
            log.warning("the cache at %s accepts writes again", self.root)
            self._write_fault = None
        return True

    def _abandon(self, index: PartIndex, pid: PartId, writer: str) -> None:
        def undo(ix: PartIndex) -> None:
            with ix.writing() as conn:
                ix.delete_part(conn, pid, writer=writer)

        try:
            undo(index)
        except sqlite3.Error as exc:
            self._failed(exc, index)  # the start-up check sweeps the reservation

    def _write_failed(self, exc: OSError) -> None:
        if self._write_fault is None:
            log.warning(
                "cannot write to the cache at %s (%s); reading straight from the store",
                self.root,
                exc,
            )
        self._write_fault = str(exc)
        self._write_fault_at = time.monotonic()

    def index_problem(self) -> str | None:
        """Why the index cannot be used right now, or None if it can."""
        return None if self._usable() is not None else (self._outage or "unusable")

    def writes_refused(self) -> str | None:
        """Why the cache refuses writes right now (a disk or index fault), or None."""
        if self._write_fault is not None:
            return self._write_fault
        if self._index is None:
            return self._outage or "the cache index is unusable"
        return None

    def drop(self, pid: PartId) -> None:
        """Forget a part: its file and row go together."""

        def remove(index: PartIndex) -> None:
            with index.writing() as conn:
                self.files.unlink(pid)
                index.delete_part(conn, pid)

        self._with_index(remove, None)
        self._forget(pid)

    def _forget(self, pid: PartId) -> None:
        """Drop this process's open handle and verification memo of a part."""
        with self._lock:
            self._handles.pop(pid, None)
            self._verified.pop(pid, None)
            self._drops += 1
            self._dropped[pid] = self._drops

    def drop_object(self, oid: str, size: int = 0, part_sizes: list[int] | None = None) -> None:
        """Forget every part of one object version (files with their rows)."""
        self._with_index(lambda index: drop_object_parts(index, self.files, oid), 0)
        with self._lock:
            for pid in [p for p in self._handles if p.object_id == oid]:
                self._handles.pop(pid, None)
            for pid in [p for p in self._verified if p.object_id == oid]:
                self._verified.pop(pid, None)
            self._drops += 1

    # -- accounting -------------------------------------------------------

    def totals(self) -> Totals:
        return self._with_index(lambda index: index.totals(), Totals(0, 0, 0))

    def used_bytes(self) -> int:
        return self.totals().bytes

    def _count(self, name: str, amount: int = 1) -> None:
        """In-memory statistics, flushed with the access times (no write per read)."""
        with self._lock:
            self._unflushed[name] += amount
            if name == "hits":
                self.hits += amount
            elif name == "misses":
                self.misses += amount
            elif name == "fetched":
                self.fetched_bytes += amount

    def note_fetched(self, nbytes: int) -> None:
        self._count("fetched", nbytes)

    def flush_access(self) -> None:
        """Write the accesses counted in memory to the index, in one transaction each.

        Called every second or so by the mount's housekeeping, which is also
        when the shared limits are reread and handles to evicted parts let go.
        """
        with self._lock:
            touched, self._touched = self._touched, {}
            counts = self._unflushed
            self._unflushed = {"hits": 0, "misses": 0, "fetched": 0}
            stale = [pid for pid, h in self._handles.items() if h.unlinked()]
            for pid in stale:
                self._handles.pop(pid, None)

        with self._lock:
            versions, self._pending_versions = list(self._pending_versions.values()), {}
        if versions:
            self._record_versions(versions)

        def flush(index: PartIndex) -> None:
            index.add_counters(counts)
            index.touch_parts(touched.items())
            self._reload_limits(index)

        self._with_index(flush, None)

    def _flush_quietly(self) -> None:
        with contextlib.suppress(sqlite3.Error, OSError):
            self.flush_access()

    # -- maintenance (see admin.py) -----------------------------------------

    def stats(self) -> dict[str, int | float]:
        self.flush_access()
        return cache_stats(self._current_index(), self.limits)

    def verify_all(self) -> tuple[int, list[Path]]:
        """Check every part's CRC-64; drop the bad ones. Returns (checked, bad paths)."""
        checked, bad = verify_parts(self._current_index(), self.files)
        for pid in bad:
            self._forget(pid)
        return checked, [self.files.path(pid) for pid in bad]

    def clear(self) -> int:
        """Forget every part and object; returns the parts dropped."""
        with self._lock:
            self._handles.clear()
            self._verified.clear()
            self._drops += 1
        return clear_all(self._current_index(), self.files)

    def clear_object(self, store_id: str, bucket: str, key: str) -> bool:
        """Forget every cached version of one object; False if none was cached."""
        index = self._current_index()
        row = index.object_by_name(name_id(store_id, bucket, key))
        if row is None:
            return False
        self.drop_object(row.oid)
        with index.writing() as conn:
            index.delete_object(conn, row.name_id)
        return True

    def check_consistency(self, *, background: bool = False) -> int:
        """The start-up check: rows whose data is missing or the wrong length are dropped;
        part files without a row and temp files of dead writers are removed.

        With `background`, runs in a thread of its own (reads need not wait) and
        returns 0. Checksums are left to first use or `cache verify`: reading
        every part at start-up would make mounting cost as much as the cache is large.
        """
        if background:
            if self._sweeper is None or not self._sweeper.is_alive():
                self._sweeper = threading.Thread(
                    target=self._sweep_logged, name="cache-check", daemon=True
                )
                self._sweeper.start()
            return 0
        return self._with_index(lambda index: sweep(index, self.files), 0)

    def _sweep_logged(self) -> None:
        try:
            dropped = self._with_index(lambda index: sweep(index, self.files), 0)
        except OSError as exc:
            log.warning("the cache check of %s stopped: %s", self.root, exc)
            return
        if dropped:
            log.warning("dropped %d cache index rows whose data was missing", dropped)

    # -- object versions --------------------------------------------------

    def note_version(
        self,
        store_id: str,
        bucket: str,
        key: str,
        etag: str,
        size: int,
        part_size: int,
        *,
        defer: bool = False,
    ) -> str:
        """Record the version of `key` in use; drop parts of the version it replaces.

        Returns the object id for this version. A version already recorded with
        this part size costs one indexed read and no write (none at all once this
        process has seen it). With `defer` (a mount's open), the version is
        checked and recorded by the next ``flush_access`` instead of now: parts
        are keyed by ETag, so a row written a second later changes nothing a read
        sees, and an open neither reads the index nor queues behind the part
        writes for its write lock.
        """
        oid = object_id(store_id, bucket, key, etag)
        nid = name_id(store_id, bucket, key)
        with self._lock:
            seen = self._known_versions.get(nid)
        if seen is not None and seen[0] == oid and part_size in seen[1]:
            return oid
        version = ObjectRow(nid, oid, bucket, key, etag, size, (part_size,))
        if defer:
            with self._lock:
                self._pending_versions[nid] = version
            return oid

        def known(index: PartIndex) -> ObjectRow | None:
            return index.object_by_name(nid)

        row = self._with_index(known, None)
        if row is not None and row.oid == oid and part_size in row.part_sizes:
            with self._lock:
                self._known_versions[nid] = (oid, row.part_sizes)
            return oid
        self._record_versions([version])
        return oid

    def _record_versions(self, rows: list[ObjectRow]) -> None:
        """Write object versions in one transaction; drop the parts of versions replaced."""

        def record(
            index: PartIndex,
        ) -> tuple[list[tuple[ObjectRow, ObjectRow]], dict[str, KnownVersion]]:
            replaced = []
            recorded: dict[str, KnownVersion] = {}  # remembered once committed
            with index.writing() as conn:
                for row in rows:
                    old = index.object_in(conn, row.name_id)
                    if old is not None and old.oid == row.oid:
                        sizes = tuple(sorted({*old.part_sizes, *row.part_sizes}))
                        if sizes != old.part_sizes:
                            index.put_object(conn, old._replace(part_sizes=sizes))
                        recorded[row.name_id] = (row.oid, sizes)
                        continue
                    index.put_object(conn, row)
                    recorded[row.name_id] = (row.oid, row.part_sizes)
                    if old is not None:
                        replaced.append((old, row))
            return replaced, recorded

        replacements, recorded = self._with_index(record, ([], {}))
        with self._lock:
            self._known_versions.update(recorded)
        for old, row in replacements:
            log.info(
                "%s changed (ETag %s -> %s); dropping the old version's cached parts",
                row.key,
                old.etag,
                row.etag,
            )
            self.drop_object(old.oid)
