"""Persistent part cache: part data files plus an index that is the checkpoint.

Knows parts, nothing about FUSE or HTTP. A part is named by
(store, bucket, key, ETag) -> object id, plus part size and part number, so a
changed ETag can never serve old parts.

Write order (crash safety): data goes to a temp file, is fsynced, renamed
into place, the directory is fsynced, and only then is the index row written.
A crash at any point leaves either no row (the part is fetched again) or a row
whose data is durable. Each row carries the part's CRC-64, checked the first
time this process serves the part; the file's identity (inode, size, mtime)
is then remembered, so reopening it later in this process needs no re-read,
while a file replaced on disk is checked again.

Eviction is per part, before each write, when the cache would pass its size
limit or the disk its free-space floor. Parts touched in more than one access
window ("hot") outlive parts touched once, so a scan of cold data does not
flush a hot file. Reads never write the index: accesses are counted in memory
and flushed in one transaction every few seconds (``flush_access``).

Concurrency: the index (diskcache, SQLite in WAL mode) is safe across threads
and processes, so a `prefetch` process and a mount can share one cache dir;
the byte total is kept with diskcache's atomic ``incr``. ``_lock`` guards only
the in-memory maps (handles, verified identities, access times, pins) and is
never held during I/O; ``_evict_lock`` serialises this process's eviction
scans (taken before ``_lock``, never inside it). A part's verification lock
(``_verify_locks``) is taken before ``_lock`` and held across that part's
checksum read, so concurrent first readers of a part read it from disk once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cachetools
import diskcache

from .checksum import Buffer, crc64
from .durable import fsync_dir, write_all
from .parts import part_count

log = logging.getLogger(__name__)


def object_id(store_id: str, bucket: str, key: str, etag: str) -> str:
    """Stable id of one object version; every part of it hangs off this id."""
    raw = "\0".join((store_id, bucket, key, etag)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


def _name_id(store_id: str, bucket: str, key: str) -> str:
    raw = "\0".join((store_id, bucket, key)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class PartId:
    object_id: str
    part_size: int
    number: int

    @property
    def index_key(self) -> str:
        return f"p:{self.object_id}:{self.part_size}:{self.number}"


class PartRecord(NamedTuple):
    length: int
    crc: int
    atime: float = 0.0  # last access, as of the last flush
    hits: int = 0  # flush windows in which this part was read

    def encode(self) -> str:
        return f"{self.length}:{self.crc}:{self.atime:.0f}:{self.hits}"

    @classmethod
    def decode(cls, value: object) -> PartRecord | None:
        if not isinstance(value, str):
            return None
        fields = value.split(":")
        try:
            length, crc = int(fields[0]), int(fields[1])
            atime = float(fields[2]) if len(fields) > 2 else 0.0
            hits = int(fields[3]) if len(fields) > 3 else 0
        except (ValueError, IndexError):
            return None
        return cls(length, crc, atime, hits)


#: Index key of the byte total of all indexed parts.
BYTES_KEY = "meta:bytes"
#: Read size of checksum checks.
CHECK_CHUNK = 1 << 20
#: Temp files older than this are leftovers of a crash, not a write in progress.
STALE_TEMP_SECONDS = 600


def default_cache_limit(root: Path) -> tuple[int, int]:
    """(size limit, free-space floor): 10% of the disk (at least 1 GiB) and 5% free (<= 4 GiB)."""
    st = os.statvfs(root)
    disk = st.f_blocks * st.f_frsize
    return max(disk // 10, 1 << 30), min(disk // 20, 4 << 30)


class VerifiedPart:
    """An open, checksum-verified part file. Reads use pread: no seek state to share.

    Holds a file object, not a bare fd: a handle dropped from the LRU while a
    reader still uses it stays open until that reader lets go, so an fd number
    is never reused under a reader.
    """

    __slots__ = ("file", "length")

    def __init__(self, file: os.PathLike[str] | int, length: int) -> None:
        self.file = open(file, "rb", buffering=0)  # noqa: SIM115 - lives as long as the handle
        self.length = length

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.file.fileno(), size, offset)

    def preadinto(self, offset: int, view: memoryview) -> int:
        """Read into `view` (no intermediate copy); returns bytes read, short only at the end."""
        fd = self.file.fileno()
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                break
            done += n
        return done


class _VerifyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class PartCache:
    """Part files under ``root/parts``, index under ``root/index``."""

    def __init__(
        self,
        root: Path | str,
        *,
        max_bytes: int | None = None,
        min_free_bytes: int | None = None,
        open_handles: int = 64,
    ) -> None:
        self.root = Path(root)
        self.parts_dir = self.root / "parts"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        default_max, default_floor = default_cache_limit(self.root)
        self.max_bytes = default_max if max_bytes is None else max_bytes
        self.min_free_bytes = default_floor if min_free_bytes is None else min_free_bytes
        self.index = self._open_index()
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._reserved = 0  # bytes of parts being written by this process
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
        self._write_warned = False
        self._direct_io = True  # until the file system refuses O_DIRECT
        self._scratch = threading.local()  # per-thread buffer for checksum reads
        self.hits = 0
        self.misses = 0
        self._unflushed = {"hits": 0, "misses": 0, "fetched": 0}

    def _open_index(self) -> diskcache.Cache:
        path = self.root / "index"
        # "none": the index must never drop a row on its own; the cache's own
        # eviction removes data and row together.
        try:
            index = diskcache.Cache(str(path), eviction_policy="none", size_limit=2**62)
            index.get(BYTES_KEY)
            return index
        except (sqlite3.DatabaseError, OSError) as exc:
            aside = path.with_name(f"index.broken-{int(time.time())}")
            log.warning(
                "the cache index %s cannot be opened (%s); moved it to %s and started a "
                "fresh one (cached parts will be fetched again)",
                path,
                exc,
                aside,
            )
            os.replace(path, aside)
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            return diskcache.Cache(str(path), eviction_policy="none", size_limit=2**62)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush_access()
        with self._lock:
            self._handles.clear()
        self.index.close()

    # -- paths ------------------------------------------------------------

    def object_dir(self, oid: str) -> Path:
        return self.parts_dir / oid[:2] / oid

    def part_path(self, pid: PartId) -> Path:
        return self.object_dir(pid.object_id) / f"{pid.part_size}-{pid.number}"

    # -- lookups ----------------------------------------------------------

    def record(self, pid: PartId) -> PartRecord | None:
        return PartRecord.decode(self.index.get(pid.index_key))

    def has(self, pid: PartId) -> bool:
        return self.record(pid) is not None

    def is_verified(self, pid: PartId) -> bool:
        """True if this process checked the part's CRC already (no I/O: memory only)."""
        with self._lock:
            return pid in self._handles or pid in self._verified

    def _open_handle(self, pid: PartId) -> VerifiedPart | None:
        now = time.time()
        with self._lock:
            handle = self._handles.get(pid)
            if handle is not None:
                self._touched[pid] = now
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
        rec = self.record(pid)
        if rec is None:
            return None
        path = self.part_path(pid)
        try:
            handle = VerifiedPart(path, rec.length)
            st = os.fstat(handle.file.fileno())
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                known = self._verified.get(pid) == identity
            ok = known or self._check(handle, rec)
        except FileNotFoundError:
            log.warning("cached part %s is missing on disk; fetching it again", path)
            self.drop(pid)
            return None
        except OSError as exc:
            log.warning("cached part %s is unreadable (%s); fetching it again", path, exc)
            self.drop(pid)
            return None
        if not ok:
            self.drop(pid)
            return None
        with self._lock:
            self._handles[pid] = handle
            self._verified[pid] = identity
            self._touched[pid] = time.time()
        return handle

    def _check(self, handle: VerifiedPart, rec: PartRecord) -> bool:
        # Read in chunks into one small buffer per thread: whole-part buffers would cost
        # page faults per check and, across the fetch pool, a lot of idle memory.
        buf = getattr(self._scratch, "buf", None)
        if buf is None:
            buf = self._scratch.buf = memoryview(bytearray(CHECK_CHUNK))
        crc = n = 0
        while True:
            got = handle.preadinto(n, buf)
            if not got:
                break
            crc = crc64(buf[:got], crc)
            n += got
            if n > rec.length:
                break
        if n == rec.length and crc == rec.crc:
            return True
        log.warning(
            "cached part %s failed its checksum (%d bytes, expected %d); "
            "dropping it and fetching it again",
            handle.file.name,
            n,
            rec.length,
        )
        return False

    def advise_willneed(self, pid: PartId) -> None:
        """Ask the kernel to read a verified part into the page cache, ahead of its reader.

        Parts are written with O_DIRECT and so are not in the page cache; this
        starts the disk read without waiting for it and without copying a byte
        into this process.
        """
        handle = self._verified_handle(pid)  # verified before: reopening reads nothing
        if handle is not None:
            with contextlib.suppress(OSError):
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
            return None if handle is None else handle.preadinto(offset, view)
        finally:
            with self._lock:
                left = self._reading[pid] - 1
                if left:
                    self._reading[pid] = left
                else:
                    del self._reading[pid]

    # -- writes -----------------------------------------------------------

    def store(self, pid: PartId, data: Buffer) -> bool:
        """Persist a part durably, then index it. False (with one warning) if the disk refuses."""
        crc = crc64(data)
        final = self.part_path(pid)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.make_room(len(data), keep=pid)
        except OSError as exc:
            self._warn_write(exc)
            return False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if not write_all(tmp, memoryview(data), direct=self._direct_io):
                self._direct_io = False
            os.replace(tmp, final)
            fsync_dir(final.parent)
            # hits=0: fetched, not yet read; reads count the windows it is used in.
            self._index_part(pid, PartRecord(len(data), crc, time.time(), 0))
            # We checksummed these very bytes: serve them without re-reading.
            handle = VerifiedPart(final, len(data))
            st = os.fstat(handle.file.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._warn_write(exc)
            return False
        finally:
            self._release(len(data))
        with self._lock:
            self._handles[pid] = handle
            self._verified[pid] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return True

    def _index_part(self, pid: PartId, rec: PartRecord) -> None:
        with self.index.transact():
            old = PartRecord.decode(self.index.get(pid.index_key))
            self.index.set(pid.index_key, rec.encode())
            self.index.incr(BYTES_KEY, rec.length - (old.length if old else 0))

    def _warn_write(self, exc: OSError) -> None:
        if not self._write_warned:
            self._write_warned = True
            log.warning(
                "cannot write to the cache at %s (%s); reading straight from the store",
                self.root,
                exc,
            )

    def drop(self, pid: PartId) -> None:
        """Forget a part: index row first, so no reader is ever pointed at missing data."""
        self._unindex(pid)
        self._forget(pid)
        with contextlib.suppress(OSError):
            self.part_path(pid).unlink()

    def _forget(self, pid: PartId) -> None:
        """Drop this process's open handle and verification memo of a part."""
        with self._lock:
            self._handles.pop(pid, None)
            self._verified.pop(pid, None)

    def _unindex(self, pid: PartId) -> int:
        """Delete a part's row and count its bytes out; returns the bytes freed."""
        with self.index.transact():
            old = PartRecord.decode(self.index.get(pid.index_key))
            if old is None:
                return 0
            self.index.delete(pid.index_key)
            self.index.incr(BYTES_KEY, -old.length)
            return old.length

    def drop_object(self, oid: str, size: int, part_sizes: list[int]) -> None:
        for part_size in part_sizes:
            for number in range(part_count(size, part_size)):
                self._unindex(PartId(oid, part_size, number))
        with self._lock:
            for pid in [p for p in self._handles if p.object_id == oid]:
                self._handles.pop(pid, None)
            for pid in [p for p in self._verified if p.object_id == oid]:
                self._verified.pop(pid, None)
        shutil.rmtree(self.object_dir(oid), ignore_errors=True)

    # -- size limit and eviction ------------------------------------------

    def used_bytes(self) -> int:
        return int(self.index.get(BYTES_KEY, 0))

    def _count(self, name: str, amount: int = 1) -> None:
        """In-memory statistics, flushed with the access times (no write per read)."""
        with self._lock:
            self._unflushed[name] += amount
            if name == "hits":
                self.hits += amount
            elif name == "misses":
                self.misses += amount

    def note_fetched(self, nbytes: int) -> None:
        self._count("fetched", nbytes)

    def flush_access(self) -> None:
        """Write the accesses counted in memory to the index, in one transaction."""
        with self._lock:
            touched, self._touched = self._touched, {}
            counts = self._unflushed
            self._unflushed = {"hits": 0, "misses": 0, "fetched": 0}
        with self.index.transact():
            for name, amount in counts.items():
                if amount:
                    self.index.incr(f"stat:{name}", amount)
            for pid, atime in touched.items():
                rec = PartRecord.decode(self.index.get(pid.index_key))
                if rec is not None and atime > rec.atime:
                    self.index.set(
                        pid.index_key, rec._replace(atime=atime, hits=rec.hits + 1).encode()
                    )

    def _parts(self) -> list[tuple[PartId, PartRecord]]:
        out = []
        for key in self.index.iterkeys():
            if not isinstance(key, str) or not key.startswith("p:"):
                continue
            rec = PartRecord.decode(self.index.get(key))
            if rec is None:
                continue
            _, oid, part_size, number = key.split(":")
            out.append((PartId(oid, int(part_size), int(number)), rec))
        return out

    def _needs_room(self, incoming: int) -> bool:
        if self.used_bytes() + incoming > self.max_bytes:
            return True
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize - incoming < self.min_free_bytes

    def make_room(self, incoming: int, keep: PartId | None = None) -> None:
        """Reserve `incoming` bytes, evicting parts until they fit the limit and the floor.

        Parts used once go first, oldest first; then hot parts, oldest first.
        Evicts down to 90% of the limit, so a scan runs once per many writes.
        Parts being read right now are never evicted. The reservation stops
        parallel fetches from all passing the check before any of them writes;
        `store` releases it.
        """
        with self._evict_lock:
            pending = self._reserved + incoming
            if self._needs_room(pending):
                self._evict(pending, keep)
                st = os.statvfs(self.root)
                if st.f_bavail * st.f_frsize - pending < self.min_free_bytes:
                    # Nothing left to evict and the disk is at its floor: do not fill it.
                    raise OSError(errno.ENOSPC, "free space below the cache's floor")
            self._reserved += incoming

    def _release(self, nbytes: int) -> None:
        with self._evict_lock:
            self._reserved -= nbytes

    def _evict(self, pending: int, keep: PartId | None) -> None:
        self.flush_access()
        with self._lock:
            busy = set(self._reading)
        candidates = [(pid, rec) for pid, rec in self._parts() if pid != keep and pid not in busy]
        candidates.sort(key=lambda item: (item[1].hits > 1, item[1].atime))
        target = int(self.max_bytes * 0.9) - pending
        evicted = freed = 0
        for pid, _rec in candidates:
            if self.used_bytes() <= target and not self._needs_room(pending):
                break
            freed += self._unindex(pid)
            self._forget(pid)
            with contextlib.suppress(OSError):
                self.part_path(pid).unlink()
            evicted += 1
        log.info(
            "cache over its limit: evicted %d parts (%d bytes); %d of %d bytes in use",
            evicted,
            freed,
            self.used_bytes(),
            self.max_bytes,
        )

    # -- maintenance commands ---------------------------------------------

    def stats(self) -> dict[str, int | float]:
        self.flush_access()
        objects = sum(
            1 for key in self.index.iterkeys() if isinstance(key, str) and key.startswith("o:")
        )
        parts = self._parts()
        hits = int(self.index.get("stat:hits", 0))
        misses = int(self.index.get("stat:misses", 0))
        return {
            "objects": objects,
            "parts": len(parts),
            "bytes": sum(rec.length for _, rec in parts),
            "limit_bytes": self.max_bytes,
            "hits": hits,
            "misses": misses,
            "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
            "bytes_fetched": int(self.index.get("stat:fetched", 0)),
        }

    def verify_all(self) -> tuple[int, list[Path]]:
        """Check every part's CRC-64; drop the bad ones. Returns (checked, bad paths)."""
        checked, bad = 0, []
        for pid, rec in self._parts():
            path = self.part_path(pid)
            try:
                data = path.read_bytes()
                ok = len(data) == rec.length and crc64(data) == rec.crc
            except OSError:
                ok = False
            checked += 1
            if not ok:
                bad.append(path)
                self.drop(pid)
        return checked, bad

    def clear(self) -> int:
        """Forget every part and object; returns the parts dropped."""
        parts = self._parts()
        with self._lock:
            self._handles.clear()
            self._verified.clear()
        for pid, _ in parts:
            self._unindex(pid)
        for key in list(self.index.iterkeys()):
            if isinstance(key, str) and key.startswith("o:"):
                self.index.delete(key)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        return len(parts)

    def clear_object(self, store_id: str, bucket: str, key: str) -> bool:
        """Forget every cached version of one object; False if none was cached."""
        row_key = f"o:{_name_id(store_id, bucket, key)}"
        raw = self.index.get(row_key)
        if not isinstance(raw, str):
            return False
        record = json.loads(raw)
        self.drop_object(record["oid"], record.get("size", 0), record.get("part_sizes", []))
        self.index.delete(row_key)
        return True

    # -- start-up check ---------------------------------------------------

    def check_consistency(self) -> int:
        """Drop rows whose data is missing or the wrong length; sweep stale temp files.

        Returns how many rows were dropped. Checksums are left to first use
        (`open_verified`) or `cache verify`: reading every part at start-up
        would make mounting cost as much as the cache is large.
        """
        dropped = 0
        for pid, rec in self._parts():
            try:
                size = self.part_path(pid).stat().st_size
            except OSError:
                size = -1
            if size != rec.length:
                log.warning(
                    "cached part %s: data %s; dropping its index row",
                    self.part_path(pid),
                    "missing" if size < 0 else f"has {size} bytes, not {rec.length}",
                )
                self._unindex(pid)
                dropped += 1
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.parts_dir.glob("*/*/.*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
        return dropped

    # -- object versions --------------------------------------------------

    def note_version(
        self, store_id: str, bucket: str, key: str, etag: str, size: int, part_size: int
    ) -> str:
        """Record the version of `key` in use; drop parts of the version it replaces.

        Returns the object id for this version.
        """
        oid = object_id(store_id, bucket, key, etag)
        row_key = f"o:{_name_id(store_id, bucket, key)}"
        old = self.index.get(row_key)
        record = None
        if isinstance(old, str):
            with contextlib.suppress(ValueError):
                record = json.loads(old)
        if record and record.get("oid") == oid:
            if part_size in record.get("part_sizes", []):
                return oid
            record["part_sizes"].append(part_size)
        else:
            if record and record.get("oid"):
                log.info(
                    "%s changed (ETag %s -> %s); dropping the old version's cached parts",
                    key,
                    record.get("etag"),
                    etag,
                )
                self.drop_object(record["oid"], record.get("size", 0), record.get("part_sizes", []))
            record = {
                "bucket": bucket,
                "key": key,
                "etag": etag,
                "oid": oid,
                "size": size,
                "part_sizes": [part_size],
            }
        self.index.set(row_key, json.dumps(record))
        return oid


class UncachedParts(PartCache):
    """Stands in for the cache when its directory cannot be used: every read goes to the store."""

    def __init__(self, root: Path | str, reason: str) -> None:
        self.root = Path(root)
        self.max_bytes = self.min_free_bytes = 0
        self.hits = self.misses = 0
        log.warning(
            "the cache dir %s is unusable (%s); reading straight from the store", root, reason
        )

    def record(self, pid: PartId) -> PartRecord | None:
        return None

    def open_verified(self, pid: PartId) -> VerifiedPart | None:
        self.misses += 1
        return None

    def is_verified(self, pid: PartId) -> bool:
        return False

    def advise_willneed(self, pid: PartId) -> None:
        return None

    def read(self, pid: PartId, offset: int, size: int) -> bytes | None:
        return None

    def read_into(self, pid: PartId, offset: int, view: memoryview) -> int | None:
        return None

    def touch(self, pid: PartId, *, hit: bool = False) -> None:
        return None

    def store(self, pid: PartId, data: Buffer) -> bool:
        return False

    def drop(self, pid: PartId) -> None:
        return None

    def drop_object(self, oid: str, size: int, part_sizes: list[int]) -> None:
        return None

    def note_fetched(self, nbytes: int) -> None:
        return None

    def used_bytes(self) -> int:
        return 0

    def flush_access(self) -> None:
        return None

    def check_consistency(self) -> int:
        return 0

    def note_version(
        self, store_id: str, bucket: str, key: str, etag: str, size: int, part_size: int
    ) -> str:
        return object_id(store_id, bucket, key, etag)

    def close(self) -> None:
        return None


def open_cache(
    root: Path | str, *, max_bytes: int | None = None, min_free_bytes: int | None = None
) -> PartCache:
    """The part cache at `root`, or a pass-through stand-in (with one warning) if unusable."""
    try:
        return PartCache(root, max_bytes=max_bytes, min_free_bytes=min_free_bytes)
    except (OSError, sqlite3.Error) as exc:
        return UncachedParts(root, str(exc))
