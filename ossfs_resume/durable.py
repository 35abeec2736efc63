"""Durability helpers shared by the part cache and the resumable download."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import sys
import threading

#: O_DIRECT needs buffer address, file offset and length aligned to the logical
#: block size; a page covers every common device.
DIRECT_ALIGN = mmap.PAGESIZE
HUGE_PAGE = 2 << 20


def aligned_buffer(length: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer (anonymous memory, touched only as it is filled).

    Asks for transparent huge pages: filling 1 GiB of fresh 4 KiB pages costs
    262,144 page faults (about 0.6 CPU-seconds here), 2 MiB pages cost 512.
    """
    buf = mmap.mmap(-1, max(length, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if length >= HUGE_PAGE:
        with contextlib.suppress(OSError, AttributeError):  # no THP: plain pages
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


class BufferPool:
    """Part buffers reused once nothing refers to them any more.

    Why: a fresh anonymous buffer's pages are zeroed by the kernel as they are
    first touched (about 10% of the daemon's CPU per cold GiB); a reused one's
    are not. A buffer is free when its reference count shows that only the
    pool holds it: no memoryview of it (a reader's, a sink's), no shared-tier
    put, no fetch. The pool holds at most `capacity` bytes of buffers; past
    that, buffers are fresh and freed as before, so memory stays what the
    engine's byte budget makes it. Buffers under `min_size` (small objects'
    parts, of every size) are not pooled: a pool of them would be a long list
    to search on every fetch, for little zeroing saved.
    """

    def __init__(self, capacity: int, *, min_size: int = 1 << 20) -> None:
        self.capacity = capacity
        self.min_size = min_size
        self._free_refs = _free_refs()
        self._buffers: list[mmap.mmap] = []
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, length: int) -> mmap.mmap:
        """A page-aligned buffer of exactly `length` bytes (contents undefined)."""
        if length < self.min_size:
            return aligned_buffer(length)
        with self._lock:
            for buf in self._buffers:
                if len(buf) == length and _refs(buf) == self._free_refs:
                    return buf  # referenced by this frame until the caller holds it
            # Full: make room by dropping free buffers of other sizes (another part size).
            for buf in list(self._buffers):
                if self._bytes + length <= self.capacity:
                    break
                if len(buf) != length and _refs(buf) == self._free_refs + 1:  # + list()
                    self._buffers.remove(buf)
                    self._bytes -= len(buf)
            if self._bytes + length <= self.capacity:
                buf = aligned_buffer(length)
                self._buffers.append(buf)
                self._bytes += length
                return buf
        return aligned_buffer(length)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._bytes = 0


def _refs(buf: mmap.mmap) -> int:
    return sys.getrefcount(buf)


def _free_refs() -> int:
    """What `_refs` says of a buffer held by a list only, measured the way `take` looks
    (a loop over the list, a call): whatever references the interpreter itself adds."""
    probe = [mmap.mmap(-1, 1)]
    for buf in probe:
        return _refs(buf)
    raise AssertionError("unreachable")


def _aligned(view: memoryview) -> bool:
    if view.readonly or not view.nbytes or not view.c_contiguous:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return address % DIRECT_ALIGN == 0


def write_all(path: str | os.PathLike[str], data: memoryview, *, direct: bool) -> bool:
    """Create `path` holding `data` and fsync it. Returns whether O_DIRECT was usable.

    With `direct`, the aligned bulk of an aligned buffer is written with
    O_DIRECT: it goes from our memory to the disk without being copied into the
    page cache (that copy is the biggest CPU cost of filling a cache on a busy
    machine). The unaligned tail, and file systems without O_DIRECT (tmpfs),
    go through the page cache as usual.
    """
    bulk = len(data) // DIRECT_ALIGN * DIRECT_ALIGN if direct and _aligned(data) else 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = -1
    if bulk:
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct = bulk = 0  # no O_DIRECT on this file system
    if fd < 0:
        fd = os.open(path, flags, 0o600)
    try:
        written = 0
        try:
            while written < bulk and written % DIRECT_ALIGN == 0:
                written += os.write(fd, data[written:bulk])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct = False  # O_DIRECT accepted at open but not for this write
        if bulk:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return bool(direct)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in directory `path` durable; a filesystem that refuses is not fatal."""
    try:
        fd = os.open(os.fspath(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
