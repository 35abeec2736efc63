"""The stand-in for a cache dir that cannot be used at all: every read goes to the store.

It has the part cache's interface (``PartStore``), not its implementation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..checksum import Buffer
from ..parts import PartRecord
from .index import PartId, Totals
from .partcache import object_id
from .partfiles import VerifiedPart

log = logging.getLogger("ossfs_resume.cache")


class UncachedParts:
    """Answers "not cached" to every lookup and refuses every write."""

    max_bytes = 0
    min_free_bytes = 0

    def __init__(self, root: Path | str, reason: str, *, warn: bool = True) -> None:
        self.root = Path(root)
        self.reason = reason
        self.hits = 0
        self.misses = 0
        if warn:  # not when no cache was asked for (a download with --no-cache)
            log.warning(
                "the cache dir %s is unusable (%s); reading straight from the store", root, reason
            )

    def record(self, pid: PartId) -> PartRecord | None:
        return None

    def has(self, pid: PartId) -> bool:
        return False

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

    def writes_refused(self) -> str | None:
        return self.reason

    def drop(self, pid: PartId) -> None:
        return None

    def drop_object(self, oid: str, size: int = 0, part_sizes: list[int] | None = None) -> None:
        return None

    def note_fetched(self, nbytes: int) -> None:
        return None

    def totals(self) -> Totals:
        return Totals(0, 0, 0)

    def used_bytes(self) -> int:
        return 0

    def flush_access(self) -> None:
        return None

    def check_health(self) -> None:
        return None

    def check_consistency(self, *, background: bool = False) -> int:
        return 0

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
        return object_id(store_id, bucket, key, etag)

    def close(self) -> None:
        return None
