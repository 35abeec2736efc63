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
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from .cache import PartStore
from .client import ObjectMeta, StoreClient
from .engine import ObjectRef, PartFetcher
from .errors import CacheWriteError, UsageError
from .parts import part_bounds

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


def prefetch_object(
    client: StoreClient,
    cache: PartStore,
    meta: ObjectMeta,
    part_size: int,
    *,
    threads: int = 8,
    progress: ProgressCallback | None = None,
) -> PrefetchResult:
    """Fetch every part of `meta` that the cache lacks, `threads` at a time."""
    if threads < 1:
        raise UsageError(f"bad thread count {threads}: must be at least 1")
    oid = cache.note_version(
        client.config.store_id, client.config.bucket, meta.key, meta.etag, meta.size, part_size
    )
    ref = ObjectRef(meta, oid, part_size)
    missing = [n for n in range(ref.parts) if not cache.has(ref.part_id(n))]
    done = meta.size - sum(part_bounds(meta.size, part_size, n)[1] for n in missing)
    log.info(
        "prefetch %s: %d of %d parts cached, fetching %d with %d threads",
        client.describe(meta.key),
        ref.parts - len(missing),
        ref.parts,
        len(missing),
        threads,
    )
    lock = threading.Lock()
    consumed = done
    if progress:
        progress(consumed, meta.size)

    fetcher = PartFetcher(client, cache, max_parallel=1)

    def fetch(number: int) -> int:
        nonlocal consumed
        fetcher.fetch(ref, number, durable=True)
        # A part evicted again by a concurrent eviction is not a fault (the cache is
        # smaller than what is being put in it); a disk or index that refuses is.
        refused = None if cache.has(ref.part_id(number)) else cache.writes_refused()
        if refused:
            raise CacheWriteError(
                f"cannot write to the cache at {cache.root} ({refused}); "
                f"prefetch of {client.describe(meta.key)} stopped"
            )
        length = part_bounds(meta.size, part_size, number)[1]
        with lock:
            consumed += length
            if progress:
                progress(consumed, meta.size)
        return length

    fetched = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prefetch") as pool:
        futures = [pool.submit(fetch, n) for n in missing]
        try:
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: finished parts are already recorded
            for f in futures:
                f.cancel()
            raise
        for f in futures:
            f.cancel()
        for f in finished:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
            fetched += f.result()
    fetcher.shutdown()
    return PrefetchResult(meta, ref.parts, len(missing), fetched)


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
