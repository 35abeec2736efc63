"""Persistent part cache: part data files plus an index that is the checkpoint.

Knows parts, nothing about FUSE or HTTP. A part is named by
(store, bucket, key, ETag) -> object id, plus part size and part number, so a
changed ETag can never serve old parts.

Write order (crash safety): data goes to a temp file, is fsynced, renamed
into place, the directory is fsynced, and only then is the index row written.
A crash at any point leaves either no row (the part is fetched again) or a row
whose data is durable. Each row carries the part's CRC-64, checked the first
time this process serves the part.

Concurrency: the index (diskcache, SQLite in WAL mode) is safe across threads
and processes, so a `prefetch` process and a mount can share one cache dir.
``_lock`` guards only the in-memory handle LRU and is never held during I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cachetools
import diskcache

from .checksum import Buffer, crc64
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


class PartCache:
    """Part files under ``root/parts``, index under ``root/index``."""

    def __init__(self, root: Path | str, *, open_handles: int = 64) -> None:
        self.root = Path(root)
        self.parts_dir = self.root / "parts"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.index = self._open_index()
        self._lock = threading.Lock()
        self._handles: cachetools.LRUCache[PartId, VerifiedPart] = cachetools.LRUCache(
            maxsize=open_handles
        )
        self._write_warned = False

    def _open_index(self) -> diskcache.Cache:
        path = self.root / "index"
        # "none": the index must never drop a row on its own; the cache's own
        # eviction removes data and row together.
        return diskcache.Cache(str(path), eviction_policy="none", size_limit=2**62)

    def close(self) -> None:
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
        value = self.index.get(pid.index_key)
        if not isinstance(value, str):
            return None
        length, _, crc = value.partition(":")
        return PartRecord(int(length), int(crc))

    def has(self, pid: PartId) -> bool:
        return self.record(pid) is not None

    def open_verified(self, pid: PartId) -> VerifiedPart | None:
        """A verified handle for a cached part, or None if it is not (validly) cached.

        The first use in this process reads the whole part and checks its
        CRC-64; a part that fails is dropped so the caller fetches it again.
        """
        with self._lock:
            handle = self._handles.get(pid)
        if handle is not None:
            return handle
        rec = self.record(pid)
        if rec is None:
            return None
        path = self.part_path(pid)
        try:
            handle = VerifiedPart(path, rec.length)
            data = os.pread(handle.file.fileno(), rec.length + 1, 0)
        except FileNotFoundError:
            log.warning("cached part %s is missing on disk; fetching it again", path)
            self.drop(pid)
            return None
        except OSError as exc:
            log.warning("cached part %s is unreadable (%s); fetching it again", path, exc)
            self.drop(pid)
            return None
        if len(data) != rec.length or crc64(data) != rec.crc:
            log.warning(
                "cached part %s failed its checksum (%d bytes, expected %d); "
                "dropping it and fetching it again",
                path,
                len(data),
                rec.length,
            )
            self.drop(pid)
            return None
        with self._lock:
            self._handles[pid] = handle
        return handle

    # -- writes -----------------------------------------------------------

    def store(self, pid: PartId, data: Buffer) -> bool:
        """Persist a part durably, then index it. False (with one warning) if the disk refuses."""
        crc = crc64(data)
        final = self.part_path(pid)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            self.index.set(pid.index_key, f"{len(data)}:{crc}")
            # We checksummed these very bytes: serve them without re-reading.
            handle = VerifiedPart(final, len(data))
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._warn_write(exc)
            return False
        with self._lock:
            self._handles[pid] = handle
        return True

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
        self.index.delete(pid.index_key)
        with self._lock:
            self._handles.pop(pid, None)
        with contextlib.suppress(OSError):
            self.part_path(pid).unlink()

    def drop_object(self, oid: str, size: int, part_sizes: list[int]) -> None:
        for part_size in part_sizes:
            for number in range(part_count(size, part_size)):
                self.index.delete(PartId(oid, part_size, number).index_key)
        with self._lock:
            for pid in [p for p in self._handles if p.object_id == oid]:
                self._handles.pop(pid, None)
        shutil.rmtree(self.object_dir(oid), ignore_errors=True)

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
