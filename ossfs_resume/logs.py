"""Where the commands log: stderr, a file, or syslog/journald for a background mount.

Log files are opened with ``WatchedFileHandler``: when logrotate moves the file
away, the next line goes to a new file at the same path. SIGHUP cannot be used to
ask for a reopen: a mount's process is libfuse's loop, and ``fuse_main`` installs
its own SIGHUP, SIGINT and SIGTERM handlers (``fuse_set_signal_handlers``), which
end the loop and unmount. So a rotation needs no signal (no ``postrotate``), and a
SIGHUP still unmounts, as for any libfuse file system.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

SYSLOG_SOCKET = "/dev/log"
_FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"
# syslog adds the time and host; the tag names the program and the pid.
_SYSLOG_FORMAT = "ossfs-resume[%(process)d]: %(levelname)s %(name)s: %(message)s"


def _level(verbose: int) -> int:
    return logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING


def _install(handler: logging.Handler, level: int, fmt: str = _FORMAT) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs every retry with full URLs; ours are enough.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


class _PrivateWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """WatchedFileHandler whose reopened files are owner-only too (not the umask's)."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def file_handler(path: str | Path) -> logging.Handler:
    """A handler appending to `path`, created owner-only (the log names buckets, keys and
    ETags), reopened when the file is moved or removed (logrotate)."""
    path = str(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.close(fd)
    with contextlib.suppress(OSError):
        if os.stat(path).st_uid == os.geteuid():
            os.chmod(path, 0o600)
    return _PrivateWatchedFileHandler(path)


def setup_logging(verbose: int, log_file: str | None) -> None:
    """stderr, or `log_file` (at least INFO: a file is read after the fact)."""
    level = _level(verbose)
    if log_file:
        _install(file_handler(log_file), min(level, logging.INFO))
    else:
        _install(logging.StreamHandler(sys.stderr), level)


def setup_background_logging(
    verbose: int, fallback_file: Path | None, *, syslog_socket: str = SYSLOG_SOCKET
) -> str | None:
    """A background mount without --log-file: syslog/journald when `syslog_socket` exists,
    else `fallback_file` (None: keep the current handlers). Returns where it logs."""
    level = min(_level(verbose), logging.INFO)
    if os.path.exists(syslog_socket):
        try:
            handler: logging.Handler = logging.handlers.SysLogHandler(
                address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
        except OSError:
            pass
        else:
            _install(handler, level, _SYSLOG_FORMAT)
            return f"syslog ({syslog_socket})"
    if fallback_file is None:
        return None
    _install(file_handler(fallback_file), level)
    return str(fallback_file)


def check_port_free(address: str, port: int) -> None:
    """One clear line now, rather than a mount whose metrics silently fail to start."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise UsageError(
                f"cannot serve metrics at {address}:{port}: {exc.strerror or exc}"
            ) from None
