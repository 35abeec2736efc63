"""Thin FUSE adapter over BucketFS: translate calls, map errors, nothing else.

The core is built in ``init``, i.e. after libfuse has daemonized: threads,
sockets and SQLite handles created before a fork do not survive it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from .core import BucketFS, FsError

log = logging.getLogger(__name__)


def _load_mfusepy() -> Any:
    # Prefer libfuse3 when both are installed: it allows larger reads.
    if "FUSE_LIBRARY_NAME" not in os.environ and ctypes.util.find_library("fuse3"):
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    try:
        import mfusepy
    except OSError as exc:
        raise RuntimeError(
            f"libfuse is not installed ({exc}); install it with: apt-get install fuse3"
        ) from None
    return mfusepy


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 8))


def _mount_device(mountpoint: str) -> str | None:
    """major:minor of the mount at `mountpoint`, from /proc/self/mountinfo (no stat: that
    would call back into this very file system)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                # Spaces and the like appear as octal escapes (\040).
                if len(fields) > 4 and _OCTAL.sub(_unescape, fields[4]) == mountpoint:
                    return fields[2]
    except OSError:
        return None
    return None


def tune_read_ahead(mountpoint: str, read_ahead_kb: int, timeout: float = 5.0) -> None:
    """Raise the mount's kernel read-ahead so sequential reads arrive as 1 MiB requests.

    The kernel starts FUSE mounts at 128 KiB; libfuse3 accepts up to 1 MiB per
    request. Best effort: it needs write access to /sys/class/bdi (root).
    Runs in its own thread, started from ``init``: the kernel lowers the
    setting when it processes libfuse's INIT reply, so it must be written after
    that, and a stat of the mount point is what waits for it (requests queue
    until INIT is answered).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        device = _mount_device(mountpoint)
        if device:
            try:
                os.stat(mountpoint)  # returns once INIT has been processed
                with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
                    f.write(str(read_ahead_kb))
                log.info("read-ahead of %s set to %d KiB", mountpoint, read_ahead_kb)
            except OSError as exc:
                log.info(
                    "cannot set the read-ahead of %s (%s); kernel default kept", mountpoint, exc
                )
            return
        time.sleep(0.05)


def run_mount(
    mountpoint: str,
    make_core: Callable[[], BucketFS],
    *,
    foreground: bool,
    metadata_ttl: float,
    fsname: str,
    read_ahead_kb: int = 1024,
    debug: bool = False,
) -> None:
    """Mount and serve until unmounted. In background mode libfuse forks first."""
    fuse = _load_mfusepy()
    ttl = metadata_ttl if metadata_ttl != float("inf") else 86400.0

    def erofs(*_args: Any) -> int:
        raise fuse.FuseOSError(errno.EROFS)

    class Adapter(fuse.Operations):  # type: ignore[misc, name-defined]
        use_ns = True

        def __init__(self) -> None:
            self.core: BucketFS | None = None
            self.destroyed = False

        def init_with_config(self, conn: Any, config: Any) -> None:
            if config is not None:
                config.entry_timeout = ttl
                config.attr_timeout = ttl
                config.negative_timeout = 0
            self.core = make_core()
            if read_ahead_kb > 0:
                # The mount shows in mountinfo only once INIT is answered: tune it later.
                threading.Thread(
                    target=tune_read_ahead,
                    args=(mountpoint, read_ahead_kb),
                    name="tune-read-ahead",
                    daemon=True,
                ).start()
            log.info("mounted %s at %s", fsname, mountpoint)

        def destroy(self, path: str) -> None:
            self.destroyed = True
            if self.core is not None:
                self.core.close()
                log.info("unmounted %s", mountpoint)

        def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return fn(*args)
            except FsError as exc:
                raise fuse.FuseOSError(exc.errno) from None

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            return self._call(self.core.getattr, path)  # type: ignore[union-attr]

        def readdir(self, path: str, fh: int) -> list[str]:
            return self._call(self.core.readdir, path)  # type: ignore[union-attr]

        # raw_fi: open, read and release get the fuse_file_info struct, so open
        # can set keep_cache (page cache kept across opens of an unchanged object).
        def open(self, path: str, fi: Any) -> int:
            fh = self._call(self.core.open, path, fi.flags)  # type: ignore[union-attr]
            fi.fh = fh
            fi.keep_cache = 1 if self.core.keep_cache(fh) else 0  # type: ignore[union-attr]
            return 0

        # mfusepy registers libfuse's read callback because this method exists;
        # ZeroCopyFUSE below serves that callback through read_into instead.
        def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
            return self._call(self.core.read, fi.fh, size, offset)  # type: ignore[union-attr]

        def read_into(self, fi: Any, offset: int, view: memoryview) -> int:
            return self._call(self.core.read_into, fi.fh, offset, view)  # type: ignore[union-attr]

        def release(self, path: str, fi: Any) -> int:
            self._call(self.core.release, fi.fh)  # type: ignore[union-attr]
            return 0

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            return self._call(self.core.getxattr, path, name)  # type: ignore[union-attr]

        def listxattr(self, path: str) -> list[str]:
            return self._call(self.core.listxattr, path)  # type: ignore[union-attr]

        def statfs(self, path: str) -> dict[str, int]:
            return self._call(self.core.statfs)  # type: ignore[union-attr]

        # A read-only mount: every change answers EROFS.
        create = write = truncate = unlink = rmdir = mkdir = mknod = erofs
        rename = link = symlink = chmod = chown = utimens = erofs
        setxattr = removexattr = erofs

    options: dict[str, Any] = {
        "foreground": foreground,
        "debug": debug,
        "ro": True,
        "fsname": fsname,
        "subtype": "ossfs-resume",
        "default_permissions": True,
    }

    class ZeroCopyFUSE(fuse.FUSE):  # type: ignore[misc, name-defined]
        """mfusepy's read returns bytes that it then copies into libfuse's buffer; here
        the core writes into that buffer directly (cached parts: one pread, GIL released)."""

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            target = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            return self.operations.read_into(fip.contents, offset, memoryview(target).cast("B"))

    adapter = Adapter()
    try:
        ZeroCopyFUSE(adapter, mountpoint, raw_fi=True, **options)
    except RuntimeError:
        # libfuse reports a loop ended by SIGINT/SIGTERM as an error, but the
        # file system was destroyed and unmounted cleanly: that is a normal exit.
        if not adapter.destroyed:
            raise
