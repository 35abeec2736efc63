"""Who is writing: a token per process that stays unique across pid reuse.

A reservation row and a temp file carry their writer's token, so the
start-up sweep can tell a write in progress from the leftovers of a process
that died (``kill -9``) without waiting for anything to age.
"""

from __future__ import annotations

import functools
import os


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = raw.rpartition(b")")[2].split()
    if len(fields) <= 19 or fields[0] in (b"Z", b"X"):  # a zombie has exited
        return None
    return fields[19].decode()


@functools.cache
def _token_for(pid: int) -> str:
    return f"{pid}-{_start_time(pid) or 0}"


def writer_token() -> str:
    """This process's token (recomputed after a fork: the pid differs)."""
    return _token_for(os.getpid())


def writer_alive(token: str) -> bool:
    """False only when the process that made `token` has certainly exited."""
    pid_text, _, started = token.partition("-")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    now = _start_time(pid)
    if now is None:
        return not os.path.exists("/proc/self/stat") and _pid_exists(pid)
    return started in ("0", now)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
