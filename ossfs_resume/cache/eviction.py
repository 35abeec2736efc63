"""Eviction: keep the cache dir within its size limit and the disk above its floor.

Policy: parts read in one access window only go first, then "hot" parts
(read in more than one), oldest first, so a scan of cold data does not push
out a hot file. Parts this process is serving right now are skipped.

Mechanics, shaped by the rule that no part write waits long on eviction:
- ``reserve`` runs in the writer's own short transaction: it evicts only what
  that one part needs (a handful of rows), then records the reservation, so
  every process sees bytes in flight and the dir never passes the limit.
- Passing the low-water mark (90% of the limit) wakes a background thread that
  evicts in small batches, each its own transaction, down to the mark: writers
  queue for the index lock behind one batch at most.
- A part's file is unlinked inside the transaction that deletes its row, so a
  crash leaves at worst rows without files (dropped by the start-up check),
  never files that nothing accounts for.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..parts import PartRecord
from .index import PartId, PartIndex
from .partfiles import PartFiles
from .writers import writer_alive

log = logging.getLogger("ossfs_resume.cache")

#: Rows evicted per background transaction: short enough that a writer waits milliseconds.
BATCH = 32
#: The most parts one reservation evicts for itself before giving up.
SYNC_VICTIMS = 16
#: Background eviction stops at this fraction of the limit.
LOW_WATER = 0.9


@dataclass
class Limits:
    max_bytes: int
    min_free_bytes: int


class CacheFullError(OSError):
    """No room: everything left is being read or written right now (not a disk fault)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class Evictor:
    """Reservations and eviction over one index and its part files."""

    def __init__(
        self,
        index_of: Callable[[], PartIndex],
        files: PartFiles,
        limits: Limits,
        *,
        busy: Callable[[], set[PartId]],
        forget: Callable[[PartId], None],
        before_pass: Callable[[], None] = lambda: None,
    ) -> None:
        self._index_of = index_of
        self.files = files
        self.limits = limits
        self._busy = busy
        self._forget = forget
        self._before_pass = before_pass
        self._wake = threading.Event()
        self._stop = threading.Event()
        #: Parts and bytes this process evicted since it started: for metrics.
        self.evicted_parts = 0
        self.evicted_bytes = 0
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.last_pass: tuple[int, int] = (0, 0)  # (parts, bytes) of the last background pass

    def free_disk(self) -> int:
        st = os.statvfs(self.files.dir.parent)
        return st.f_bavail * st.f_frsize

    def _free_in(self, conn: sqlite3.Connection) -> int:
        """Free disk space not yet promised: the disk's free bytes less the bytes reserved
        by writers (of every process) that may not be on the disk yet. Without this,
        parallel writers each see the same free space and together fill the disk."""
        row = conn.execute("SELECT sum(length) FROM parts WHERE writer IS NOT NULL").fetchone()
        return self.free_disk() - (row[0] or 0)

    def _over(self, used: int, free: int, incoming: int) -> bool:
        return (
            used + incoming > self.limits.max_bytes or free - incoming < self.limits.min_free_bytes
        )

    def reserve(self, pid: PartId, record: PartRecord, writer: str) -> bool:
        """Reserve room for a part and record it as being written by `writer`.

        Returns False if the part is already there or being written by someone
        else (nothing to do). Raises CacheFullError when nothing can be
        evicted, sqlite3.Error or OSError when the index or the disk fails.
        """
        index = self._index_of()
        with index.writing() as conn:
            state = index.row_state(conn, pid)
            if state is not None:
                if state == "ready" or writer_alive(state):
                    return False
                # A reservation of a process that died: take it over, or the part could
                # not be cached (and its bytes would count) until the next start-up check.
                self.files.unlink(pid)
                index.delete_part(conn, pid)
            used = index.totals_in(conn).bytes
            free = self._free_in(conn)
            if self._over(used, free, record.length):
                busy = self._busy()
                for victim in index.oldest(conn, SYNC_VICTIMS + len(busy)):
                    if victim.pid in busy or victim.pid == pid:
                        continue
                    self.files.unlink(victim.pid)
                    index.delete_part(conn, victim.pid)
                    self._forget(victim.pid)
                    used -= victim.length
                    free += victim.length
                    if not self._over(used, free, record.length):
                        break
                if self._over(used, free, record.length):
                    raise CacheFullError(
                        f"cache full: {used} of {self.limits.max_bytes} bytes in use or being "
                        f"written, {free} bytes free on the disk"
                    )
            index.reserve(conn, pid, record, writer)
        if used + record.length > self.limits.max_bytes * LOW_WATER or (
            free - record.length < self.limits.min_free_bytes * 1.1
        ):
            self.kick()
        return True

    # -- background passes ----------------------------------------------------

    def kick(self) -> None:
        """Ask the background thread for a pass (started on first use)."""
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="cache-eviction", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.evict_pass()
            except (sqlite3.Error, OSError) as exc:
                log.warning("cache eviction pass failed (%s); will try again", exc)

    def evict_pass(self) -> tuple[int, int]:
        """Evict in batches until under the low-water mark and above the floor."""
        self._before_pass()
        target = int(self.limits.max_bytes * LOW_WATER)
        floor = int(self.limits.min_free_bytes * 1.1)
        evicted = freed = 0
        while not self._stop.is_set():
            index = self._index_of()
            busy = self._busy()
            started = time.monotonic()
            with index.writing() as conn:
                used = index.totals_in(conn).bytes
                free = self._free_in(conn)
                if used <= target and free >= floor:
                    break
                victims = [v for v in index.oldest(conn, BATCH + len(busy)) if v.pid not in busy][
                    :BATCH
                ]
                if not victims:
                    break
                for victim in victims:
                    self.files.unlink(victim.pid)
                    index.delete_part(conn, victim.pid)
                    freed += victim.length
                    used -= victim.length
                    free += victim.length
                    evicted += 1
                    if used <= target and free >= floor:
                        break
            for victim in victims:
                self._forget(victim.pid)
            # Leave the lock free as long as we held it: other processes' writers poll
            # for it (this process's writers queue in order and need no pause).
            time.sleep(min(time.monotonic() - started, 0.01))
        if evicted:
            log.info(
                "cache over its limit: evicted %d parts (%d bytes); limit %d bytes",
                evicted,
                freed,
                self.limits.max_bytes,
            )
        self.last_pass = (evicted, freed)
        self.evicted_parts += evicted
        self.evicted_bytes += freed
        return evicted, freed
