"""Turns file reads into part fetches: sequential detection and an adaptive read-ahead
window over the part-transfer engine (``engine.PartFetcher``).

``ObjectReader._lock`` guards one open file's read-ahead state and is never
held across a fetch.
"""

from __future__ import annotations

import logging
import threading

from .engine import ObjectRef, PartFetcher
from .errors import ChecksumError
from .parts import parts_covering

log = logging.getLogger(__name__)


class ObjectReader:
    """Reads of one open file: sequential detection and an adaptive read-ahead window."""

    def __init__(self, fetcher: PartFetcher, ref: ObjectRef, *, max_readahead_parts: int = 8):
        self.fetcher = fetcher
        self.ref = ref
        # Leave the budget room for the part being read and the one before it, so
        # scheduling read-ahead never pushes them out of memory.
        room = fetcher.max_inflight_bytes // ref.part_size - 2
        self.max_window = max(0, min(max_readahead_parts, max(1, room)))
        self._lock = threading.Lock()
        self._next_offset = 0
        self._window = 0  # parts to keep in flight ahead of the reader
        self._ahead_until = 0  # first part number not yet scheduled
        self._last_part = -1

    def read(self, offset: int, size: int) -> bytes:
        buf = bytearray(max(0, min(offset + size, self.ref.meta.size) - offset))
        n = self.read_into(offset, memoryview(buf))
        return bytes(buf[:n])

    def read_into(self, offset: int, view: memoryview) -> int:
        """Copy the file's bytes from `offset` into `view`; returns the bytes copied
        (fewer than ``len(view)`` only at the end of the object)."""
        meta = self.ref.meta
        numbers = parts_covering(offset, len(view), meta.size, self.ref.part_size)
        if not numbers:
            return 0
        sequential = self._plan_readahead(offset, len(view), numbers)
        read_part = self.fetcher.read_into if sequential else self.fetcher.read_random_into
        end = min(offset + len(view), meta.size)
        done = 0
        for number in numbers:
            part_start = number * self.ref.part_size
            lo = max(offset, part_start) - part_start
            hi = min(end, part_start + self.ref.part_size) - part_start
            n = read_part(self.ref, number, lo, view[done : done + hi - lo])
            if n < hi - lo:  # a part file cut short under us: fail rather than misplace bytes
                raise ChecksumError(
                    f"part {number} of {meta.key} ended after {lo + n} bytes, expected {hi} or more"
                )
            done += n
        return done

    def _plan_readahead(self, offset: int, size: int, numbers: range) -> bool:
        """Update the read-ahead window for a read and schedule parts; True if sequential."""
        if self.max_window == 0:
            return True  # no read-ahead: every read is served part by part
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
                return False
            if self._window == 0:
                self._window = 1
            elif last > self._last_part:
                # Still streaming into new parts: widen the window.
                self._window = min(self._window * 2, self.max_window)
            self._last_part = last
            start = max(last + 1, self._ahead_until)
            stop = last + 1 + self._window
            if start >= stop:
                return True
            self._ahead_until = stop
        self.fetcher.prefetch(self.ref, range(start, stop))
        return True
