"""Thin FUSE adapter over BucketFS: translate calls, map errors, nothing else.

The core is built in ``init``, i.e. after libfuse has daemonized: threads,
sockets and SQLite handles created before a fork do not survive it.

Every callback goes through :func:`fuse_errno`: whatever it raises becomes an
errno (never mfusepy's catch-all EINVAL), and a failure is logged once, as one
line naming the operation and the path (the traceback only at debug level).

mfusepy is used through its public interface only: a plain ``FUSE`` (its docs say
not to subclass it) given this adapter; reads are its ``read_buf`` callback, so the
core fills the buffer libfuse replies from, with no copy in Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from .core import BucketFS, FsError
from .errors import OssfsError
from .metrics import METRICS_XATTR, MountMetrics

log = logging.getLogger(__name__)

# read_buf hands libfuse buffers that libfuse releases with free() once it has replied
# (fuse_free_buf), so they must come from the malloc it links to: the process-wide one.
_libc = ctypes.CDLL(None)
_malloc = _libc.malloc
_malloc.restype = ctypes.c_void_p
_malloc.argtypes = [ctypes.c_size_t]
_free = _libc.free
_free.restype = None
_free.argtypes = [ctypes.c_void_p]


class FuseBuf(ctypes.Structure):
    """libfuse's struct fuse_buf (fuse_common.h; off_t is 64-bit in libfuse 3)."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class FuseBufvec(ctypes.Structure):
    """libfuse's struct fuse_bufvec. Its first fuse_buf is inline (``struct fuse_buf
    buf[1]``); mfusepy's ctypes fuse_bufvec declares a pointer there, so it cannot be used
    to fill one."""

    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", FuseBuf * 1),
    ]


_VOID_PP = ctypes.POINTER(ctypes.c_void_p)


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


def fuse_errno(op: str, path: str, exc: Exception) -> int:
    """The errno that answers `exc` from FUSE operation `op` on `path`.

    A store or cache failure is logged here, once; a plain answer of the core
    (an FsError without `failure`: ENOENT for a missing name, EROFS, ...) is not.
    """
    if isinstance(exc, FsError):
        if not exc.failure:
            return exc.errno
        code, why = exc.errno, exc.strerror
    elif isinstance(exc, OssfsError):
        code, why = exc.errno, str(exc)
    elif isinstance(exc, MemoryError):
        code, why = errno.ENOMEM, f"out of memory: {exc}"
    elif isinstance(exc, sqlite3.Error):
        code, why = errno.EIO, f"the cache index failed: {type(exc).__name__}: {exc}"
    else:
        # OSError from the cache's files, or a bug: the caller's arguments were fine,
        # so never EINVAL; EIO says "this read failed", which is what happened.
        code, why = errno.EIO, f"{type(exc).__name__}: {exc}"
    log.log(
        logging.ERROR if code == errno.EIO else logging.WARNING,
        "%s %s: %s",
        op,
        path,
        why,
        exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
    )
    return code


class FuseAdapter:
    """The mfusepy operations object: each callback calls the core through `_call`.

    A plain module-level class (mfusepy registers whichever callbacks the object
    has), so a test can build one from a core factory and drive it without a mount.
    """

    use_ns = True

    def __init__(
        self,
        make_core: Callable[[], BucketFS],
        *,
        mountpoint: str,
        metadata_ttl: float,
        read_ahead_kb: int = 1024,
        fsname: str = "",
        error_type: Callable[[int], OSError] | None = None,
        metrics: MountMetrics | None = None,
        metrics_address: str = "127.0.0.1",
        metrics_port: int | None = None,
    ) -> None:
        self.make_core = make_core
        # Timers of the FUSE calls; the HTTP server starts in init (after the fork).
        self.metrics = metrics
        self.metrics_address = metrics_address
        self.metrics_port = metrics_port
        self.mountpoint = mountpoint
        self.ttl = metadata_ttl if metadata_ttl != float("inf") else 86400.0
        self.read_ahead_kb = read_ahead_kb
        self.fsname = fsname or mountpoint
        self.error_type = error_type or _load_mfusepy().FuseOSError
        self.core: BucketFS | None = None
        self.destroyed = False
        # Path of each open handle: read_into is given the handle only, and its log
        # line must still name the file.
        self._paths: dict[int, str] = {}

    def _call(self, op: str, path: str, fn: Callable[..., Any], *args: Any) -> Any:
        metrics = self.metrics
        if metrics is None:
            try:
                return fn(*args)
            except Exception as exc:
                raise self.error_type(fuse_errno(op, path, exc)) from None
        started = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:
            metrics.failed(op)
            raise self.error_type(fuse_errno(op, path, exc)) from None
        finally:
            metrics.timer(op).observe(time.perf_counter() - started)

    def _core(self) -> BucketFS:
        if self.core is None:  # a callback before init, or after init failed
            raise FsError(errno.EIO, "the file system is not initialized", failure=True)
        return self.core

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            # The kernel sends page-cache reads (nearly all reads, read-ahead included)
            # as background requests, at most 12 in flight by default: the rest of
            # libfuse's threads would sit idle while readers of a slow store queue.
            conn.max_background = FUSE_THREADS
            conn.congestion_threshold = FUSE_THREADS * 3 // 4
        if config is not None:
            config.entry_timeout = self.ttl
            config.attr_timeout = self.ttl
            config.negative_timeout = 0
        # A core that cannot be built fails the mount (mfusepy aborts on an error in
        # init), after one line saying why.
        self.core = self._call("init", self.mountpoint, self.make_core)
        if self.metrics is not None and self.metrics_port is not None:
            try:
                self.metrics.serve(self.metrics_address, self.metrics_port)
            except OSError as exc:
                # The mount is up and serving: no metrics is no reason to fail it.
                log.error(
                    "cannot serve metrics at %s:%d: %s; the mount runs without them",
                    self.metrics_address,
                    self.metrics_port,
                    exc.strerror or exc,
                )
        if self.read_ahead_kb > 0:
            # The mount shows in mountinfo only once INIT is answered: tune it later.
            threading.Thread(
                target=tune_read_ahead,
                args=(self.mountpoint, self.read_ahead_kb),
                name="tune-read-ahead",
                daemon=True,
            ).start()
        log.info("mounted %s at %s", self.fsname, self.mountpoint)

    def destroy(self, path: str) -> None:
        self.destroyed = True
        if self.metrics is not None:
            self.metrics.close()
        if self.core is not None:
            self.core.close()  # logs its own failures, step by step
            log.info("unmounted %s", self.mountpoint)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        return self._call("getattr", path, lambda: self._core().getattr(path))

    def readdir(self, path: str, fh: int) -> list[str]:
        return self._call("readdir", path, lambda: self._core().readdir(path))

    # raw_fi: open, read and release get the fuse_file_info struct, so open
    # can set keep_cache (page cache kept across opens of an unchanged object).
    def open(self, path: str, fi: Any) -> int:
        def open_() -> tuple[int, bool]:
            core = self._core()
            fh = core.open(path, fi.flags)
            return fh, core.keep_cache(fh)

        fh, keep = self._call("open", path, open_)
        self._paths[fh] = path
        fi.fh = fh
        fi.keep_cache = 1 if keep else 0
        return 0

    # Not libfuse's hot path: with read_buf set, libfuse never calls read
    # (fuse_fs_read_buf prefers read_buf). The plain-bytes form, for callers that want one.
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return self._call("read", path, lambda: self._core().read(fi.fh, size, offset))

    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        """libfuse's read: the core writes into a malloc'ed buffer that libfuse replies
        from (one writev) and then frees, with the bufvec around it (fuse_lib_read).

        `bufpp` is a ``struct fuse_bufvec **``; it is set only on success, so after a
        failure libfuse frees nothing and the buffers are freed here.
        """
        vec = _malloc(ctypes.sizeof(FuseBufvec))
        mem = _malloc(size or 1)  # malloc(0) may answer NULL
        try:
            if not vec or not mem:
                exc = MemoryError(f"cannot allocate a {size}-byte read buffer")
                raise self.error_type(fuse_errno("read", path, exc))
            view = memoryview((ctypes.c_char * size).from_address(mem)).cast("B")
            n = self.read_into(fi, offset, view)
            bufvec = FuseBufvec.from_address(vec)
            bufvec.count, bufvec.idx, bufvec.off = 1, 0, 0
            buf = bufvec.buf[0]
            buf.size, buf.flags, buf.mem, buf.fd, buf.pos = n, 0, mem, -1, 0
        except BaseException:
            _free(mem)
            _free(vec)
            raise
        ctypes.cast(bufpp, _VOID_PP)[0] = vec
        return 0

    def read_into(self, fi: Any, offset: int, view: memoryview) -> int:
        # The hot path: no closure, and the path looked up only for a failure's log line.
        fh = fi.fh
        metrics = self.metrics
        started = time.perf_counter() if metrics is not None else 0.0
        try:
            n = self._core().read_into(fh, offset, view)
        except Exception as exc:
            path = self._paths.get(fh, f"<handle {fh}>")
            if metrics is not None:
                metrics.failed("read")
                metrics.timer("read").observe(time.perf_counter() - started)
            raise self.error_type(fuse_errno("read", path, exc)) from None
        if metrics is not None:
            metrics.timer("read").observe(time.perf_counter() - started)
            metrics.read_bytes.inc(n)
        return n

    def release(self, path: str, fi: Any) -> int:
        self._paths.pop(fi.fh, None)
        self._call("release", path, lambda: self._core().release(fi.fh))
        return 0

    def _metrics_url(self, path: str) -> str | None:
        """The metrics endpoint, shown on the mount's root (for `ossfs-resume stats`)."""
        if path != "/" or self.metrics is None:
            return None
        return self.metrics.url

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        url = self._metrics_url(path) if name == METRICS_XATTR else None
        if url is not None:
            return url.encode()
        return self._call("getxattr", path, lambda: self._core().getxattr(path, name))

    def listxattr(self, path: str) -> list[str]:
        names = self._call("listxattr", path, lambda: self._core().listxattr(path))
        return [*names, METRICS_XATTR] if self._metrics_url(path) else names

    def statfs(self, path: str) -> dict[str, int]:
        return self._call("statfs", path, lambda: self._core().statfs())

    # A read-only mount: every change answers EROFS.
    def erofs(self, *_args: Any) -> int:
        raise self.error_type(errno.EROFS)

    create = write = truncate = unlink = rmdir = mkdir = mknod = erofs
    rename = link = symlink = chmod = chown = utimens = erofs
    setxattr = removexattr = erofs


#: Requests libfuse serves at once (its default is 10).
FUSE_THREADS = 64


def run_mount(
    mountpoint: str,
    make_core: Callable[[], BucketFS],
    *,
    foreground: bool,
    metadata_ttl: float,
    fsname: str,
    read_ahead_kb: int = 1024,
    debug: bool = False,
    allow_other: bool = False,
    allow_root: bool = False,
    metrics_address: str = "127.0.0.1",
    metrics_port: int | None = None,
) -> None:
    """Mount and serve until unmounted. In background mode libfuse forks first.

    `allow_other` lets every user in (the kernel still checks modes: default_permissions),
    `allow_root` root as well as the owner; at most one of them.
    """
    fuse = _load_mfusepy()
    options: dict[str, Any] = {
        "foreground": foreground,
        "debug": debug,
        "ro": True,
        "fsname": fsname,
        "subtype": "ossfs-resume",
        "default_permissions": True,
        # libfuse serves at most 10 requests at once by default: with one GET per
        # uncached small file, that capped 16 readers on a 20 ms link at 400 files/s.
        "max_threads": FUSE_THREADS,
    }
    if allow_other:
        options["allow_other"] = True
    elif allow_root:
        options["allow_root"] = True

    adapter = FuseAdapter(
        make_core,
        mountpoint=mountpoint,
        metadata_ttl=metadata_ttl,
        read_ahead_kb=read_ahead_kb,
        fsname=fsname,
        error_type=fuse.FuseOSError,
        metrics_address=metrics_address,
        metrics_port=metrics_port,
    )
    if metrics_port is not None:
        adapter.metrics = MountMetrics(lambda: adapter.core)
    try:
        # mfusepy's documented interface: a plain FUSE, the callbacks on the adapter.
        fuse.FUSE(adapter, mountpoint, raw_fi=True, **options)
    except RuntimeError:
        # libfuse reports a loop ended by SIGINT/SIGTERM as an error, but the
        # file system was destroyed and unmounted cleanly: that is a normal exit.
        if not adapter.destroyed:
            raise
