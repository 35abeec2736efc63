"""Prefetch whole objects into the part cache: parallel, resumable, with progress.

The cache's part index is the checkpoint: a part is recorded only once its
data is durable, so after a crash (even ``kill -9``) a rerun fetches only the
parts that are missing. The index is shared safely with a running mount, which
serves the parts fetched here without remounting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from .cache import PartStore
from .engine import ObjectRef, PartFetcher
from .errors import CacheWriteError, UsageError
from .objectstore import ObjectMeta, ObjectStore
from .parts import check_threads, part_bounds
from .progress import ProgressTracker

log = logging.getLogger(__name__)

#: Extended attribute a mount exposes on every file, naming its source and cache.
SOURCE_XATTR = "user.ossfs_resume.source"

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PrefetchResult:
    meta: ObjectMeta
    parts_total: int
    parts_fetched: int
    bytes_fetched: int


class CacheSink:
    """A transfer into the part cache: the engine stores each part; the index is the ledger."""

    into_cache = True

    def __init__(self, cache: PartStore, ref: ObjectRef, name: str) -> None:
        self.cache = cache
        self.ref = ref
        self.name = name

    def accept(self, number: int, data: memoryview) -> None:
        # A part evicted again by a concurrent eviction is not a fault (the cache is
        # smaller than what is being put in it); a disk or index that refuses is.
        if self.cache.has(self.ref.part_id(number)):
            return
        refused = self.cache.writes_refused()
        if refused:
            raise CacheWriteError(
                f"cannot write to the cache at {self.cache.root} ({refused}); "
                f"prefetch of {self.name} stopped"
            )

    def commit(self) -> None:
        return None  # each part was recorded by the cache when it became durable


def prefetch_object(
    client: ObjectStore,
    cache: PartStore,
    meta: ObjectMeta,
    part_size: int,
    *,
    threads: int = 8,
    progress: ProgressCallback | None = None,
) -> PrefetchResult:
    """Fetch every part of `meta` that the cache lacks, `threads` at a time."""
    threads = check_threads(threads)
    oid = cache.note_version(
        client.config.store_id, client.config.bucket, meta.key, meta.etag, meta.size, part_size
    )
    ref = ObjectRef(meta, oid, part_size)
    missing = [n for n in range(ref.parts) if not cache.has(ref.part_id(n))]
    name = client.describe(meta.key)
    log.info(
        "prefetch %s: %d of %d parts cached, fetching %d with %d threads",
        name,
        ref.parts - len(missing),
        ref.parts,
        len(missing),
        threads,
    )
    tracker = ProgressTracker(meta.size, progress)
    tracker.start(meta.size - sum(part_bounds(meta.size, part_size, n)[1] for n in missing))
    engine = PartFetcher(
        client,
        cache,
        max_parallel=threads,
        max_inflight_bytes=2 * threads * part_size,
        max_recent_bytes=0,
    )
    try:
        result = engine.transfer(
            ref, missing, CacheSink(cache, ref, name), threads=threads, progress=tracker.add
        )
    finally:
        engine.shutdown()
    tracker.finish()
    return PrefetchResult(meta, ref.parts, result.parts, result.bytes)


@dataclass(frozen=True)
class MountedSource:
    """What a mount says about one of its files (via SOURCE_XATTR)."""

    protocol: str
    endpoint: str
    bucket: str
    key: str
    region: str | None
    signature_version: str
    addressing: str
    anonymous: bool
    cache_dir: str
    part_size: int

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_path(cls, path: str) -> MountedSource:
        try:
            raw = os.getxattr(path, SOURCE_XATTR)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        except OSError:
            raise UsageError(
                f"{path} is not a file in an ossfs-resume mount; "
                "use oss://BUCKET/KEY with --endpoint and --cache-dir instead"
            ) from None
        return cls(**json.loads(raw))
