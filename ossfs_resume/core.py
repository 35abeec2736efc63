"""The mounted filesystem without FUSE: paths in, stat dicts and bytes out.

Like a MountSource: everything a mount does is testable without mounting.
The FUSE adapter (fuse_ops.py) only translates calls and errors, and logs
failures: the core raises :class:`FsError` with the whole story in its message
and logs only what it handles itself (degraded but working).

Degraded modes: a file whose cache bookkeeping fails at open is read straight
from the store; while the store is unreachable, files are opened from the last
listing and their cached parts served (uncached parts fail fast with EIO).

Concurrency: ``_lock`` guards the open-file table and the warned-path set only.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cachetools

from .cache import PartStore, UncachedParts, object_id
from .engine import ObjectRef, PartFetcher
from .errors import OssfsError, PreconditionFailedError
from .namespace import Entry, Namespace
from .objectstore import ObjectMeta, ObjectStore
from .parts import DEFAULT_PART_SIZE
from .prefetch import SOURCE_XATTR, MountedSource
from .reader import ObjectReader
from .shared import SharedTier

log = logging.getLogger(__name__)


class FsError(OSError):
    """An errno for the FUSE layer to return.

    `failure` marks a store or cache failure, which the adapter logs (once, with
    the operation and path); without it the errno is a plain answer (ENOENT for a
    name that is not there, EROFS, ...) and nothing is logged.
    """

    def __init__(self, code: int, message: str = "", *, failure: bool = False) -> None:
        super().__init__(code, message or os.strerror(code))
        self.failure = failure

    @classmethod
    def of(cls, exc: OssfsError) -> FsError:
        """The store or cache failure `exc`, as its errno."""
        return cls(exc.errno, str(exc), failure=True)


#: Default of --memory-limit: keeps peak RSS streaming any file under 200 MiB.
DEFAULT_MEMORY_LIMIT = 128 << 20
#: Parallel fetches derived from the memory limit stay within these bounds.
MIN_DERIVED_PARALLEL, MAX_DERIVED_PARALLEL = 4, 64
#: The read-ahead window is at most this many parts, whatever the memory limit.
MAX_READAHEAD_PARTS = 256


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory limit for part data is spent: parts in flight, read-ahead, budget."""

    max_parallel: int
    max_readahead_parts: int
    max_inflight_bytes: int


def plan_memory(memory_limit: int, part_size: int, max_parallel: int | None = None) -> MemoryPlan:
    """Spend `memory_limit` bytes of part data (fetched, in flight, kept for readers).

    The read-ahead window is as many parts as fit; unless given, the parallel
    fetches follow it (4..64): a larger limit buys more GETs at once, which is
    what a long link needs (each connection is slow, many are not). Raises
    ValueError when fewer than two parts fit (a reader and its next part).
    """
    parts = memory_limit // part_size
    if parts < 2:
        raise ValueError("must hold at least 2 parts")
    if max_parallel is None:
        max_parallel = max(MIN_DERIVED_PARALLEL, min(MAX_DERIVED_PARALLEL, parts))
    return MemoryPlan(max_parallel, min(parts, MAX_READAHEAD_PARTS), memory_limit)


@dataclass
class MountOptions:
    prefix: str = ""
    part_size: int = DEFAULT_PART_SIZE
    list_ttl: float = 10.0
    # 16 GETs, 16 parts of read-ahead: enough to fill a link with 20 ms of latency
    # and per-connection caps; the byte budget bounds memory (peak RSS) whatever the file.
    max_parallel: int = 16
    max_readahead_parts: int = 16
    max_inflight_bytes: int = 128 << 20
    access_flush_seconds: float = 1.0
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    file_mode: int = 0o444
    dir_mode: int = 0o555


class BucketFS:
    def __init__(
        self,
        client: ObjectStore,
        cache: PartStore,
        options: MountOptions,
        *,
        shared: SharedTier | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.options = options
        self.shared = shared
        self.namespace = Namespace(client, options.prefix, list_ttl=options.list_ttl)
        self.fetcher = PartFetcher(
            client,
            cache,
            max_parallel=options.max_parallel,
            max_inflight_bytes=options.max_inflight_bytes,
            shared=shared,
        )
        self._lock = threading.Lock()
        self._open: dict[int, ObjectReader] = {}
        # ETag each key had at its last open: unchanged -> the kernel may keep its page cache.
        self._last_etag: cachetools.LRUCache[str, str] = cachetools.LRUCache(maxsize=65536)
        self._keep: dict[int, bool] = {}
        self._fh = itertools.count(1)
        # Files opened offline since the store was last reachable: warned about once.
        self._offline_warned: cachetools.LRUCache[str, bool] = cachetools.LRUCache(maxsize=4096)
        # Reads around a cache whose bookkeeping failed; made on first need.
        self._direct: PartFetcher | None = None
        self._mounted_at = time.time()
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(
            target=self._housekeeping, name="cache-housekeeping", daemon=True
        )
        self._housekeeper.start()

    def _housekeeping(self) -> None:
        """Start the cache's check in the background, then every second or so: notice a
        cache dir removed under us, flush access times, let go of evicted parts."""
        try:
            self.cache.check_consistency(background=True)
        except Exception as exc:
            _log_failure("the cache consistency check failed", exc)
        failing = False
        while not self._stop.wait(self.options.access_flush_seconds):
            try:
                self.cache.check_health()
                self.cache.flush_access()
                failing = False
            except Exception as exc:
                # Once per run of failures: a broken disk must not log every second.
                if not failing:
                    _log_failure("cache housekeeping failed", exc)
                failing = True

    def close(self) -> None:
        self._stop.set()
        self._housekeeper.join(timeout=10)
        # Each step on its own: a broken cache must not leave the client open.
        fetchers = [self.fetcher] if self._direct is None else [self.fetcher, self._direct]
        steps = [f.shutdown for f in fetchers]
        if self.shared is not None:
            # Before the cache: queued tier puts read their parts back from it.
            steps += [self.shared.close, self.shared.store.close]
        steps += [self.cache.close, self.client.close]
        for step in steps:
            try:
                step()
            except Exception as exc:
                _log_failure(f"closing the mount: {step.__qualname__} failed", exc)

    # -- metadata ---------------------------------------------------------

    def _entry(self, path: str) -> Entry:
        try:
            entry = self.namespace.lookup(path)
        except OssfsError as exc:
            raise FsError.of(exc) from exc
        if entry is None:
            raise FsError(errno.ENOENT)
        return entry

    def getattr(self, path: str) -> dict[str, int | float]:
        entry = self._entry(path)
        opts = self.options
        if entry.is_dir:
            mode, size, nlink, mtime = stat.S_IFDIR | opts.dir_mode, 0, 2, self._mounted_at
        else:
            mode, size, nlink, mtime = stat.S_IFREG | opts.file_mode, entry.size, 1, entry.mtime
        ns = int(mtime * 1e9)
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": opts.uid,
            "st_gid": opts.gid,
            "st_mtime": ns,
            "st_ctime": ns,
            "st_atime": ns,
            "st_blksize": 1 << 20,
            "st_blocks": (size + 511) // 512,
        }

    def readdir(self, path: str) -> list[str]:
        entry = self._entry(path)
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR)
        try:
            names = list(self.namespace.listdir(path))
        except OssfsError as exc:
            raise FsError.of(exc) from exc
        return [".", "..", *names]

    def statfs(self) -> dict[str, int]:
        # A bucket has no fixed size; report the cache's disk so df shows something true.
        try:
            st = os.statvfs(self.cache.root)
        except OSError:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}
        return {
            "f_bsize": st.f_bsize,
            "f_frsize": st.f_frsize,
            "f_blocks": st.f_blocks,
            "f_bfree": st.f_bfree,
            "f_bavail": st.f_bavail,
            "f_files": 1 << 20,
            "f_ffree": 1 << 20,
            "f_favail": 1 << 20,
            "f_namemax": 255,
        }

    # -- data -------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        entry = self._entry(path)
        if entry.is_dir:
            raise FsError(errno.EISDIR)
        meta = ObjectMeta(entry.key, entry.size, entry.etag, entry.mtime)
        if not meta.etag:
            try:
                meta = self.client.head(entry.key)
            except OssfsError as exc:
                raise FsError.of(exc) from exc
        self._warn_if_offline(path, meta)
        cfg = self.client.config
        fetcher = self.fetcher
        try:
            oid = self.cache.note_version(
                cfg.store_id,
                cfg.bucket,
                meta.key,
                meta.etag,
                meta.size,
                self.options.part_size,
                defer=True,  # recorded by the next flush: an open never waits for the write lock
            )
        except Exception as exc:
            # The cache's bookkeeping failed, not the file: read it around the cache.
            log.warning(
                "open %s: the part cache failed (%s: %s); reading the file straight from the store",
                path,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            oid = object_id(cfg.store_id, cfg.bucket, meta.key, meta.etag)
            fetcher = self._direct_fetcher(exc)
        ref = ObjectRef(meta, oid, self.options.part_size)
        reader = ObjectReader(fetcher, ref, max_readahead_parts=self.options.max_readahead_parts)
        with self._lock:
            fh = next(self._fh)
            self._open[fh] = reader
            self._keep[fh] = self._last_etag.get(meta.key) == meta.etag
            self._last_etag[meta.key] = meta.etag
        return fh

    def _warn_if_offline(self, path: str, meta: ObjectMeta) -> None:
        """One warning per file opened from a listing kept because the store is unreachable."""
        name = path.strip("/")
        age = self.namespace.offline_age(name.rpartition("/")[0])
        with self._lock:
            if age is None:
                self._offline_warned.pop(name, None)  # online: a later outage warns again
                return
            if name in self._offline_warned:
                return
            self._offline_warned[name] = True
        log.warning(
            "store unreachable; serving /%s offline: version %s from the listing of %.0f s ago, "
            "its cached parts only",
            name,
            meta.etag,
            age,
        )

    def _direct_fetcher(self, reason: Exception) -> PartFetcher:
        """A fetcher that bypasses the cache (for files whose cache bookkeeping failed)."""
        with self._lock:
            if self._direct is None:
                self._direct = PartFetcher(
                    self.client,
                    UncachedParts(self.cache.root, f"{type(reason).__name__}: {reason}"),
                    max_parallel=self.options.max_parallel,
                    max_inflight_bytes=self.options.max_inflight_bytes,
                    shared=self.shared,
                )
            return self._direct

    def keep_cache(self, fh: int) -> bool:
        """True if the kernel may keep this file's page cache: same ETag as at its last open.

        A changed ETag (or a first open) answers False, and the kernel then drops
        the pages it cached for the file, so no read mixes two versions.
        """
        with self._lock:
            return self._keep.get(fh, False)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.read_into(fh, offset, memoryview(buf))
        return bytes(buf[:n])

    def read_into(self, fh: int, offset: int, view: memoryview) -> int:
        """Copy the file's bytes from `offset` into `view` (the FUSE reply buffer: no
        intermediate copy); returns the bytes copied, fewer only at the end of the file."""
        with self._lock:
            reader = self._open.get(fh)
        if reader is None:
            raise FsError(errno.EBADF)
        size = len(view)
        try:
            return reader.read_into(offset, view)
        except PreconditionFailedError as exc:
            ref = reader.ref
            # That version is gone from the store: forget its parts and its listing.
            self.namespace.invalidate(_parent(ref.meta.key, self.options.prefix))
            try:
                self.cache.drop_object(ref.object_id, ref.meta.size, [ref.part_size])
            except Exception as drop_exc:
                _log_failure("dropping the cached parts of a changed object failed", drop_exc)
            raise FsError(
                errno.EIO,
                f"at {offset}: the object changed since it was opened (ETag {ref.meta.etag}); "
                "failing the read rather than mixing versions",
                failure=True,
            ) from exc
        except OssfsError as exc:
            raise FsError(errno.EIO, f"at {offset}+{size}: {exc}", failure=True) from exc

    def getxattr(self, path: str, name: str) -> bytes:
        """SOURCE_XATTR names a file's store, key and cache, so `prefetch PATH` can fill it."""
        entry = self._entry(path)
        if name != SOURCE_XATTR or entry.is_dir:
            raise FsError(errno.ENODATA)
        cfg = self.client.config
        return MountedSource(
            protocol=cfg.protocol,
            endpoint=cfg.endpoint,
            bucket=cfg.bucket,
            key=entry.key,
            region=cfg.region,
            signature_version=cfg.signature_version,
            addressing=cfg.addressing,
            anonymous=cfg.anonymous,
            cache_dir=str(self.cache.root),
            part_size=self.options.part_size,
        ).to_json()

    def listxattr(self, path: str) -> list[str]:
        return [] if self._entry(path).is_dir else [SOURCE_XATTR]

    def release(self, fh: int) -> None:
        with self._lock:
            self._open.pop(fh, None)
            self._keep.pop(fh, None)


def _log_failure(what: str, exc: Exception) -> None:
    """One line; the traceback only when debugging."""
    log.warning(
        "%s: %s: %s", what, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG)
    )


def _parent(key: str, prefix: str) -> str:
    rel = key[len(prefix) :] if prefix and key.startswith(prefix) else key
    return rel.rpartition("/")[0]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ossfs-resume"
