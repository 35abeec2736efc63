"""Resumable, parallel download of one object to a local file, on the part-transfer engine.

The object is cut into aligned parts that the engine (``engine.PartFetcher``)
fetches ``num_threads`` at a time into a temp file of this download's own
(a unique name, recorded in the checkpoint), each written at its offset. A
JSON checkpoint (``LOCAL_FILE.dcp``) is the ledger: it records which parts
are done, each with its CRC-64, so a run that was killed (even ``kill -9``)
continues with the missing parts only. Parts of that object version already
in the part cache (after a ``prefetch``, or read through a mount) are copied
from it instead of fetched.

It avoids the known faults of the official SDKs' resumable downloads (oss2,
the Go SDK), and never harms a user's files:

* the checkpoint carries a format marker, a version and its own checksum, and
  is replaced atomically; a file that is not one of ours is refused and left
  as it is; a part is recorded only after its data is durable;
* the temp file is one this download created (``O_EXCL``), never a file the
  user had; the target is replaced only by a fully verified file, atomically;
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

``resumable_download`` takes oss2's keywords, so code written for
``oss2.resumable_download`` needs only a different first argument.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import PartStore, UncachedParts, object_id
from .checksum import crc64, crc64_file_range, crc64_of_parts
from .durable import fsync_dir
from .engine import ObjectRef, PartFetcher
from .errors import (
    CheckpointError,
    ChecksumError,
    OssfsError,
    PreconditionFailedError,
    UsageError,
)
from .objectstore import ObjectMeta, ObjectStore
from .parts import (
    DEFAULT_PART_SIZE,
    MAX_PART_SIZE,
    MIB,
    MIN_PART_SIZE,
    PartRecord,
    check_part_size,
    check_threads,
    part_bounds,
    part_count,
)
from .progress import ProgressTracker

log = logging.getLogger("ossfs_resume.download")

ProgressCallback = Callable[[int, int], None]

DEFAULT_THREADS = 8
#: The most --threads the command line accepts (the library takes any count >= 1).
MAX_THREADS = 256
CHECKPOINT_SUFFIX = ".dcp"
#: The checkpoint's format marker: a file without it is not ours and is never touched.
CHECKPOINT_FORMAT = "ossfs-resume-download"
CHECKPOINT_VERSION = 2
#: Temp files are ``.NAME.ossfs-resume-TOKEN.tmp`` beside the target.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.ossfs-resume-[0-9a-f]{16}\.tmp$")

#: Local reads (re-checking parts, MD5) go in slices this big: bounded memory.
_READ_CHUNK = 8 * MIB
#: Linux writes at most this much per write(2)/pwrite(2) call (0x7ffff000).
_MAX_WRITE = 0x7FFFF000
_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")
_CRC_HEX = re.compile(r"^[0-9a-f]{16}$")
_MAGIC = re.compile(rb'"format"\s*:\s*"' + CHECKPOINT_FORMAT.encode() + rb'"')


class NotACheckpointError(CheckpointError):
    """The checkpoint path holds a file that is not one of our checkpoints."""


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
    def of(cls, client: ObjectStore, meta: ObjectMeta) -> ObjectIdentity:
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
         "parts": [[<number>, "<crc64 as 16 lowercase hex digits>", <length>], ...],
         "temp": "/abs/path/.LOCAL_FILE.ossfs-resume-<16 hex>.tmp"}
    """

    identity: ObjectIdentity
    destination: str
    part_size: int
    parts: dict[int, PartRecord] = field(default_factory=dict)
    #: The temp file this download created (absolute); "" until it has one.
    temp: str = ""

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
            "parts": [[n, f"{rec.crc:016x}", rec.length] for n, rec in sorted(self.parts.items())],
            "temp": self.temp,
        }

    def to_json(self) -> bytes:
        body = self.body()
        return _canonical({**body, "checksum": _digest(body)}) + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Checkpoint:
        """Parse and validate. A file without our format marker raises NotACheckpointError
        (it is not ours: never touch it); any damage to one of ours raises CheckpointError
        saying what is wrong."""
        if not _MAGIC.search(raw):
            raise NotACheckpointError("it is not an ossfs-resume download checkpoint")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError("not a JSON object")
        checksum = data.pop("checksum", None)
        if not isinstance(checksum, str):
            raise CheckpointError("no checksum")
        version = data.get("version")
        if version != CHECKPOINT_VERSION:
            if isinstance(version, int) and version > CHECKPOINT_VERSION:
                raise NotACheckpointError(
                    f"it was written by a newer version of ossfs-resume (format {version})"
                )
            raise CheckpointError(f"unknown format version {version!r}")
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
            temp = _typed(data["temp"], str)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"missing or mistyped field ({exc})") from None
        if identity.size < 0:
            raise CheckpointError(f"negative size {identity.size}")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise CheckpointError(f"part size {part_size} out of range")
        if temp and not _is_our_temp(temp, destination):
            raise CheckpointError(f"temp file {temp!r} is not one of ours")
        cp = cls(identity, destination, part_size, temp=temp)
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
            cp.parts[number] = PartRecord(length, int(crc_hex, 16))
        return cp

    def save(self, path: str) -> None:
        """Replace `path` atomically: write a temp file, fsync it, rename, fsync the directory.

        A crash at any point leaves either the old or the new checkpoint, never
        a torn one.
        """
        tmp = path + ".tmp"
        data = self.to_json()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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


def peek_temp(path: str) -> str | None:
    """The temp file named by a damaged checkpoint of ours, if it names one of ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * MIB)
        found = re.search(rb'"temp"\s*:\s*"([^"]*)"', raw)
        destination = re.search(rb'"destination"\s*:\s*"([^"]*)"', raw)
    except OSError:
        return None
    if not found or not destination:
        return None
    temp = found.group(1).decode("utf-8", "replace")
    dest = destination.group(1).decode("utf-8", "replace")
    return temp if _is_our_temp(temp, dest) else None


def _is_our_temp(temp: str, destination: str) -> bool:
    """True if `temp` is named as this program names the temp files of `destination`."""
    path = Path(temp)
    match = _TEMP_NAME.match(path.name)
    return (
        match is not None
        and match.group("name") == Path(destination).name
        and path.parent == Path(destination).parent
    )


def our_temp_files(destination: str) -> list[str]:
    """The temp files this program made for `destination` (by their unique name pattern)."""
    d = Path(destination)
    try:
        names = os.listdir(d.parent)
    except OSError:
        return []
    return sorted(str(d.parent / n) for n in names if _is_our_temp(str(d.parent / n), destination))


def new_temp_path(destination: str) -> str:
    d = Path(destination)
    return str(d.parent / f".{d.name}.ossfs-resume-{secrets.token_hex(8)}.tmp")


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


def _checkpoint_in_store(store: object, client: ObjectStore, key: str, destination: str) -> str:
    """The checkpoint path for oss2's ``store`` argument: a directory, or an object with a
    ``dir`` (oss2's ResumableDownloadStore); one file per (store, bucket, key, target)."""
    directory = getattr(store, "dir", store)
    if not isinstance(directory, (str, os.PathLike)):
        raise UsageError(f"bad store {store!r}: give a directory (or an object with .dir)")
    raw = "\0".join((client.config.store_id, client.config.bucket, key, destination))
    name = f"download-{hashlib.sha256(raw.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}"
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.join(os.fspath(directory), name + CHECKPOINT_SUFFIX)


def resumable_download(
    client: ObjectStore,
    key: str,
    filename: str | os.PathLike[str],
    multiget_threshold: int | None = None,
    part_size: int | str | None = None,
    progress_callback: ProgressCallback | None = None,
    num_threads: int | None = None,
    store: object | None = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    checkpoint_file: str | os.PathLike[str] | None = None,
    enable_checkpoint: bool = True,
    cache: PartStore | None = None,
) -> ObjectMeta:
    """Download `key` to `filename` in parallel parts, resuming from a checkpoint.

    oss2's keywords mean what they mean there: `multiget_threshold` (objects
    smaller are fetched with one GET; default: one part), `part_size`,
    `progress_callback(consumed, total)` (the final ``(total, total)`` call comes
    once, after the file is in place), `num_threads`, `store` (the checkpoint
    directory, or oss2's ``ResumableDownloadStore``), `params` (``versionId``)
    and `headers` (``x-oss-request-payer``, ``x-oss-traffic-limit`` and the S3
    equivalents are sent with every request). Ours: `checkpoint_file` (default
    ``filename + ".dcp"``), `enable_checkpoint`, and `cache`, a part cache whose
    parts of this version are copied instead of fetched.

    Returns the object's metadata (from the HEAD that pinned the version).
    Bad arguments raise UsageError before any request. If a checkpoint from an
    earlier run matches the object, only missing parts are fetched, with the
    part size recorded there. The target is replaced only after the whole file
    passed verification; the checkpoint is deleted then.

    Raises NotFoundError for a missing key, PreconditionFailedError if the
    object changes during the run, ChecksumError if the data fails the check,
    CheckpointError if the checkpoint cannot be written or is not ours, and
    re-raises KeyboardInterrupt with the checkpoint saved.
    """
    size_of_part = check_part_size(DEFAULT_PART_SIZE if part_size is None else part_size)
    threads = check_threads(DEFAULT_THREADS if num_threads is None else num_threads)
    if multiget_threshold is not None and (
        isinstance(multiget_threshold, bool)
        or not isinstance(multiget_threshold, int)
        or multiget_threshold < 0
    ):
        raise UsageError(f"bad multiget_threshold {multiget_threshold!r}: a byte count >= 0")
    version_id = (params or {}).get("versionId")
    extra_headers = _request_headers(headers)
    destination = os.path.abspath(os.fspath(filename))
    if os.path.isdir(destination):
        raise UsageError(f"cannot download to {destination}: it is a directory")
    _check_writable_dir(os.path.dirname(destination), f"download target {destination}")
    checkpoint_path: str | None = None
    if enable_checkpoint:
        if checkpoint_file:
            checkpoint_path = os.path.abspath(os.fspath(checkpoint_file))
        elif store is not None:
            checkpoint_path = _checkpoint_in_store(store, client, key, destination)
        else:
            checkpoint_path = destination + CHECKPOINT_SUFFIX
        if checkpoint_path == destination:
            raise UsageError(
                f"checkpoint file {checkpoint_path} would overwrite the download itself"
            )
        if os.path.isdir(checkpoint_path):
            raise UsageError(f"checkpoint file {checkpoint_path} is a directory")
        _check_writable_dir(os.path.dirname(checkpoint_path), f"checkpoint file {checkpoint_path}")
    # Only what was asked for: a version and headers are the exception, not the rule.
    head_options: dict[str, Any] = {}
    if version_id:
        head_options["version_id"] = version_id
    if extra_headers:
        head_options["headers"] = extra_headers
    meta = client.head(key, **head_options)
    job = _Download(
        client,
        meta,
        destination,
        checkpoint_path,
        size_of_part,
        threads,
        progress_callback,
        cache=cache,
        single_get_below=size_of_part if multiget_threshold is None else multiget_threshold,
        version_id=version_id,
        headers=extra_headers,
    )
    return job.run()


#: Request headers oss2 passes on for a download; anything else is refused, not dropped.
_PASSED_HEADERS = {
    "x-oss-request-payer",
    "x-oss-traffic-limit",
    "x-amz-request-payer",
    "x-amz-expected-bucket-owner",
}


def _request_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    if not headers:
        return None
    out = {}
    for name, value in headers.items():
        if name.lower() not in _PASSED_HEADERS:
            raise UsageError(
                f"header {name!r} is not passed on by a download "
                f"(supported: {', '.join(sorted(_PASSED_HEADERS))})"
            )
        out[name.lower()] = str(value)
    return out


class _FileSink:
    """A transfer into the temp file; the checkpoint is its ledger.

    Parts are written at their offsets as they land; ``commit`` makes the
    batch durable (one fdatasync) and only then records it, so the checkpoint
    never lists a part whose data a crash could lose.
    """

    into_cache = False

    def __init__(self, job: _Download, cp: Checkpoint) -> None:
        self.job = job
        self.cp = cp
        self.pending: dict[int, PartRecord] = {}

    def accept(self, number: int, data: memoryview) -> None:
        start = number * self.cp.part_size
        try:
            _write_all(self.job.fd, data, start)
        except OSError as exc:
            raise OssfsError(
                f"cannot write part {number} to {self.job.temp}: {exc.strerror or exc}"
            ) from None
        self.pending[number] = PartRecord(len(data), crc64(data))

    def commit(self) -> None:
        if not self.pending:
            return
        if self.job.checkpoint_path:
            try:
                _sync_data(self.job.fd)
            except OSError as exc:
                raise OssfsError(f"cannot sync {self.job.temp}: {exc.strerror or exc}") from None
        self.cp.parts.update(self.pending)
        log.debug("%s: recorded parts %s", self.job.name, _numbers(self.pending))
        self.pending.clear()
        if self.job.checkpoint_path:
            self.cp.save(self.job.checkpoint_path)


class _Download:
    """One run of one download; the checkpoint is only touched by the calling thread."""

    def __init__(
        self,
        client: ObjectStore,
        meta: ObjectMeta,
        destination: str,
        checkpoint_path: str | None,
        part_size: int,
        threads: int,
        progress: ProgressCallback | None,
        *,
        cache: PartStore | None,
        single_get_below: int,
        version_id: str | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.client = client
        self.meta = meta
        self.destination = destination
        self.temp = ""
        self.checkpoint_path = checkpoint_path
        if meta.size < single_get_below:
            # Below the threshold: one part, one GET (a resumed run keeps its recorded size).
            part_size = min(max(meta.size, MIN_PART_SIZE), MAX_PART_SIZE)
        self.part_size = part_size
        self.threads = threads
        self.tracker = ProgressTracker(meta.size, progress)
        self.cache = cache
        self.single_get_below = single_get_below
        self.version_id = version_id
        self.headers = headers
        self.identity = ObjectIdentity.of(client, meta)
        self.name = client.describe(meta.key)
        self.fd = -1

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
            os.fsync(self.fd)
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
            self.tracker.finish()
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
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _discard(self) -> None:
        """Remove the checkpoint and our temp file: the next run starts from nothing."""
        _remove(self.checkpoint_path)
        _remove(self.temp or None)

    # -- starting or resuming ----------------------------------------------

    def _prepare(self) -> Checkpoint:
        """Load a usable checkpoint or start afresh; open (or create) our temp file."""
        cp = self._resumable_checkpoint() if self.checkpoint_path else None
        resuming = cp is not None
        if cp is None:
            cp = Checkpoint(self.identity, self.destination, self.part_size)
        try:
            if resuming:
                self.temp = cp.temp
                self.fd = os.open(self.temp, os.O_RDWR | os.O_NOFOLLOW)
            else:
                # O_EXCL: a file of this name that we did not just create is never used.
                self.temp = cp.temp = new_temp_path(self.destination)
                self.fd = os.open(
                    self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                )
            # Preallocate (sparsely): parts land at their offsets in any order.
            os.ftruncate(self.fd, self.meta.size)
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
                _remove(self.temp)
                raise
        return cp

    def _resumable_checkpoint(self) -> Checkpoint | None:
        """The earlier run's checkpoint if its parts can be reused, else None (its files
        discarded). A file at the checkpoint path that is not ours raises UsageError."""
        assert self.checkpoint_path is not None
        try:
            cp = load_checkpoint(self.checkpoint_path)
        except NotACheckpointError as exc:
            raise UsageError(
                f"{self.checkpoint_path} exists and {exc}; refusing to overwrite it "
                "(choose another --checkpoint, or move that file away)"
            ) from None
        except CheckpointError as exc:
            # Its temp file is ours by name (``.NAME.ossfs-resume-TOKEN.tmp``, created with
            # O_EXCL); the one it names, or, if that part is lost, those of this target.
            named = peek_temp(self.checkpoint_path)
            temps = [named] if named else our_temp_files(self.destination)
            log.warning(
                "%s: checkpoint %s is damaged (%s); discarding it%s, and downloading every "
                "part again",
                self.name,
                self.checkpoint_path,
                exc,
                "".join(f" and {t}" for t in temps),
            )
            _remove(self.checkpoint_path)
            for temp in temps:
                _remove(temp)
            return None
        if cp is None:
            return None
        self.temp = cp.temp
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
            if cp.destination != self.destination:
                # Its temp file belongs to another target's download: leave it to that one.
                self.temp = ""
            self._discard()
            self.temp = ""
            return None
        try:
            temp_size = os.lstat(self.temp).st_size if self.temp else -1
        except FileNotFoundError:
            temp_size = -1
        if temp_size < 0 or (cp.parts and temp_size < cp.recorded_end()):
            state = "missing" if temp_size < 0 else f"only {temp_size} bytes long"
            log.warning(
                "%s: temp file %s is %s but the checkpoint records %d bytes; "
                "downloading every part again",
                self.name,
                self.temp or "(none)",
                state,
                cp.recorded_end(),
            )
            self._discard()
            self.temp = ""
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
        """Fetch every part the checkpoint lacks, on the engine, `threads` at a time."""
        total = cp.part_total
        missing = [n for n in range(total) if n not in cp.parts]
        self.tracker.start(cp.done_bytes())
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
        cache = self.cache if self.cache is not None else UncachedParts("", "", warn=False)
        oid = object_id(
            self.client.config.store_id, self.client.config.bucket, self.meta.key, self.meta.etag
        )
        ref = ObjectRef(self.meta, oid, cp.part_size)
        engine = PartFetcher(
            self.client,
            cache,
            max_parallel=self.threads,
            max_inflight_bytes=2 * self.threads * cp.part_size,
            max_recent_bytes=0,
            version_id=self.version_id,
            headers=self.headers,
        )
        try:
            result = engine.transfer(
                ref, missing, _FileSink(self, cp), threads=self.threads, progress=self.tracker.add
            )
        finally:
            engine.shutdown()
        if result.from_cache:
            log.info(
                "%s: %s of %d copied from the part cache, not fetched",
                self.name,
                _plural(result.from_cache, "part"),
                len(missing),
            )

    # -- verification ---------------------------------------------------------

    def _bad_parts_on_disk(self, cp: Checkpoint, numbers: Iterable[int]) -> list[int]:
        """Parts whose bytes in the temp file do not match their recorded CRC-64."""
        buf = memoryview(bytearray(min(_READ_CHUNK, max(cp.part_size, 1))))
        bad = []
        for n in sorted(numbers):
            rec = cp.parts[n]
            if crc64_file_range(self.fd, n * cp.part_size, rec.length, buf) != rec.crc:
                bad.append(n)
        return bad

    def _md5_on_disk(self) -> str:
        digest = hashlib.md5()
        offset = 0
        while offset < self.meta.size:
            chunk = os.pread(self.fd, min(_READ_CHUNK, self.meta.size - offset), offset)
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
        actual_size = os.fstat(self.fd).st_size
        problem: str | None = None
        method = "size"
        if missing:
            problem = f"parts {_numbers(missing)} missing"
        elif actual_size != size:
            problem = f"temp file has {actual_size} bytes, not {size}"
        elif self.meta.crc64 is not None:
            got = crc64_of_parts(
                (cp.parts[n].crc, cp.parts[n].length) for n in range(cp.part_total)
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
