"""The persistent part cache: an index that is the checkpoint, part files, eviction, admin.

Pieces, each with one job:
- ``index``: the SQLite index (parts, objects, totals, settings), a fixed connection pool;
- ``partfiles``: part files on disk: durable writes, verified handles, checksum checks;
- ``eviction``: reservations shared by every process, and eviction to the limit;
- ``admin``: stats, verify, clear, the start-up sweep, migrating an earlier index;
- ``partcache``: ``PartCache``, which puts them together and turns faults into
  "not cached" answers;
- ``uncached``: ``UncachedParts``, the stand-in for a cache dir that cannot be used.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Protocol

from ..checksum import Buffer
from ..parts import PartRecord
from .index import PartId, Totals
from .partcache import INDEX_NAME, PartCache, default_cache_limit, name_id, object_id
from .partfiles import CHECK_CHUNK, VerifiedPart
from .uncached import UncachedParts

__all__ = [
    "CHECK_CHUNK",
    "INDEX_NAME",
    "PartCache",
    "PartId",
    "PartRecord",
    "PartStore",
    "Totals",
    "UncachedParts",
    "VerifiedPart",
    "default_cache_limit",
    "name_id",
    "object_id",
    "open_cache",
]

log = logging.getLogger("ossfs_resume.cache")


class PartStore(Protocol):
    """What the reader, the file system and prefetch need of a part cache."""

    root: Path
    hits: int
    misses: int

    def record(self, pid: PartId) -> PartRecord | None: ...
    def has(self, pid: PartId) -> bool: ...
    def open_verified(self, pid: PartId) -> VerifiedPart | None: ...
    def is_verified(self, pid: PartId) -> bool: ...
    def advise_willneed(self, pid: PartId) -> None: ...
    def read_into(self, pid: PartId, offset: int, view: memoryview) -> int | None: ...
    def touch(self, pid: PartId, *, hit: bool = False) -> None: ...
    def store(self, pid: PartId, data: Buffer) -> bool: ...
    def writes_refused(self) -> str | None: ...
    def drop(self, pid: PartId) -> None: ...
    def drop_object(self, oid: str, size: int = 0, part_sizes: list[int] | None = None) -> None: ...
    def note_fetched(self, nbytes: int) -> None: ...
    def flush_access(self) -> None: ...
    def check_health(self) -> None: ...
    def check_consistency(self, *, background: bool = False) -> int: ...
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
    ) -> str: ...
    def close(self) -> None: ...


def open_cache(
    root: Path | str, *, max_bytes: int | None = None, min_free_bytes: int | None = None
) -> PartCache | UncachedParts:
    """The part cache at `root`, or a pass-through stand-in (with one warning) if the
    dir cannot be used at all. An index that is only unusable for now (a full disk, a
    lock) still gives a PartCache: it reads from the store until the index recovers."""
    try:
        return PartCache(root, max_bytes=max_bytes, min_free_bytes=min_free_bytes)
    except (OSError, sqlite3.Error) as exc:
        return UncachedParts(root, str(exc))


def cache_exists(root: Path | str) -> bool:
    """True if `root` holds a part cache (this version's index or an earlier one)."""
    root = Path(root)
    return (root / INDEX_NAME).is_file() or (root / "index" / "cache.db").is_file()
