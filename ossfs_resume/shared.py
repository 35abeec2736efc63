"""The shared part tier: parts fetched by one node, served to the others.

Many nodes mounting one bucket each fetch the same parts from the origin. With
a shared tier (a bucket, or a prefix of one, in a store close to the nodes),
a node that fetched a part from the origin also PUTs it there, in the
background, under a content address; the others find it there before going
to the origin. Read order: memory, local disk, shared tier, origin.

A part's object is addressed by the sha256 of its identity (store, bucket,
key, ETag, part size, number), so a changed object never meets old parts, and
two nodes writing the same part write the same bytes (write-if-absent where the
store honours ``If-None-Match: *``, a harmless overwrite where not). Each object
carries user metadata ``crc64`` (16 hex digits), ``identity`` (the sha256 hex)
and ``length``; a part read from the tier is used only when all three match the
bytes and the part asked for.

Never fatal: every failure to use the tier (unreachable, refused, corrupt)
sends the read to the origin. After a failure to reach it, the tier is left
alone for ``retry_after`` seconds (one warning), then tried again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cachetools

from .checksum import crc64
from .errors import NotFoundError
from .objectstore import Buffer, WritableStore

#: Parts queued to be read back from the local cache (no memory held until their turn):
#: a node reading faster than the tier takes writes catches up after the burst.
MAX_OWED = 1 << 16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartIdentity:
    """What makes a part's bytes what they are: one part of one object version."""

    store_id: str
    bucket: str
    key: str
    etag: str
    part_size: int
    number: int

    @property
    def digest(self) -> str:
        """sha256 hex over the six fields, NUL-joined (keys may hold any byte but NUL)."""
        fields = (self.store_id, self.bucket, self.key, self.etag, self.part_size, self.number)
        text = "\0".join(str(f) for f in fields)
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def tier_key(self, prefix: str) -> str:
        """The part's content address under `prefix`: PREFIX/parts/ab/abcdef..."""
        h = self.digest
        return f"{prefix}parts/{h[:2]}/{h}"


def tier_client_settings(timeout: float) -> dict[str, Any]:
    """StoreConfig fields for the tier's own client: short timeouts, at most one retry,
    and no latch of the client's own (the tier keeps its longer one, ``retry_after``)."""
    return {
        "connect_timeout": timeout,
        "read_timeout": timeout,
        "max_attempts": 2,
        "backoff_base": 0.05,
        "backoff_cap": 0.2,
        "down_latch": 0.0,
    }


STAT_NAMES = ("gets", "hits", "misses", "mismatches", "puts", "put_errors", "skipped")


class SharedTier:
    """Parts in a shared store. Thread-safe; every method returns in bounded time.

    `store` should be a client with short timeouts (``tier_client_settings``):
    the tier bounds its calls by the store's own timeouts, and after a failure
    skips the store for `retry_after` seconds.
    """

    def __init__(
        self,
        store: WritableStore,
        prefix: str = "",
        *,
        timeout: float = 2.0,
        retry_after: float = 30.0,
        put_workers: int = 4,
        max_pending_bytes: int = 256 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.name = store.describe(self.prefix)
        self.timeout = timeout
        self.retry_after = retry_after
        self.max_pending_bytes = max_pending_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stats = dict.fromkeys(STAT_NAMES, 0)
        self._down_until = 0.0
        self._down = False
        self._pending: set[str] = set()  # keys queued or being put
        self._pending_bytes = 0
        self._owed = 0  # queued parts to be read back from the local cache when due
        # Parts found corrupt: warned about once, and overwritten by the next put.
        self._bad: cachetools.LRUCache[str, bool] = cachetools.LRUCache(4096)
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=max(1, put_workers), thread_name_prefix="tier")

    # -- reads ------------------------------------------------------------------------

    def get_into(self, ident: PartIdentity, view: memoryview) -> bool:
        """Fill `view` with the part's bytes from the tier. True only for bytes whose
        length, identity and CRC-64 all match; False (go to the origin) otherwise."""
        if self._skip():
            return False
        key = ident.tier_key(self.prefix)
        self._count("gets")
        try:
            meta, n = self.store.get_object(key, view)
        except NotFoundError:
            self._count("misses")
            self._answered()
            return False
        except Exception as exc:
            self._failed("GET", key, exc)
            return False
        self._answered()
        problem = self._check(ident, len(view), meta.size, n, meta.metadata, view)
        if problem:
            self._count("mismatches")
            with self._lock:
                first = key not in self._bad
                self._bad[key] = True
            if first:
                log.warning(
                    "shared cache %s: part %d of %s (ETag %s) at %s is bad (%s); "
                    "reading it from the origin",
                    self.name,
                    ident.number,
                    ident.key,
                    ident.etag,
                    key,
                    problem,
                )
            return False
        self._count("hits")
        return True

    def has(self, ident: PartIdentity) -> bool:
        """True if the tier holds the part, by its metadata (HEAD; bytes not read)."""
        if self._skip():
            return False
        key = ident.tier_key(self.prefix)
        try:
            meta = self.store.head(key)
        except NotFoundError:
            self._answered()
            return False
        except Exception as exc:
            self._failed("HEAD", key, exc)
            return False
        self._answered()
        md = meta.metadata
        return md.get("identity") == ident.digest and md.get("length") == str(meta.size)

    @staticmethod
    def _check(
        ident: PartIdentity,
        want: int,
        size: int,
        read: int,
        metadata: dict[str, str],
        view: memoryview,
    ) -> str:
        """Why the part read is not the part asked for; "" when it is."""
        if size != want or read != want:
            return f"{size} bytes, expected {want}"
        if metadata.get("length") != str(want):
            return f"length {metadata.get('length')!r} in its metadata, expected {want}"
        if metadata.get("identity") != ident.digest:
            return "its identity metadata names another part"
        expected = metadata.get("crc64", "")
        actual = f"{crc64(view[:read]):016x}"
        if expected.lower() != actual:
            return f"CRC-64 {actual} of its bytes, {expected or 'none'} in its metadata"
        return ""

    # -- writes -----------------------------------------------------------------------

    def put(self, ident: PartIdentity, data: Buffer) -> bool:
        """Store the part unless the tier has it. True: the tier holds it now (written,
        or already there); False: the tier refused it or could not be reached."""
        if self._skip():
            return False
        key = ident.tier_key(self.prefix)
        view = memoryview(data).cast("B")
        metadata = {
            "crc64": f"{crc64(view):016x}",
            "identity": ident.digest,
            "length": str(len(view)),
        }
        with self._lock:
            bad = key in self._bad
        try:
            # A part found corrupt is overwritten; otherwise write-if-absent.
            self.store.put_object(key, view, metadata=metadata, if_none_match=not bad)
        except Exception as exc:
            self._count("put_errors")
            self._failed("PUT", key, exc)
            return False
        self._answered()
        self._count("puts")
        if bad:
            with self._lock:
                self._bad.pop(key, None)
        return True

    def put_async(
        self,
        ident: PartIdentity,
        data: Buffer,
        *,
        reload: Callable[[], Buffer | None] | None = None,
    ) -> None:
        """Queue a put and return at once. `data` must not change until the put is
        done (a fetched part's buffer does not); it is referenced, not copied.

        Past `max_pending_bytes` in memory, a part with a `reload` (it reads the part
        back from the node's local cache) is still queued, holding no memory until its
        turn, up to `MAX_OWED` of them; without one it is dropped (debug log). Nothing
        is queued while the tier is down or closed.
        """
        key = ident.tier_key(self.prefix)
        size = memoryview(data).nbytes
        with self._lock:
            down = self._down and self._clock() < self._down_until
            full = self._pending_bytes + size > self.max_pending_bytes
            owed = full and reload is not None and self._owed < MAX_OWED
            if self._closed or down or (full and not owed) or key in self._pending:
                if key not in self._pending:
                    self._stats["skipped"] += 1
                    log.debug(
                        "shared cache %s: not storing part %d of %s (%s)",
                        self.name,
                        ident.number,
                        ident.key,
                        "closed" if self._closed else "down" if down else "queue full",
                    )
                return
            self._pending.add(key)
            if owed:
                self._owed += 1
                size = 0
            else:
                self._pending_bytes += size
        job = (lambda: reload()) if owed and reload is not None else (lambda: data)
        try:
            self._pool.submit(self._put_job, ident, job, key, size, owed)
        except RuntimeError:  # the pool is shutting down
            self._done(key, size, owed)

    def _put_job(
        self,
        ident: PartIdentity,
        load: Callable[[], Buffer | None],
        key: str,
        size: int,
        owed: bool,
    ) -> None:
        try:
            data = load()
            if data is None:  # evicted from the local cache meanwhile: someone else's turn
                self._count("skipped")
            else:
                self.put(ident, data)
        except Exception:  # put never raises; a bug must not kill the worker quietly
            log.exception("shared cache %s: storing %s failed", self.name, key)
        finally:
            self._done(key, size, owed)

    def _done(self, key: str, size: int, owed: bool = False) -> None:
        with self._idle:
            self._pending.discard(key)
            self._pending_bytes -= size
            if owed:
                self._owed -= 1
            self._idle.notify_all()

    # -- the rest ---------------------------------------------------------------------

    def pending(self) -> tuple[int, int]:
        """(parts, bytes) queued or being put."""
        with self._lock:
            return len(self._pending), self._pending_bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no put is queued or running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def close(self, wait: float = 10.0) -> None:
        """Finish queued puts for up to `wait` seconds, then drop the rest."""
        with self._lock:
            self._closed = True
        if not self.flush(wait):
            parts, nbytes = self.pending()
            log.info(
                "shared cache %s: %d parts (%d bytes) not stored: closing", self.name, parts, nbytes
            )
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _skip(self) -> bool:
        """True while the tier is marked down (the call is counted as skipped)."""
        with self._lock:
            if self._down and self._clock() < self._down_until:
                self._stats["skipped"] += 1
                return True
            return False

    def _failed(self, method: str, key: str, exc: Exception) -> None:
        """The tier could not be used: leave it alone for retry_after seconds."""
        with self._lock:
            first = not self._down
            self._down = True
            self._down_until = self._clock() + self.retry_after
        if first:
            log.warning(
                "shared cache %s unreachable (%s %s: %s); reading from the origin; "
                "trying again in %.0f s",
                self.name,
                method,
                key,
                exc,
                self.retry_after,
            )
        else:
            log.debug("shared cache %s still unusable: %s %s: %s", self.name, method, key, exc)

    def _answered(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            log.info("shared cache %s answers again", self.name)
