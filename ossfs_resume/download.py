"""Resumable, parallel download of one object to a local file.

The object is cut into aligned parts fetched by a thread pool into a temp file
beside the target (``LOCAL_FILE.tmp``), each written at its offset. A JSON
checkpoint (``LOCAL_FILE.dcp``) records which parts are done, each with its
CRC-64, so a run that was killed (even ``kill -9``) continues with the missing
parts only. It avoids the known faults of the official SDKs' resumable
downloads (oss2, the Go SDK):

* the checkpoint carries its own checksum and is replaced atomically, and a
  part is recorded only after its data is durable: a crash can lose work but
  never record a part that is not on disk;
* every part request is pinned to the ETag with ``If-Match``, and a resumed run
  re-checks ETag, size and Last-Modified, so the result is never a mix of two
  versions of the object;
* parts recorded by an earlier run are re-read and checked against their CRC
  before they are trusted; a missing or short temp file means starting over;
* the whole file is verified (CRC-64, else MD5, else per-part CRCs) before it
  replaces the target, also on resumed runs, and a failed check removes the
  checkpoint and the temp file so that a retry does not fail the same way;
* a 0-byte object works, and Ctrl-C stops scheduling, keeps the finished
  parts and leaves a usable checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from .checksum import crc64, crc64_of_parts
from .client import ObjectMeta, StoreClient
from .durable import fsync_dir
from .errors import (
    CheckpointError,
    ChecksumError,
    OssfsError,
    PreconditionFailedError,
    UsageError,
)
from .parts import (
    DEFAULT_PART_SIZE,
    MAX_PART_SIZE,
    MIB,
    MIN_PART_SIZE,
    check_part_size,
    part_bounds,
    part_count,
)
from .progress import add_progress_option

log = logging.getLogger("ossfs_resume.download")  # also when run as __main__

ProgressCallback = Callable[[int, int], None]

DEFAULT_THREADS = 8
#: The most --threads the command line accepts (the library takes any count >= 1).
MAX_THREADS = 256
TEMP_SUFFIX = ".tmp"
CHECKPOINT_SUFFIX = ".dcp"
CHECKPOINT_FORMAT = "ossfs-resume-download"
CHECKPOINT_VERSION = 1

#: Local reads (re-checking parts, MD5) go in slices this big: bounded memory.
_READ_CHUNK = 8 * MIB
#: Linux writes at most this much per write(2)/pwrite(2) call (0x7ffff000).
_MAX_WRITE = 0x7FFFF000
_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")
_CRC_HEX = re.compile(r"^[0-9a-f]{16}$")


# --------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class ObjectIdentity:
    """What makes downloaded parts reusable: the same bytes of the same object version."""

    store_id: str
    bucket: str
    key: str
    size: int
    etag: str
    last_modified: float

    @classmethod
    def of(cls, client: StoreClient, meta: ObjectMeta) -> ObjectIdentity:
        return cls(
            store_id=client.config.store_id,
            bucket=client.config.bucket,
            key=meta.key,
            size=meta.size,
            etag=meta.etag,
            last_modified=meta.last_modified,
        )

    def differences(self, other: ObjectIdentity) -> list[str]:
        """Human-readable list of the fields that differ (for the log)."""
        out = []
        for name in ("store_id", "bucket", "key", "size", "etag", "last_modified"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} {mine!r} -> {theirs!r}")
        return out


@dataclass(frozen=True)
class PartRecord:
    """A finished part: CRC-64/XZ of its bytes and its length."""

    crc64: int
    length: int


@dataclass
class Checkpoint:
    """Progress of one download; serialised as JSON with a SHA-256 over its canonical form.

    File layout (keys sorted, one line)::

        {"checksum": "sha256:<hex of the canonical JSON of everything else>",
         "destination": "/abs/path/LOCAL_FILE",
         "format": "ossfs-resume-download", "version": 1,
         "object": {"bucket": ..., "etag": ..., "key": ..., "last_modified": <float>,
                    "size": <int>, "store_id": "s3+http://host:port"},
         "part_size": <int>,
         "parts": [[<number>, "<crc64 as 16 lowercase hex digits>", <length>], ...]}
    """

    identity: ObjectIdentity
    destination: str
    part_size: int
    parts: dict[int, PartRecord] = field(default_factory=dict)

    @property
    def part_total(self) -> int:
        return part_count(self.identity.size, self.part_size)

    def done_bytes(self) -> int:
        return sum(rec.length for rec in self.parts.values())

    def recorded_end(self) -> int:
        """One past the last byte any recorded part covers (0 if none)."""
        return max((n * self.part_size + rec.length for n, rec in self.parts.items()), default=0)

    def body(self) -> dict[str, Any]:
        ident = self.identity
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "object": {
                "store_id": ident.store_id,
                "bucket": ident.bucket,
                "key": ident.key,
                "size": ident.size,
                "etag": ident.etag,
                "last_modified": ident.last_modified,
            },
            "destination": self.destination,
            "part_size": self.part_size,
            "parts": [
                [n, f"{rec.crc64:016x}", rec.length] for n, rec in sorted(self.parts.items())
            ],
        }

    def to_json(self) -> bytes:
        body = self.body()
        return _canonical({**body, "checksum": _digest(body)}) + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Checkpoint:
        """Parse and validate; any damage raises CheckpointError saying what is wrong."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError("not a JSON object")
        checksum = data.pop("checksum", None)
        if not isinstance(checksum, str):
            raise CheckpointError("no checksum")
        if data.get("format") != CHECKPOINT_FORMAT or data.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"unknown format {data.get('format')!r} version {data.get('version')!r}"
            )
        if checksum != _digest(data):
            raise CheckpointError("checksum mismatch (edited or corrupted)")
        # The checksum matched: what follows guards against a checkpoint written by
        # a buggy or foreign program, not against corruption.
        try:
            obj = data["object"]
            identity = ObjectIdentity(
                store_id=_typed(obj["store_id"], str),
                bucket=_typed(obj["bucket"], str),
                key=_typed(obj["key"], str),
                size=_typed(obj["size"], int),
                etag=_typed(obj["etag"], str),
                last_modified=float(_typed(obj["last_modified"], (int, float))),
            )
            destination = _typed(data["destination"], str)
            part_size = _typed(data["part_size"], int)
            raw_parts = _typed(data["parts"], list)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"missing or mistyped field ({exc})") from None
        if identity.size < 0:
            raise CheckpointError(f"negative size {identity.size}")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise CheckpointError(f"part size {part_size} out of range")
        cp = cls(identity, destination, part_size)
        total = cp.part_total
        for item in raw_parts:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and type(item[0]) is int
                and isinstance(item[1], str)
                and _CRC_HEX.match(item[1])
                and type(item[2]) is int
            ):
                raise CheckpointError(f"bad part entry {item!r}")
            number, crc_hex, length = item
            if not 0 <= number < total:
                raise CheckpointError(f"part {number} outside the object ({total} parts)")
            if number in cp.parts:
                raise CheckpointError(f"part {number} recorded twice")
            expected = part_bounds(identity.size, part_size, number)[1]
            if length != expected:
                raise CheckpointError(f"part {number} has length {length}, not {expected}")
            cp.parts[number] = PartRecord(int(crc_hex, 16), length)
        return cp

    def save(self, path: str) -> None:
        """Replace `path` atomically: write a temp file, fsync it, rename, fsync the directory.

        A crash at any point leaves either the old or the new checkpoint, never
        a torn one.
        """
        tmp = path + ".tmp"
        data = self.to_json()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint {path}: {exc.strerror or exc}"
            ) from None


def load_checkpoint(path: str) -> Checkpoint | None:
    """The checkpoint at `path`; None if there is none; CheckpointError if it is unusable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * MIB)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"unreadable ({exc.strerror or exc})") from None
    return Checkpoint.from_json(raw)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a JSON true is never a valid size or part number.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{value!r} is not {kind}")
    return value


# --------------------------------------------------------------------------- small helpers


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite everything: one call writes at most ~2 GiB on Linux, and may write less."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:_MAX_WRITE], offset)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        view = view[n:]
        offset += n


def _sync_data(fd: int) -> None:
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)


def _remove(path: str | None) -> None:
    if not path:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def _check_threads(num_threads: int) -> int:
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise UsageError(f"bad thread count {num_threads!r}: must be at least 1")
    return num_threads


def _check_writable_dir(directory: str, what: str) -> None:
    """Fail before any request if `what` cannot be created in `directory`.

    A real probe file, not os.access(): root passes access() checks even on a
    read-only mount.
    """
    if not os.path.exists(directory):
        raise UsageError(f"cannot use {what}: directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise UsageError(f"cannot use {what}: {directory} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ossfs-resume-probe-", dir=directory)
    except OSError as exc:
        raise UsageError(
            f"cannot use {what}: directory {directory} is not writable ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    _remove(probe)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _numbers(numbers: Iterable[int], limit: int = 10) -> str:
    items = sorted(numbers)
    text = ", ".join(map(str, items[:limit]))
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------- the download


class _Stopped(Exception):
    """Internal: a worker found the download cancelled before it started its part."""


def resumable_download(
    client: StoreClient,
    key: str,
    filename: str | os.PathLike[str],
    part_size: int | str = DEFAULT_PART_SIZE,
    num_threads: int = DEFAULT_THREADS,
    checkpoint_file: str | os.PathLike[str] | None = None,
    enable_checkpoint: bool = True,
    progress_callback: ProgressCallback | None = None,
) -> ObjectMeta:
    """Download `key` to `filename` in parallel parts, resuming from a checkpoint.

    Returns the object's metadata (from the HEAD that pinned the version).
    Bad arguments raise UsageError before any request. If a checkpoint from an
    earlier run matches the object, only missing parts are fetched, with the
    part size recorded there (not `part_size`). The target is replaced only
    after the whole file passed verification; the checkpoint is deleted then.

    Raises NotFoundError for a missing key, PreconditionFailedError if the
    object changes during the run, ChecksumError if the data fails the check,
    CheckpointError if the checkpoint cannot be written, and re-raises
    KeyboardInterrupt with the checkpoint saved.
    """
    size_of_part = check_part_size(part_size)
    threads = _check_threads(num_threads)
    destination = os.path.abspath(os.fspath(filename))
    if os.path.isdir(destination):
        raise UsageError(f"cannot download to {destination}: it is a directory")
    _check_writable_dir(os.path.dirname(destination), f"download target {destination}")
    checkpoint_path: str | None = None
    if enable_checkpoint:
        checkpoint_path = (
            os.path.abspath(os.fspath(checkpoint_file))
            if checkpoint_file
            else destination + CHECKPOINT_SUFFIX
        )
        if checkpoint_path in (destination, destination + TEMP_SUFFIX):
            raise UsageError(
                f"checkpoint file {checkpoint_path} would overwrite the download itself"
            )
        if os.path.isdir(checkpoint_path):
            raise UsageError(f"checkpoint file {checkpoint_path} is a directory")
        _check_writable_dir(os.path.dirname(checkpoint_path), f"checkpoint file {checkpoint_path}")
    meta = client.head(key)
    job = _Download(
        client, meta, destination, checkpoint_path, size_of_part, threads, progress_callback
    )
    return job.run()


class _Download:
    """One run of one download; the checkpoint is only touched by the calling thread."""

    def __init__(
        self,
        client: StoreClient,
        meta: ObjectMeta,
        destination: str,
        checkpoint_path: str | None,
        part_size: int,
        threads: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.client = client
        self.meta = meta
        self.destination = destination
        self.temp = destination + TEMP_SUFFIX
        self.checkpoint_path = checkpoint_path
        self.part_size = part_size
        self.threads = threads
        self.progress = progress
        self.identity = ObjectIdentity.of(client, meta)
        self.name = client.describe(meta.key)
        self._fd = -1
        self._local = threading.local()
        self._stop = threading.Event()
        self._progress_lock = threading.Lock()
        self._reported = -1

    # -- top level --------------------------------------------------------

    def run(self) -> ObjectMeta:
        cp = self._prepare()
        try:
            try:
                self._fetch_missing(cp)
            except PreconditionFailedError as exc:
                # The parts on disk belong to a version that no longer exists.
                self._close()
                self._discard()
                raise PreconditionFailedError(
                    f"{self.name} changed during the download (it was ETag {self.meta.etag}); "
                    f"{self.destination} was not written: run again to download the new version",
                    status=exc.status or 412,
                    code=exc.code,
                    key=self.meta.key,
                    request_id=exc.request_id,
                ) from exc
            self._verify(cp)
            os.fsync(self._fd)
            self._close()
            try:
                os.replace(self.temp, self.destination)
            except OSError as exc:
                raise OssfsError(
                    f"cannot move {self.temp} to {self.destination}: {exc.strerror or exc}"
                ) from None
            fsync_dir(os.path.dirname(self.destination))
        finally:
            self._close()
        try:
            self._report(self.meta.size, force=True)
        finally:
            _remove(self.checkpoint_path)  # even if the callback raised: the file is in place
        log.info(
            "downloaded %s to %s: %d bytes in %s",
            self.name,
            self.destination,
            self.meta.size,
            _plural(cp.part_total, "part"),
        )
        return self.meta

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _discard(self) -> None:
        """Remove the checkpoint and the temp file: the next run starts from nothing."""
        _remove(self.checkpoint_path)
        _remove(self.temp)

    # -- starting or resuming ----------------------------------------------

    def _prepare(self) -> Checkpoint:
        """Load a usable checkpoint or start afresh; open and size the temp file."""
        cp = self._resumable_checkpoint() if self.checkpoint_path else None
        resuming = cp is not None
        if cp is None:
            cp = Checkpoint(self.identity, self.destination, self.part_size)
        flags = os.O_RDWR | os.O_CREAT | (0 if resuming else os.O_TRUNC)
        try:
            self._fd = os.open(self.temp, flags, 0o644)
            # Preallocate (sparsely): parts land at their offsets in any order.
            os.ftruncate(self._fd, self.meta.size)
        except OSError as exc:
            self._close()
            raise OssfsError(f"cannot create {self.temp}: {exc.strerror or exc}") from None
        if resuming and cp.parts:
            bad = self._bad_parts_on_disk(cp, cp.parts)
            if bad:
                log.warning(
                    "%s: %s in %s no longer match their recorded CRC-64 (%s); fetching them again",
                    self.name,
                    _plural(len(bad), "part"),
                    self.temp,
                    _numbers(bad),
                )
                for n in bad:
                    del cp.parts[n]
        if self.checkpoint_path:
            try:
                cp.save(self.checkpoint_path)
            except CheckpointError:
                self._close()
                raise
        return cp

    def _resumable_checkpoint(self) -> Checkpoint | None:
        """The earlier run's checkpoint if its parts can be reused, else None (files discarded)."""
        assert self.checkpoint_path is not None
        try:
            cp = load_checkpoint(self.checkpoint_path)
        except CheckpointError as exc:
            log.warning(
                "%s: checkpoint %s is damaged (%s); discarding it and %s, "
                "and downloading every part again",
                self.name,
                self.checkpoint_path,
                exc,
                self.temp,
            )
            self._discard()
            return None
        if cp is None:
            # A temp file without a checkpoint says nothing about its contents.
            return None
        changes = cp.identity.differences(self.identity)
        if cp.destination != self.destination:
            changes.append(f"destination {cp.destination!r} -> {self.destination!r}")
        if changes:
            log.info(
                "%s: checkpoint %s is for another object version or target (%s); starting over",
                self.name,
                self.checkpoint_path,
                "; ".join(changes),
            )
            self._discard()
            return None
        try:
            temp_size = os.stat(self.temp).st_size
        except FileNotFoundError:
            temp_size = -1
        if cp.parts and temp_size < cp.recorded_end():
            state = "missing" if temp_size < 0 else f"only {temp_size} bytes long"
            log.warning(
                "%s: temp file %s is %s but the checkpoint records %d bytes; "
                "downloading every part again",
                self.name,
                self.temp,
                state,
                cp.recorded_end(),
            )
            self._discard()
            return None
        if cp.part_size != self.part_size:
            log.info(
                "%s: resuming with the recorded part size %d (not %d)",
                self.name,
                cp.part_size,
                self.part_size,
            )
        return cp

    # -- fetching -----------------------------------------------------------

    def _fetch_missing(self, cp: Checkpoint) -> None:
        """Fetch every part the checkpoint lacks, `threads` at a time.

        Only the calling thread records parts and reports progress, after each
        batch of finished parts is saved in the checkpoint: progress never runs
        ahead of what a crash would keep. At most 2 x threads parts are queued,
        so stopping (an error, Ctrl-C) cancels little and memory stays at one
        part buffer per worker thread.
        """
        total = cp.part_total
        missing = [n for n in range(total) if n not in cp.parts]
        self._report(cp.done_bytes())
        log.info(
            "%s: %d bytes in %s of %d bytes; %s done, fetching %d with %s",
            self.name,
            self.meta.size,
            _plural(total, "part"),
            cp.part_size,
            _plural(len(cp.parts), "part"),
            len(missing),
            _plural(self.threads, "thread"),
        )
        if not missing:
            return
        pending = iter(missing)
        window = 2 * self.threads
        running: set[Future[tuple[int, PartRecord]]] = set()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="download") as pool:
            try:
                for n in itertools.islice(pending, window):
                    running.add(pool.submit(self._fetch_part, n, cp.part_size))
                while running:
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    error = self._absorb(cp, finished, report=True)
                    if error is not None:
                        raise error
                    for n in itertools.islice(pending, len(finished)):
                        running.add(pool.submit(self._fetch_part, n, cp.part_size))
            except BaseException as exc:
                self._stop.set()
                for fut in running:
                    fut.cancel()
                log.info(
                    "%s: stopping (%s); waiting for %s in flight",
                    self.name,
                    type(exc).__name__,
                    _plural(sum(1 for f in running if not f.cancelled()), "part"),
                )
                # Parts already being fetched are kept if they finish: the
                # checkpoint only ever lists parts whose data is on disk.
                done, _ = wait(running)
                try:
                    self._absorb(cp, done, report=False)
                except CheckpointError as late:
                    log.warning("%s: while stopping: %s", self.name, late)
                raise

    def _absorb(
        self, cp: Checkpoint, finished: Iterable[Future[tuple[int, PartRecord]]], *, report: bool
    ) -> BaseException | None:
        """Record the parts that finished and save the checkpoint once; return the first failure.

        Failures of other parts after the first one (typically the same 412 from
        every worker) are only logged.
        """
        error: BaseException | None = None
        recorded: list[int] = []
        for fut in finished:
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is not None:
                if isinstance(exc, _Stopped):
                    continue
                if error is None:
                    error = exc
                else:
                    log.debug("%s: another part failed too: %s", self.name, exc)
                continue
            number, record = fut.result()
            cp.parts[number] = record
            recorded.append(number)
        if recorded:
            if self.checkpoint_path:
                # One fdatasync per batch, before the batch is recorded: a part is
                # never in the checkpoint before its data is durable, and workers
                # do not serialise on syncing each other's dirty pages.
                try:
                    _sync_data(self._fd)
                except OSError as exc:
                    raise OssfsError(f"cannot sync {self.temp}: {exc.strerror or exc}") from None
                cp.save(self.checkpoint_path)
            log.debug("%s: recorded parts %s", self.name, _numbers(recorded))
            if report:
                self._report(cp.done_bytes())
        return error

    def _buffer(self, length: int, part_size: int) -> memoryview:
        """This worker thread's part buffer, allocated once: memory = threads x part size."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            buf = bytearray(min(part_size, self.meta.size))
            self._local.buf = buf
        return memoryview(buf)[:length]

    def _fetch_part(self, number: int, part_size: int) -> tuple[int, PartRecord]:
        """GET one part pinned to the ETag, write it at its offset, make it durable."""
        if self._stop.is_set():
            raise _Stopped
        start, length = part_bounds(self.meta.size, part_size, number)
        view = self._buffer(length, part_size)
        # One get_range for the whole part: the client resumes a body cut short
        # from the byte reached, into the same buffer.
        self.client.get_range(
            self.meta.key,
            start,
            start + length - 1,
            if_match=self.meta.etag or None,
            into=view,
        )
        crc = crc64(view)
        try:
            _write_all(self._fd, view, start)
        except OSError as exc:
            raise OssfsError(
                f"cannot write part {number} to {self.temp}: {exc.strerror or exc}"
            ) from None
        log.debug(
            "%s: part %d (bytes %d-%d) written, crc64 %016x",
            self.name,
            number,
            start,
            start + length - 1,
            crc,
        )
        return number, PartRecord(crc, length)

    def _report(self, consumed: int, *, force: bool = False) -> None:
        """Call the progress callback, never with a smaller value than before."""
        if self.progress is None:
            return
        with self._progress_lock:
            if consumed < self._reported or (consumed == self._reported and not force):
                return
            self._reported = consumed
            self.progress(consumed, self.meta.size)

    # -- verification ---------------------------------------------------------

    def _bad_parts_on_disk(self, cp: Checkpoint, numbers: Iterable[int]) -> list[int]:
        """Parts whose bytes in the temp file do not match their recorded CRC-64."""
        bad = []
        for n in sorted(numbers):
            rec = cp.parts[n]
            start = n * cp.part_size
            if self._crc_on_disk(start, rec.length) != rec.crc64:
                bad.append(n)
        return bad

    def _crc_on_disk(self, start: int, length: int) -> int | None:
        crc = 0
        offset, end = start, start + length
        while offset < end:
            chunk = os.pread(self._fd, min(_READ_CHUNK, end - offset), offset)
            if not chunk:
                return None  # file shorter than the part
            crc = crc64(chunk, crc)
            offset += len(chunk)
        return crc

    def _md5_on_disk(self) -> str:
        digest = hashlib.md5()
        offset = 0
        while offset < self.meta.size:
            chunk = os.pread(self._fd, min(_READ_CHUNK, self.meta.size - offset), offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest()

    def _verify(self, cp: Checkpoint) -> None:
        """Check the whole temp file before it may replace the target.

        Prefer the store's whole-object CRC-64 (combined from the per-part CRCs,
        no re-read); else the ETag when it is a plain MD5 (re-reads the file);
        else re-read each part and compare with its recorded CRC-64, which at
        least proves the disk holds what was received.
        """
        size = self.meta.size
        missing = [n for n in range(cp.part_total) if n not in cp.parts]
        actual_size = os.fstat(self._fd).st_size
        problem: str | None = None
        method = "size"
        if missing:
            problem = f"parts {_numbers(missing)} missing"
        elif actual_size != size:
            problem = f"temp file has {actual_size} bytes, not {size}"
        elif self.meta.crc64 is not None:
            got = crc64_of_parts(
                (cp.parts[n].crc64, cp.parts[n].length) for n in range(cp.part_total)
            )
            if got != self.meta.crc64:
                problem = f"CRC-64 {got} != {self.meta.crc64} reported by the store"
            method = "CRC-64"
        elif "-" not in self.meta.etag and _MD5_ETAG.match(self.meta.etag):
            got_md5 = self._md5_on_disk()
            if got_md5 != self.meta.etag.lower():
                problem = f"MD5 {got_md5} != ETag {self.meta.etag}"
            method = "MD5"
        else:
            bad = self._bad_parts_on_disk(cp, range(cp.part_total))
            if bad:
                problem = f"parts {_numbers(bad)} differ from their recorded CRC-64"
            method = "per-part CRC-64"
        if problem is not None:
            self._close()
            self._discard()
            log.info("%s: verification failed: %s", self.name, problem)
            raise ChecksumError(
                f"{self.name}: downloaded data failed verification ({problem}); "
                f"removed {self.temp} and the checkpoint: run again to download it afresh"
            )
        log.info("%s: verified (%s)", self.name, method)


# --------------------------------------------------------------------------- CLI


def add_download_parser(
    subparsers: Any,
    *,
    store_args: Callable[[argparse.ArgumentParser], None] | None = None,
    common_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """Add ``download URL LOCAL_FILE`` to `subparsers` (from ``add_subparsers()``)."""
    if store_args is None or common_args is None:
        from . import cli  # lazily: cli imports this module

        store_args = store_args or cli._store_args
        common_args = common_args or cli._common_args
    parser = subparsers.add_parser(
        "download",
        help="download one object to a local file (parallel, resumable)",
        description=(
            "Download one object in parallel parts to LOCAL_FILE. Progress is kept in a "
            "checkpoint (LOCAL_FILE.dcp): after an interruption, run the same command "
            "again to fetch only the missing parts."
        ),
    )
    parser.add_argument("url", metavar="URL", help="oss://BUCKET/KEY or s3://BUCKET/KEY")
    parser.add_argument("local_file", metavar="LOCAL_FILE", help="where to write the object")
    store_args(parser)
    parser.add_argument(
        "--part-size",
        default=str(DEFAULT_PART_SIZE),
        help="part size, e.g. 8M (100K..5G; a resumed download keeps its recorded size)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"parts fetched in parallel (1..{MAX_THREADS}, default {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--checkpoint", metavar="FILE", help="checkpoint file (default LOCAL_FILE.dcp)"
    )
    parser.add_argument(
        "--no-checkpoint", action="store_true", help="keep no checkpoint: cannot resume"
    )
    add_progress_option(parser)
    common_args(parser)
    return parser


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this download (same options)."""
    argv = ["ossfs-resume", "download", args.url, args.local_file, "--endpoint", args.endpoint]
    if getattr(args, "region", None):
        argv += ["--region", args.region]
    if getattr(args, "signature_version", "v4") != "v4":
        argv += ["--signature-version", args.signature_version]
    if getattr(args, "addressing", "auto") != "auto":
        argv += ["--addressing", args.addressing]
    if getattr(args, "anonymous", False):
        argv.append("--anonymous")
    if getattr(args, "ca_bundle", None):
        argv += ["--ca-bundle", args.ca_bundle]
    if str(args.part_size) != str(DEFAULT_PART_SIZE):
        argv += ["--part-size", str(args.part_size)]
    if args.threads != DEFAULT_THREADS:
        argv += ["--threads", str(args.threads)]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    if args.no_checkpoint:
        argv.append("--no-checkpoint")
    if getattr(args, "progress", "auto") != "auto":
        argv += ["--progress", args.progress]
    if getattr(args, "verbose", 0):
        argv.append("-" + "v" * args.verbose)
    if getattr(args, "log_file", None):
        argv += ["--log-file", args.log_file]
    return shlex.join(argv)


def cmd_download(args: argparse.Namespace) -> int:
    """``ossfs-resume download``: 0 on success, 130 after Ctrl-C (checkpoint kept)."""
    from .cli import check_range, make_client, parse_bucket_url
    from .progress import ProgressReporter

    url = parse_bucket_url(args.url)
    if not url.key or url.key.endswith("/"):
        raise UsageError(
            f"{args.url} names no object: expected {url.protocol}://BUCKET/KEY for download"
        )
    part_size = check_part_size(args.part_size)
    threads = check_range("--threads", args.threads, 1, MAX_THREADS)
    if args.no_checkpoint and args.checkpoint:
        raise UsageError("--checkpoint and --no-checkpoint cannot be used together")
    client = make_client(url, args, pool_size=threads)
    reporter = ProgressReporter(url.key, mode=args.progress)
    try:
        with reporter:
            resumable_download(
                client,
                url.key,
                args.local_file,
                part_size=part_size,
                num_threads=threads,
                checkpoint_file=args.checkpoint,
                enable_checkpoint=not args.no_checkpoint,
                progress_callback=reporter,
            )
    except KeyboardInterrupt:
        if args.no_checkpoint:
            kept = "nothing was kept (--no-checkpoint)"
        else:
            checkpoint = args.checkpoint or os.path.abspath(args.local_file) + CHECKPOINT_SUFFIX
            if os.path.exists(checkpoint):
                kept = f"finished parts are recorded in {checkpoint}"
            else:
                kept = "nothing was downloaded yet"
        print(
            f"ossfs-resume: interrupted; {kept}: run the same command to resume: "
            f"{resume_command(args)}",
            file=sys.stderr,
        )
        return 130
    finally:
        client.close()
    return 0
