"""Part files: where a part's bytes live, how they are written, opened and checked.

Layout: ``parts/<oid[:2]>/<oid>/<part size>-<number>``. A part is written to
a temp file named after its writer (``.<name>.<writer>.<thread>.tmp``), fsynced,
renamed into place, and the directory fsynced; only then may its index row
say it is there. Everything is created owner-only (0700 dirs, 0600 files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from ..checksum import Buffer, crc64_file_range
from ..durable import fsync_dir, write_all
from ..parts import PartRecord
from .index import PartId

log = logging.getLogger("ossfs_resume.cache")

#: Read size of checksum checks.
CHECK_CHUNK = 1 << 20
_PART_NAME = re.compile(r"^(\d+)-(\d+)$")
_TEMP_NAME = re.compile(r"^\.(\d+-\d+)\.([0-9a-z-]+)\.(\d+)\.tmp$")


class VerifiedPart:
    """An open, checksum-verified part file. Reads use pread: no seek state to share.

    Holds a file object, not a bare fd: a handle dropped from an LRU while a
    reader still uses it stays open until that reader lets go, so an fd number
    is never reused under a reader.
    """

    __slots__ = ("file", "length")

    def __init__(self, file: os.PathLike[str] | int, length: int) -> None:
        self.file = open(file, "rb", buffering=0)  # noqa: SIM115 - lives as long as the handle
        self.length = length

    def identity(self) -> tuple[int, int, int]:
        st = os.fstat(self.file.fileno())
        return st.st_ino, st.st_size, st.st_mtime_ns

    def unlinked(self) -> bool:
        """True once the file has no name left (evicted, dropped, replaced)."""
        try:
            return os.fstat(self.file.fileno()).st_nlink == 0
        except (OSError, ValueError):
            return True

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.file.fileno(), size, offset)

    def preadinto(self, offset: int, view: memoryview) -> int:
        """Read into `view` (no intermediate copy); returns bytes read, short only at the end."""
        fd = self.file.fileno()
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                break
            done += n
        return done


class PartFiles:
    """The part files under ``root/parts``."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "parts"
        self.direct_io = True  # until the file system refuses O_DIRECT
        # Checksum read buffers: a small pool, not one per thread (libfuse threads
        # have a new Python thread state per call, so per-thread would mean per call).
        self._buffers: queue.SimpleQueue[memoryview] = queue.SimpleQueue()

    def object_dir(self, oid: str) -> Path:
        return self.dir / oid[:2] / oid

    def path(self, pid: PartId) -> Path:
        return self.object_dir(pid.object_id) / f"{pid.part_size}-{pid.number}"

    def write(self, pid: PartId, data: Buffer, writer: str) -> None:
        """Write a part durably under its final name (raises OSError; no temp file left)."""
        final = self.path(pid)
        tmp = final.with_name(f".{final.name}.{writer}.{threading.get_ident()}.tmp")
        try:
            try:
                direct = write_all(tmp, memoryview(data), direct=self.direct_io)
            except FileNotFoundError:  # the object's dir does not exist (yet, or any more)
                os.makedirs(final.parent, mode=0o700, exist_ok=True)
                direct = write_all(tmp, memoryview(data), direct=self.direct_io)
            if not direct:
                self.direct_io = False
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def size(self, pid: PartId) -> int:
        """The size of a part's file; -1 if it has none."""
        try:
            return self.path(pid).stat().st_size
        except OSError:
            return -1

    def unlink(self, pid: PartId) -> None:
        with contextlib.suppress(OSError):
            self.path(pid).unlink()

    def remove_object(self, oid: str) -> None:
        shutil.rmtree(self.object_dir(oid), ignore_errors=True)

    def open(self, pid: PartId, length: int) -> VerifiedPart:
        return VerifiedPart(self.path(pid), length)

    def check(self, handle: VerifiedPart, rec: PartRecord) -> bool:
        """Read the whole part and compare length and CRC-64 with its record."""
        fd = handle.file.fileno()
        size = os.fstat(fd).st_size
        crc = None
        if size == rec.length:
            try:
                buf = self._buffers.get_nowait()
            except queue.Empty:
                buf = memoryview(bytearray(CHECK_CHUNK))
            try:
                crc = crc64_file_range(fd, 0, rec.length, buf)
            finally:
                self._buffers.put(buf)
        if crc == rec.crc:
            return True
        log.warning(
            "cached part %s failed its checksum (%d bytes, expected %d); "
            "dropping it and fetching it again",
            handle.file.name,
            size,
            rec.length,
        )
        return False

    # -- the start-up sweep ---------------------------------------------------

    def object_dirs(self) -> Iterator[tuple[str, Path]]:
        """(oid, dir) of every object directory on disk."""
        try:
            shards = sorted(os.scandir(self.dir), key=lambda e: e.name)
        except OSError:
            return
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(shard.path))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    yield entry.name, Path(entry.path)

    @staticmethod
    def listing(obj_dir: Path) -> tuple[dict[PartId, int], list[tuple[Path, str]]]:
        """Part files (id -> size) and temp files (path, writer) in one object dir."""
        oid = obj_dir.name
        parts: dict[PartId, int] = {}
        temps: list[tuple[Path, str]] = []
        try:
            entries = list(os.scandir(obj_dir))
        except OSError:
            return parts, temps
        for entry in entries:
            m = _PART_NAME.match(entry.name)
            if m:
                with contextlib.suppress(OSError):
                    size = entry.stat(follow_symlinks=False).st_size
                    parts[PartId(oid, int(m.group(1)), int(m.group(2)))] = size
                continue
            t = _TEMP_NAME.match(entry.name)
            if t:
                temps.append((Path(entry.path), t.group(2)))
        return parts, temps

    @staticmethod
    def remove_if_empty(obj_dir: Path) -> None:
        with contextlib.suppress(OSError):
            obj_dir.rmdir()
