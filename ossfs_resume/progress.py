"""Progress display for long transfers: a tqdm bar on a terminal, log lines elsewhere.

A bar written into a log file or a pipe is noise (one carriage-return update
per part), so the bar is only drawn when stderr is a terminal, unless forced.
Without a bar, the start and the end of the transfer are logged instead, so a
batch job's log still says what was transferred and how fast.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, TextIO

log = logging.getLogger(__name__)

ProgressMode = Literal["auto", "always", "never"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _display(mode: ProgressMode, stream: TextIO) -> tuple[bool, bool]:
    """(draw a bar, write a line every few seconds) for `mode` on `stream`: "auto" draws
    on a terminal and writes lines elsewhere."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"bad progress mode {mode!r}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        bar = bool(isatty and isatty())
        return bar, not bar
    return mode == "always", False


def _byte_bar(desc: str, total: int, initial: int, stream: TextIO) -> Any:
    """A tqdm bar counting bytes (imported here: only a terminal needs it)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=stream,
        dynamic_ncols=True,
        leave=True,
    )


class ProgressReporter:
    """A ``(consumed_bytes, total_bytes)`` callback that draws a bar or logs start/end.

    The total is only known once the transfer has looked at the object, so the
    bar is created on the first call. Calls that would move the bar backwards
    are ignored: the display never goes back even if a caller misbehaves.
    """

    def __init__(
        self,
        desc: str,
        *,
        mode: ProgressMode = "auto",
        stream: TextIO | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        # Off a terminal (auto mode): a progress line every `interval` seconds instead.
        self.enabled, self.periodic = _display(mode, self.stream)
        self.interval = interval
        self._clock = clock
        self._last_line = 0.0
        self.consumed: int | None = None
        self.total: int | None = None
        self._first: int = 0
        self._started: float | None = None
        self._bar = None
        self._closed = False

    def __call__(self, consumed: int, total: int) -> None:
        if self._started is None:
            self._start(consumed, total)
        if self.consumed is not None and consumed < self.consumed:
            return
        self.consumed, self.total = consumed, total
        if self.periodic and self._clock() - self._last_line >= self.interval:
            self._line()
        if self._bar is not None:
            if self._bar.total != total:
                self._bar.total = total
            self._bar.update(consumed - self._bar.n)

    def _line(self) -> None:
        """``KEY: 1.2 GiB of 4.0 GiB (30%), 85.3 MiB/s, ETA 36 s`` on the stream."""
        now = self._clock()
        self._last_line = now
        if self._started is None or self.consumed is None or not self.total:
            return
        elapsed = now - self._started
        if elapsed <= 0:
            return
        rate = (self.consumed - self._first) / elapsed
        left = self.total - self.consumed
        eta = f"{left / rate:.0f} s" if rate > 0 else "unknown"
        self.stream.write(
            f"{self.desc}: {format_bytes(self.consumed)} of {format_bytes(self.total)} "
            f"({self.consumed / self.total:.0%}), {format_bytes(rate)}/s, ETA {eta}\n"
        )
        self.stream.flush()

    def _start(self, consumed: int, total: int) -> None:
        self._started = self._clock()
        self._last_line = self._started
        self._first = consumed
        if self.enabled:
            self._bar = _byte_bar(self.desc, total, consumed, self.stream)
        else:
            resumed = f", resuming at {format_bytes(consumed)}" if consumed else ""
            log.info("%s: starting, %s%s", self.desc, format_bytes(total), resumed)

    def close(self) -> None:
        """Finish the bar, or log the end line; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if self._started is None or self.consumed is None or self.total is None:
            return
        elapsed = max(self._clock() - self._started, 1e-6)
        moved = self.consumed - self._first
        state = "finished" if self.consumed >= self.total else "stopped"
        log.info(
            "%s: %s at %s of %s; %s in %.1f s (%s/s)",
            self.desc,
            state,
            format_bytes(self.consumed),
            format_bytes(self.total),
            format_bytes(moved),
            elapsed,
            format_bytes(moved / elapsed),
        )

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ProgressTracker:
    """The one progress interface of transfers: ``callback(done_bytes, total_bytes)``.

    As oss2's resumable download does: the first call says what is already
    done, each batch of parts that lands adds to it, and ``finish`` makes the
    final ``(total, total)`` call, exactly once, after the result is in place.
    Values never go backwards and never reach the total before ``finish``
    (so with one thread the calls are exactly oss2's).
    """

    def __init__(self, total: int, callback: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.callback = callback
        self.done = 0
        self._reported = -1
        self._finished = False
        self._lock = threading.Lock()

    def start(self, done: int) -> None:
        """What an earlier run left (0 for a fresh start): the first call."""
        with self._lock:
            self.done = done
        self._report()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
        self._report()

    def _report(self) -> None:
        with self._lock:
            if self.callback is None or self._finished or not self.total:
                return
            value = self.done
            # All bytes in is not done yet (verify, rename): ``finish`` says so, once.
            if value >= self.total or value <= self._reported:  # -1: the first call goes out
                return
            self._reported = value
        self.callback(value, self.total)

    def finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self.done = self.total
        if self.callback is not None:
            self.callback(self.total, self.total)


class AggregateProgress:
    """One display for a set of files fetched at once: files done, bytes, rate, ETA.

    On a terminal (or with mode "always") a tqdm bar of bytes whose postfix counts
    files; off a terminal in auto mode, a status line every `interval` seconds; with
    "never", only the start and end are logged. ``add`` and ``file_done`` are called
    from the threads fetching the files, so everything here is under one lock.
    """

    def __init__(
        self,
        desc: str,
        *,
        mode: ProgressMode = "auto",
        stream: TextIO | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.bar_enabled, self.periodic = _display(mode, self.stream)
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self.files_total = self.files_done = 0
        self.bytes_total = self.bytes_done = 0
        self._first = 0
        self._started: float | None = None
        self._last_line = 0.0
        self._bar: Any = None
        self._closed = False

    def start(
        self, *, files_total: int, files_done: int, bytes_total: int, bytes_done: int
    ) -> None:
        """What the set holds and what is already cached: the display starts from there."""
        with self._lock:
            self.files_total, self.files_done = files_total, files_done
            self.bytes_total, self.bytes_done = bytes_total, bytes_done
            self._first = bytes_done
            self._started = self._last_line = self._clock()
        if self.bar_enabled:
            self._bar = _byte_bar(self.desc, bytes_total, bytes_done, self.stream)
            self._bar.set_postfix_str(self._files_text(), refresh=False)
        else:
            resumed = f", {format_bytes(bytes_done)} already cached" if bytes_done else ""
            log.info(
                "%s: starting, %d files, %s%s",
                self.desc,
                files_total,
                format_bytes(bytes_total),
                resumed,
            )

    @property
    def started(self) -> bool:
        return self._started is not None

    def _files_text(self) -> str:
        return f"{self.files_done}/{self.files_total} files"

    def add(self, nbytes: int) -> None:
        """Bytes of some file that are now cached."""
        with self._lock:
            self.bytes_done = min(self.bytes_total, self.bytes_done + nbytes)
            self._update(nbytes)

    def file_done(self) -> None:
        with self._lock:
            self.files_done = min(self.files_total, self.files_done + 1)
            if self._bar is not None:
                self._bar.set_postfix_str(self._files_text(), refresh=False)
            self._update(0)

    def _update(self, nbytes: int) -> None:
        """Called with the lock held: move the bar, or write a line when one is due."""
        if self._started is None or self._closed:
            return
        if self._bar is not None:
            self._bar.update(nbytes)
        elif self.periodic and self._clock() - self._last_line >= self.interval:
            self._last_line = self._clock()
            self.stream.write(f"{self.desc}: {self._status()}\n")
            self.stream.flush()

    def status(self) -> str:
        """``3/10 files, 1.2 GiB of 4.0 GiB (30%), 85.3 MiB/s, ETA 36 s``."""
        with self._lock:
            return self._status()

    def _status(self) -> str:
        percent = self.bytes_done / self.bytes_total if self.bytes_total else 1.0
        text = (
            f"{self._files_text()}, {format_bytes(self.bytes_done)} of "
            f"{format_bytes(self.bytes_total)} ({percent:.0%})"
        )
        if self._started is None:
            return text
        elapsed = self._clock() - self._started
        rate = (self.bytes_done - self._first) / elapsed if elapsed > 0 else 0.0
        left = self.bytes_total - self.bytes_done
        eta = f"{left / rate:.0f} s" if rate > 0 else ("0 s" if not left else "unknown")
        return f"{text}, {format_bytes(rate)}/s, ETA {eta}"

    def close(self) -> None:
        """Finish the bar, or log the end line; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            bar, self._bar = self._bar, None
            if self._started is None:
                return
            elapsed = max(self._clock() - self._started, 1e-6)
            moved = self.bytes_done - self._first
            text = self._files_text()
        if bar is not None:
            bar.close()
        log.info(
            "%s: %s, %s fetched in %.1f s (%s/s)",
            self.desc,
            text,
            format_bytes(moved),
            elapsed,
            format_bytes(moved / elapsed),
        )

    def __enter__(self) -> AggregateProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
