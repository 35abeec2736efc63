"""Turns file reads into part fetches: one fetch per part, read-ahead, a byte budget.

Lock ordering: ``PartFetcher._lock`` guards only the in-flight map and the
byte budget. It is never held while doing I/O or while waiting on a fetch, and
no other lock is taken while it is held. ``ObjectReader._lock`` guards one open
file's read-ahead state and is never held across a fetch either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .cache import PartCache, PartId
from .client import ObjectMeta, StoreClient
from .errors import PreconditionFailedError, StoreUnavailableError
from .parts import part_bounds, part_count, parts_covering

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


class PartFetcher:
    """Shared by every open file of a mount (and by prefetch).

    A part is fetched at most once at a time: readers that need a part already
    in flight wait on its future. Read-ahead runs on a bounded pool and stops
    scheduling when the bytes in flight reach the budget, so memory stays flat.
    """

    def __init__(
        self,
        client: StoreClient,
        cache: PartCache,
        *,
        max_parallel: int = 8,
        max_inflight_bytes: int = 256 << 20,
    ) -> None:
        self.client = client
        self.cache = cache
        self.max_inflight_bytes = max_inflight_bytes
        self._lock = threading.Lock()
        self._inflight: dict[PartId, Future[memoryview]] = {}
        self._inflight_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="fetch")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        # Read-ahead that never started has futures nobody will resolve: fail
        # them, so a reader waiting on one gets an error instead of hanging.
        with self._lock:
            stranded = list(self._inflight.values())
            self._inflight.clear()
            self._inflight_bytes = 0
        for future in stranded:
            if not future.done():
                future.set_exception(StoreUnavailableError("the mount is shutting down"))

    def read(self, ref: ObjectRef, number: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of part `number`, from the cache or the store."""
        cached = self.cache.read(ref.part_id(number), offset, size)
        if cached is not None:
            return cached
        data = self.fetch(ref, number)
        self.cache.touch(ref.part_id(number))
        return bytes(data[offset : offset + size])

    def fetch(self, ref: ObjectRef, number: int) -> memoryview:
        """The part's bytes, fetching them in this thread unless a fetch is in flight."""
        future, owner = self._claim(ref, number)
        if owner:
            self._run(ref, number, future)
        return future.result()

    def prefetch(self, ref: ObjectRef, numbers: Iterable[int]) -> int:
        """Schedule background fetches of parts not cached or in flight; returns how many.

        Stops early when the byte budget is used up: read-ahead is a hint, and a
        reader that gets there first fetches the part itself.
        """
        scheduled = 0
        for number in numbers:
            if number >= ref.parts:
                break
            pid = ref.part_id(number)
            with self._lock:
                if pid in self._inflight:
                    continue
            if self.cache.has(pid):
                continue
            length = part_bounds(ref.meta.size, ref.part_size, number)[1]
            with self._lock:
                if pid in self._inflight:
                    continue
                if self._inflight_bytes + length > self.max_inflight_bytes:
                    break
                future: Future[memoryview] = Future()
                self._inflight[pid] = future
                self._inflight_bytes += length
            self._pool.submit(self._run, ref, number, future)
            scheduled += 1
        return scheduled

    def _claim(self, ref: ObjectRef, number: int) -> tuple[Future[memoryview], bool]:
        pid = ref.part_id(number)
        length = part_bounds(ref.meta.size, ref.part_size, number)[1]
        with self._lock:
            future = self._inflight.get(pid)
            if future is not None:
                return future, False
            future = Future()
            self._inflight[pid] = future
            self._inflight_bytes += length
            return future, True

    def _run(self, ref: ObjectRef, number: int, future: Future[memoryview]) -> None:
        pid = ref.part_id(number)
        start, length = part_bounds(ref.meta.size, ref.part_size, number)
        try:
            if not future.set_running_or_notify_cancel():
                return
            # Another thread or process may have stored it since we looked.
            handle = self.cache.open_verified(pid)
            if handle is not None:
                data = memoryview(handle.pread(0, length))
            else:
                buf = bytearray(length)
                self.client.get_range(
                    ref.meta.key, start, start + length - 1, if_match=ref.meta.etag, into=buf
                )
                self.cache.note_fetched(length)
                self.cache.store(pid, buf)
                data = memoryview(buf)
            future.set_result(data)
        except PreconditionFailedError as exc:
            log.warning("%s changed while being read (pinned ETag %s)", ref.meta.key, ref.meta.etag)
            future.set_exception(exc)
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            with self._lock:
                self._inflight.pop(pid, None)
                self._inflight_bytes -= length


class ObjectReader:
    """Reads of one open file: sequential detection and an adaptive read-ahead window."""

    def __init__(self, fetcher: PartFetcher, ref: ObjectRef, *, max_readahead_parts: int = 8):
        self.fetcher = fetcher
        self.ref = ref
        self.max_window = max(0, max_readahead_parts)
        self._lock = threading.Lock()
        self._next_offset = 0
        self._window = 0  # parts to keep in flight ahead of the reader
        self._ahead_until = 0  # first part number not yet scheduled
        self._last_part = -1

    def read(self, offset: int, size: int) -> bytes:
        meta = self.ref.meta
        numbers = parts_covering(offset, size, meta.size, self.ref.part_size)
        if not numbers:
            return b""
        self._plan_readahead(offset, size, numbers)
        chunks = []
        end = min(offset + size, meta.size)
        for number in numbers:
            part_start = number * self.ref.part_size
            lo = max(offset, part_start) - part_start
            hi = min(end, part_start + self.ref.part_size) - part_start
            chunks.append(self.fetcher.read(self.ref, number, lo, hi - lo))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _plan_readahead(self, offset: int, size: int, numbers: range) -> None:
        if self.max_window == 0:
            return
        part_size = self.ref.part_size
        with self._lock:
            # The kernel issues concurrent reads slightly out of order; treat a
            # read near where the last one ended as sequential.
            expected = self._next_offset
            near = abs(offset - expected) <= 2 * part_size
            sequential = offset == 0 or (expected > 0 and near)
            self._next_offset = offset + size
            last = numbers[-1]
            if not sequential:
                if self._window:
                    log.debug(
                        "%s: read at %d, expected near %d: read-ahead off",
                        self.ref.meta.key,
                        offset,
                        expected,
                    )
                self._window = 0
                self._ahead_until = last + 1
                self._last_part = last
                return
            if self._window == 0:
                self._window = 1
            elif last > self._last_part:
                # Still streaming into new parts: widen the window.
                self._window = min(self._window * 2, self.max_window)
            self._last_part = last
            start = max(last + 1, self._ahead_until)
            stop = last + 1 + self._window
            if start >= stop:
                return
            self._ahead_until = stop
        self.fetcher.prefetch(self.ref, range(start, stop))
