"""A fault-injecting passthrough FUSE file system, for tests of the cache's disk faults.

    python tests/faultfs.py BACKING MOUNTPOINT CONTROL

Mirrors BACKING at MOUNTPOINT (foreground, multithreaded). While the file
CONTROL exists, it injects a fault chosen by the file's content:

- ``eio`` (or empty): every read, write and fsync fails with EIO, as on a
  failing disk;
- ``erofs``: everything that changes the file system fails with EROFS, as
  after a kernel remounts a disk read-only on errors (``mount -o remount,ro``
  itself is refused while SQLite holds its files open for writing).

SQLite's shared-memory file (``*-shm``) is exempt: SQLite maps it, so the
kernel serves it from memory, not the disk; a fault there would be a SIGBUS in
the process that maps it, which no disk fault causes.

O_DIRECT opens are accepted (the flag is dropped on the backing file, whose
page cache keeps FUSE's unaligned buffers legal).
"""

from __future__ import annotations

import ctypes.util
import errno
import os
import sys
from typing import Any

if "FUSE_LIBRARY_NAME" not in os.environ and ctypes.util.find_library("fuse3"):
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

import mfusepy

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class FaultFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, backing: str, control: str) -> None:
        self.backing = os.path.realpath(backing)
        self.control = os.path.abspath(control)

    # -- faults ---------------------------------------------------------------

    def _mode(self) -> str | None:
        try:
            with open(self.control) as f:
                return f.read().strip() or "eio"
        except FileNotFoundError:
            return None

    def _io(self, path: str) -> None:
        """A read, write or fsync of `path` is about to happen."""
        if path.endswith("-shm"):
            return
        if self._mode() == "eio":
            raise mfusepy.FuseOSError(errno.EIO)

    def _change(self, path: str) -> None:
        """`path` is about to be changed."""
        if path.endswith("-shm"):
            return
        if self._mode() == "erofs":
            raise mfusepy.FuseOSError(errno.EROFS)

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    # -- metadata -------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
        attrs = {
            key: getattr(st, key)
            for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
        }
        attrs.update(
            st_atime=st.st_atime_ns,
            st_mtime=st.st_mtime_ns,
            st_ctime=st.st_ctime_ns,
            st_blocks=st.st_blocks,
            st_blksize=st.st_blksize,
        )
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._real(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        return {
            key: getattr(st, key)
            for key in (
                "f_bavail",
                "f_bfree",
                "f_blocks",
                "f_bsize",
                "f_favail",
                "f_ffree",
                "f_files",
                "f_flag",
                "f_frsize",
                "f_namemax",
            )
        }

    def chmod(self, path: str, mode: int) -> int:
        self._change(path)
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._change(path)
        os.chown(self._real(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._change(path)
        os.utime(self._real(path), ns=times)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._change(path)
        os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        self._change(path)
        os.rmdir(self._real(path))
        return 0

    def unlink(self, path: str) -> int:
        self._change(path)
        os.unlink(self._real(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        self._change(new)
        os.rename(self._real(old), self._real(new))
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._change(path)
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._real(path), length)
        return 0

    # -- files ----------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            self._change(path)
        return os.open(self._real(path), flags & ~os.O_DIRECT)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._change(path)
        flags = fi if isinstance(fi, int) else os.O_WRONLY
        return os.open(self._real(path), (flags | os.O_CREAT) & ~os.O_DIRECT, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._io(path)
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._io(path)
        self._change(path)
        return os.pwrite(fh, data, offset)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._io(path)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


def main(argv: list[str]) -> int:
    backing, mountpoint, control = argv
    mfusepy.FUSE(FaultFS(backing, control), mountpoint, foreground=True, nothreads=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
