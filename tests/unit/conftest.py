"""Fixtures shared by the unit tests."""

from __future__ import annotations

import contextlib
import signal
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ossfs_resume.cache import PartCache

Server = TypeVar("Server", bound=socketserver.BaseServer)

#: Unit tests take well under a second; a hang (a deadlock, a read that never
#: returns) becomes a failure after this long instead of stalling the run.
WATCHDOG_SECONDS = 10.0


@pytest.fixture
def watchdog() -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"test still running after {WATCHDOG_SECONDS} s: a deadlock or hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[PartCache]:
    """A real part cache in a temp dir, closed after the test."""
    c = PartCache(tmp_path / "cache")
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def serving(srv: Server) -> Iterator[Server]:
    """Run a socketserver in a thread for the duration of the block, then shut it down."""
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
