"""The part-transfer engine: fetches parts of one pinned object version, with bounded
parallelism and a byte budget, for mount reads, read-ahead, ``prefetch`` and ``download``.

Two ways in:
- ``read_into`` / ``read_random_into`` / ``prefetch`` serve a mount: one fetch per
  part however many readers wait on it, parts kept in memory within the budget,
  fetched parts written to the part cache behind the reader;
- ``transfer`` moves a set of parts into a *sink* (the part cache, or a
  destination file) whose *ledger* (the cache index, or the download's
  checkpoint) records what is done, reporting progress as parts land.

Lock ordering: ``PartFetcher._lock`` guards only the in-flight and recent
maps, the verify-ahead set, the random-touch counts and the byte budget. It
is never held while doing I/O or while waiting on a fetch, and no other lock
is taken while it is held.
``ObjectReader._lock`` guards one open file's read-ahead state and is never
held across a fetch either.
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import cachetools

from .cache import PartId, PartStore
from .durable import BufferPool
from .errors import PreconditionFailedError, StoreUnavailableError
from .objectstore import ObjectMeta, ObjectStore
from .parts import part_bounds, part_count
from .shared import PartIdentity, SharedTier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectRef:
    """One object version, pinned: every part fetched for it carries its ETag."""

    meta: ObjectMeta
    object_id: str
    part_size: int

    @property
    def parts(self) -> int:
        return part_count(self.meta.size, self.part_size)

    def part_id(self, number: int) -> PartId:
        return PartId(self.object_id, self.part_size, number)


class _Inflight:
    """A part being fetched: its bytes (for readers), then its arrival in the cache."""

    __slots__ = ("data", "inline", "last_read", "length", "settled", "store")

    def __init__(self, length: int, *, store: bool = True, inline: bool = False) -> None:
        self.data: Future[memoryview] = Future()
        self.length = length
        self.settled = threading.Event()  # stored in the cache, or given up on
        self.last_read = 0  # when it was last served to a reader (a tick), 0: never
        self.store = store  # write it to the part cache once fetched
        self.inline = inline  # ... in the fetching thread, not behind it


class PartSink(Protocol):
    """Where a transfer puts parts; its ledger records which are done.

    ``accept`` and ``commit`` are called from the thread that runs the
    transfer only, so a ledger needs no locking.
    """

    #: True when the part cache itself is the sink: the engine stores each part there
    #: (its index is the ledger) and the transfer waits until it is durable.
    into_cache: bool

    def accept(self, number: int, data: memoryview) -> None:
        """Take part `number`'s bytes (write them; the ledger records them at commit)."""

    def commit(self) -> None:
        """Make the parts accepted so far durable and record them in the ledger."""


@dataclass(frozen=True)
class TransferResult:
    parts: int  # parts moved into the sink
    bytes: int
    from_cache: int  # of those, parts copied from the part cache instead of fetched


class PartFetcher:
    """Shared by every open file of a mount (and by prefetch).

    A part is fetched at most once at a time: readers that need a part already
    in flight wait on its future. Read-ahead runs on a bounded pool and stops
    scheduling when the bytes in flight reach the budget, so memory stays flat.

    A fetched part is handed to its readers as soon as its bytes have arrived;
    writing it to the cache (write, fsync, index row) happens after, on a
    separate writer pool, so neither readers nor the next GETs wait on the
    disk. The part stays "in flight" (readers take it from memory, its bytes
    count against the budget) until it is durable in the cache. Parts are
    written with O_DIRECT, so they do not land in the page cache: fetched parts
    stay in memory ("recent") for as long as the budget has room, which is
    where a streaming reader finds the parts read ahead for it. The budget
    covers both: new fetches push out the oldest recent parts, so memory stays
    within it however large the file.

    Read-ahead over parts already cached verifies them ahead of the reader
    (first use in this process: read and CRC-check), which also brings them
    into the page cache, or, once verified, asks the kernel to read them in
    (``advise_willneed``), so a warm sequential read does not wait on the disk.
    """

    def __init__(
        self,
        client: ObjectStore,
        cache: PartStore,
        *,
        max_parallel: int = 8,
        max_inflight_bytes: int = 256 << 20,
        max_recent_bytes: int | None = None,
        version_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        shared: SharedTier | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        # The shared tier, between the part cache and the origin. Not for GETs with
        # headers of their own (SSE-C keys): those bytes are not for other nodes.
        self.shared = None if headers else shared
        # Sent with every GET: a download of one object version (oss2's params/headers).
        self._get_options: dict[str, Any] = {}
        if version_id:
            self._get_options["version_id"] = version_id
        if headers:
            self._get_options["headers"] = dict(headers)
        self.max_inflight_bytes = max_inflight_bytes
        self._lock = threading.Lock()
        self._inflight: dict[PartId, _Inflight] = {}
        self._inflight_bytes = 0
        self._recent: collections.OrderedDict[PartId, _Inflight] = collections.OrderedDict()
        self._recent_bytes = 0
        self._ticks = itertools.count(1)  # orders reads, for evicting recent parts
        self.max_recent_bytes = max_inflight_bytes if max_recent_bytes is None else max_recent_bytes
        self._verifying: set[PartId] = set()
        self.copied_from_cache = 0  # parts a fetch found in the part cache after all
        # Random reads per part not yet cached: a part touched twice is fetched whole.
        self._random_touches: cachetools.LRUCache[PartId, int] = cachetools.LRUCache(4096)
        # Part buffers, reused: as many as the byte budget holds, and a quarter more for
        # readers' own fetches (which go ahead of the budget).
        self._buffers = BufferPool(max_inflight_bytes + max_inflight_bytes // 4)
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="fetch")
        self._writer = ThreadPoolExecutor(
            max_workers=max(2, max_parallel // 2), thread_name_prefix="store"
        )

    def inflight(self) -> tuple[int, int]:
        """(parts, bytes) being fetched right now: for metrics."""
        with self._lock:
            return len(self._inflight), self._inflight_bytes

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        # Read-ahead that never started has futures nobody will resolve: fail
        # them, so a reader waiting on one gets an error instead of hanging.
        with self._lock:
            stranded = list(self._inflight.values())
            self._inflight.clear()
            self._inflight_bytes = 0
            self._recent.clear()
            self._buffers.clear()
            self._recent_bytes = 0
        for entry in stranded:
            if not entry.data.done():
                entry.data.set_exception(StoreUnavailableError("the mount is shutting down"))
            entry.settled.set()

    def read(self, ref: ObjectRef, number: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of part `number`, from the cache or the store."""
        length = part_bounds(ref.meta.size, ref.part_size, number)[1]
        buf = bytearray(max(0, min(size, length - offset)))
        n = self.read_into(ref, number, offset, memoryview(buf))
        return bytes(buf[:n])

    def read_into(self, ref: ObjectRef, number: int, offset: int, view: memoryview) -> int:
        """Copy part `number` from `offset` into `view`, from the cache or the store.

        Returns the bytes copied (fewer than ``len(view)`` only past the part's end).
        """
        pid = ref.part_id(number)
        with self._lock:
            recent = self._recent.get(pid)
            entry = recent or self._inflight.get(pid)
            if entry is not None:
                entry.last_read = next(self._ticks)
        if entry is None:
            n = self.cache.read_into(pid, offset, view)
            if n is not None:
                return n
            entry, owner = self._claim(ref, number)
            entry.last_read = next(self._ticks)
            if owner:
                self._run(ref, number, entry, recheck=False)  # just looked: not there
        data = entry.data.result()
        self.cache.touch(pid, hit=recent is not None)
        chunk = data[offset : offset + len(view)]
        view[: len(chunk)] = chunk
        return len(chunk)

    def read_random_into(self, ref: ObjectRef, number: int, offset: int, view: memoryview) -> int:
        """Like `read_into`, for a read that is not part of a sequential stream.

        A part neither cached nor in flight is not fetched whole for one small
        read: only the bytes asked for are fetched, straight into `view`. A part
        touched again by random reads is worth caching: it is fetched whole in
        the background, so later reads of it come from the cache.
        """
        pid = ref.part_id(number)
        with self._lock:
            inflight = pid in self._inflight or pid in self._recent
            touches = 0 if inflight else self._random_touches.get(pid, 0) + 1
            if touches:
                self._random_touches[pid] = touches
        if inflight:
            return self.read_into(ref, number, offset, view)
        n = self.cache.read_into(pid, offset, view)
        if n is not None:
            return n
        if touches >= 2:
            self.prefetch(ref, [number])
        part_start, length = part_bounds(ref.meta.size, ref.part_size, number)
        size = max(0, min(len(view), length - offset))
        if size:
            start = part_start + offset
            self.client.get_range(
                ref.meta.key,
                start,
                start + size - 1,
                if_match=ref.meta.etag,
                into=view[:size],
                **self._get_options,
            )
            self.cache.note_fetched(size)
        return size

    def fetch(self, ref: ObjectRef, number: int, *, durable: bool = False) -> memoryview:
        """The part's bytes, fetching them in this thread unless a fetch is in flight.

        With `durable`, also wait until the part has been written to the cache
        (or the cache has refused it: check ``cache.has`` to know which).
        """
        entry, owner = self._claim(ref, number)
        if owner:
            self._run(ref, number, entry)
        data = entry.data.result()
        if durable:
            entry.settled.wait()
        return data

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is being fetched or stored; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._inflight.values())
            if not pending:
                return True
            for entry in pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not entry.settled.wait(left):
                    return False

    def prefetch(self, ref: ObjectRef, numbers: Iterable[int]) -> int:
        """Schedule background fetches of parts not cached or in flight; returns how many.

        Parts already cached but not yet verified by this process are verified
        in the background instead. Stops early when the byte budget is used up:
        read-ahead is a hint, and a reader that gets there first fetches the
        part itself.
        """
        scheduled = 0
        for number in numbers:
            if number >= ref.parts:
                break
            pid = ref.part_id(number)
            with self._lock:
                if pid in self._inflight or pid in self._verifying:
                    continue
            if self.cache.has(pid):
                if self.cache.is_verified(pid):
                    self.cache.advise_willneed(pid)
                else:
                    with self._lock:
                        self._verifying.add(pid)
                    self._pool.submit(self._verify, pid)
                continue
            length = part_bounds(ref.meta.size, ref.part_size, number)[1]
            with self._lock:
                if pid in self._inflight:
                    continue
                if not self._make_room(length):
                    break
                entry = _Inflight(length)
                self._inflight[pid] = entry
                self._inflight_bytes += length
            self._pool.submit(self._run, ref, number, entry)
            scheduled += 1
        return scheduled

    def _verify(self, pid: PartId) -> None:
        try:
            self.cache.open_verified(pid)
        except Exception:
            log.exception("verifying cached part %s ahead of the reader failed", pid)
        finally:
            with self._lock:
                self._verifying.discard(pid)

    def _claim(
        self, ref: ObjectRef, number: int, *, store: bool = True, inline: bool = False
    ) -> tuple[_Inflight, bool]:
        pid = ref.part_id(number)
        length = part_bounds(ref.meta.size, ref.part_size, number)[1]
        with self._lock:
            entry = self._inflight.get(pid)
            if entry is not None:
                return entry, False
            self._make_room(length)  # a reader's own fetch goes ahead regardless
            entry = self._inflight[pid] = _Inflight(length, store=store, inline=inline)
            self._inflight_bytes += length
            return entry, True

    # -- transfers: prefetch and download ---------------------------------------

    def transfer(
        self,
        ref: ObjectRef,
        numbers: Iterable[int],
        sink: PartSink,
        *,
        threads: int,
        progress: Callable[[int], None] | None = None,
    ) -> TransferResult:
        """Move parts `numbers` of `ref` into `sink`, `threads` at a time.

        Parts already in the part cache are copied from it, not fetched. After
        each batch of finished parts the sink commits (its ledger records them)
        and `progress` gets the bytes that batch added: progress never runs
        ahead of what a crash would keep. At most 2 x threads parts are in
        flight, so memory stays bounded and stopping (an error, Ctrl-C)
        cancels little: parts already being fetched are kept if they finish.
        """
        pending = iter(numbers)
        running: dict[Future[memoryview], tuple[int, _Inflight]] = {}
        moved = nbytes = 0
        copied_before = self.copied_from_cache

        def start(count: int) -> None:
            for number in itertools.islice(pending, count):
                entry, owner = self._claim(
                    ref, number, store=sink.into_cache, inline=sink.into_cache
                )
                if owner:
                    self._pool.submit(self._run, ref, number, entry)
                running[entry.data] = (number, entry)

        def absorb(finished: Iterable[Future[memoryview]]) -> BaseException | None:
            nonlocal moved, nbytes
            error: BaseException | None = None
            added = 0
            for fut in finished:
                number, entry = running.pop(fut)
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is not None:
                    error = error or exc
                    continue
                if sink.into_cache:
                    entry.settled.wait()
                sink.accept(number, fut.result())
                moved += 1
                added += entry.length
            if added:
                sink.commit()
                nbytes += added
                if progress is not None:
                    progress(added)
            return error

        start(2 * threads)
        try:
            while running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                error = absorb(finished)
                if error is not None:
                    raise error
                start(len(finished))
        except BaseException:
            for fut in list(running):
                fut.cancel()
            # Keep what finishes: the ledger only ever lists parts that are in the sink.
            done, _ = wait(list(running))
            try:
                absorb(done)
            except Exception as late:
                log.warning("while stopping a transfer of %s: %s", ref.meta.key, late)
            raise
        return TransferResult(moved, nbytes, self.copied_from_cache - copied_before)

    def _evict_recent(self) -> None:
        """Drop one recent part: the least recently read, else the oldest never read (a
        streaming reader has left the parts it read, and not reached those it has not).
        Called with ``_lock`` held."""
        read = [(e.last_read, pid) for pid, e in self._recent.items() if e.last_read]
        victim = min(read, key=lambda item: item[0])[1] if read else next(iter(self._recent))
        self._recent_bytes -= self._recent.pop(victim).length

    def _make_room(self, length: int) -> bool:
        """Push out the oldest recent parts until `length` more bytes fit the budget.
        False if they cannot (the budget is all in flight). Called with ``_lock`` held."""
        while self._recent and (
            self._inflight_bytes + self._recent_bytes + length > self.max_inflight_bytes
        ):
            self._evict_recent()
        return self._inflight_bytes + self._recent_bytes + length <= self.max_inflight_bytes

    def _run(self, ref: ObjectRef, number: int, entry: _Inflight, *, recheck: bool = True) -> None:
        """Fetch a claimed part into `entry` (with `recheck`, first look in the cache
        again: a part scheduled a while ago may have been stored since)."""
        pid = ref.part_id(number)
        start, length = part_bounds(ref.meta.size, ref.part_size, number)
        future = entry.data
        to_store: mmap.mmap | None = None
        try:
            if not future.set_running_or_notify_cancel():
                return
            # Another thread or process may have stored it since we looked.
            handle = self.cache.open_verified(pid) if recheck else None
            if handle is not None:
                future.set_result(memoryview(handle.pread(0, length)))
                with self._lock:
                    self.copied_from_cache += 1
                return
            buf = self._buffers.take(length)  # O_DIRECT-ready: see the class docstring
            shared, ident = self.shared, self._identity(ref, number)
            # Read order: memory, local disk (both above), the shared tier, the origin.
            if shared is None or ident is None or not shared.get_into(ident, memoryview(buf)):
                self.client.get_range(
                    ref.meta.key,
                    start,
                    start + length - 1,
                    if_match=ref.meta.etag,
                    into=buf,
                    **self._get_options,
                )
                self.cache.note_fetched(length)
                if shared is not None and ident is not None:
                    # The buffer never changes once fetched: the put keeps a reference.
                    # When the tier's memory allowance is used up, the put reads the part
                    # back from the local cache when its turn comes, instead of being lost.
                    shared.put_async(
                        ident, buf, reload=lambda pid=pid, n=length: self.cache.read(pid, 0, n)
                    )
            to_store = buf if entry.store else None
            future.set_result(memoryview(buf))
        except PreconditionFailedError as exc:
            log.warning("%s changed while being read (pinned ETag %s)", ref.meta.key, ref.meta.etag)
            future.set_exception(exc)
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            if to_store is None:
                self._settle(pid, entry, keep=False)
        if to_store is not None:
            if entry.inline:
                # A transfer into the cache: this worker takes its next part only once
                # this one is recorded, so a crash loses at most one part per worker.
                self._store(pid, entry, to_store)
                return
            try:
                self._writer.submit(self._store, pid, entry, to_store)
            except RuntimeError:  # shutting down: the part is simply not cached
                self._settle(pid, entry, keep=False)

    def _identity(self, ref: ObjectRef, number: int) -> PartIdentity | None:
        """The part's identity in the shared tier; None without a tier, or for an
        object without an ETag (its parts are not pinned to one version)."""
        if self.shared is None or not ref.meta.etag:
            return None
        config = self.client.config
        return PartIdentity(
            config.store_id, config.bucket, ref.meta.key, ref.meta.etag, ref.part_size, number
        )

    def _store(self, pid: PartId, entry: _Inflight, data: mmap.mmap) -> None:
        try:
            self.cache.store(pid, memoryview(data))
        except Exception:
            log.exception("storing part %s in the cache failed", pid)
        finally:
            self._settle(pid, entry, keep=True)

    def _settle(self, pid: PartId, entry: _Inflight, *, keep: bool) -> None:
        """The part is durable (or given up on): out of flight; with `keep`, into recent."""
        with self._lock:
            if self._inflight.get(pid) is entry:
                del self._inflight[pid]
                self._inflight_bytes -= entry.length
                if keep and self.max_recent_bytes:
                    self._recent[pid] = entry
                    self._recent_bytes += entry.length
                    while self._recent_bytes > self.max_recent_bytes:
                        self._evict_recent()
        entry.settled.set()
