"""The object-store interface the engine and the file system use, and two stores
besides the HTTP client (:class:`~ossfs_resume.client.StoreClient`) that implement it.

:class:`MemoryStore` is a bucket in memory with the HTTP client's semantics: the
same errors, range checks, If-Match and ListObjectsV2 paging, and a record of
every request. :class:`FaultyStore` wraps any store and injects faults by rule:
errors, callbacks, corrupted bytes, and gates that hold calls until a test
releases them, so a test orders events instead of sleeping and hoping.

Both ship in the library, beside the real client, so that every unit test of
the engine and the file system runs against the one interface they use in a
mount (as mountpoint-s3 ships its mock and failure-injecting clients).
"""

from __future__ import annotations

import bisect
import builtins
import copy
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

from .checksum import crc64 as crc64_of
from .errors import InvalidRangeError, NotFoundError, PreconditionFailedError, ProtocolError
from .signing import Credentials

#: What get_range fills and returns (the engine also passes an mmap).
Buffer = memoryview | bytearray


@dataclass(frozen=True)
class ObjectMeta:
    """What a HEAD or a listing says about one object version."""

    key: str
    size: int
    etag: str  # as the store sent it, without the surrounding quotes
    last_modified: float  # seconds since the epoch
    crc64: int | None = None  # x-oss-hash-crc64ecma, when the store sends it
    # User metadata (x-amz-meta-* / x-oss-meta-*, names lower-cased, without the prefix):
    # from HEAD and whole-object GETs, not listings. Not compared: a dict is unhashable.
    metadata: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ListPage:
    objects: list[ObjectMeta]
    prefixes: list[str]
    next_token: str | None


class StoreSettings(Protocol):
    """What the engine and the file system read of a store's configuration.

    Read-only properties, so a frozen dataclass (``client.StoreConfig``) fits.
    """

    @property
    def protocol(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def bucket(self) -> str: ...
    @property
    def region(self) -> str | None: ...
    @property
    def signature_version(self) -> str: ...
    @property
    def addressing(self) -> str: ...
    @property
    def credentials(self) -> Credentials | None: ...
    @property
    def anonymous(self) -> bool: ...
    @property
    def store_id(self) -> str: ...


@runtime_checkable
class ObjectStore(Protocol):
    """One bucket, read-only: everything the engine and the file system ask of a store.

    Errors are :mod:`ossfs_resume.errors` types: NotFoundError for a missing key,
    PreconditionFailedError when `if_match` no longer matches, InvalidRangeError
    for a range starting at or past the end, StoreUnavailableError when the store
    cannot be reached, and so on.
    """

    @property
    def config(self) -> StoreSettings: ...

    def describe(self, key: str = "") -> str:
        """A URL-like name for messages: s3://bucket/key."""
        ...

    def head(self, key: str) -> ObjectMeta: ...

    def get_range(
        self,
        key: str,
        start: int,
        end: int,
        *,
        if_match: str | None = None,
        into: Buffer | None = None,
    ) -> Buffer:
        """Bytes [start, end] (inclusive) of `key`, exactly, into `into` or a new buffer."""
        ...

    def list_page(
        self, prefix: str, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        """One ListObjectsV2 page."""
        ...

    def list(self, prefix: str, delimiter: str = "/") -> Iterator[ListPage]:
        """Every ListObjectsV2 page under `prefix`."""
        ...

    def check_access(self, prefix: str = "") -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class WritableStore(ObjectStore, Protocol):
    """A store that can also be written to: what the shared part tier needs."""

    def get_object(self, key: str, into: Buffer) -> tuple[ObjectMeta, int]:
        """GET the whole object: (its metadata, bytes read into `into`).

        The body is read only if the object's size is exactly ``len(into)``;
        otherwise nothing is read and the count is 0 (the caller sees ``meta.size``).
        """
        ...

    def put_object(
        self,
        key: str,
        data: Buffer | bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> bool:
        """PUT `data` under `key` with user `metadata`. With `if_none_match`, an object
        already there is kept: False (no error). True: written."""
        ...

    def delete_object(self, key: str) -> None:
        """DELETE `key`; a missing key is no error."""
        ...


# -- recording calls -----------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request as a store saw it."""

    method: str  # "head", "get_range", "list_page", "get_object", "put_object", "delete_object"
    key: str  # the key; for list_page, the prefix
    start: int | None = None  # get_range
    end: int | None = None  # get_range, inclusive
    if_match: str | None = None  # get_range
    delimiter: str | None = None  # list_page
    token: str | None = None  # list_page: None for the first page of a listing


METHODS = frozenset({"head", "get_range", "list_page", "get_object", "put_object", "delete_object"})


class _CallLog:
    """``calls``, every request in order, and ways to ask about them."""

    calls: list[Call]
    _calls_lock: threading.Lock

    def _start_log(self) -> None:
        self.calls = []
        self._calls_lock = threading.Lock()

    def _record(self, call: Call) -> None:
        with self._calls_lock:
            self.calls.append(call)

    def calls_to(self, method: str, key: str | None = None) -> list[Call]:
        with self._calls_lock:
            return [c for c in self.calls if c.method == method and key in (None, c.key)]

    def count(self, method: str | None = None) -> int:
        """Requests made, of one method or all; ``count("get_range") == 0``: no GET was made."""
        with self._calls_lock:
            return sum(1 for c in self.calls if method in (None, c.method))

    def counts(self) -> Counter[str]:
        with self._calls_lock:
            return Counter(c.method for c in self.calls)

    def ranges(self, key: str | None = None) -> list[tuple[int, int]]:
        """(start, end) of each get_range, in order."""
        return [(c.start or 0, c.end or 0) for c in self.calls_to("get_range", key)]


# -- MemoryStore -----------------------------------------------------------------


@dataclass(frozen=True)
class MemoryConfig:
    """A MemoryStore's settings: the fields of client.StoreConfig the engine reads."""

    bucket: str = "bkt"
    protocol: str = "s3"
    endpoint: str = "http://memory.invalid"
    region: str | None = None
    signature_version: str = "v4"
    addressing: str = "auto"
    credentials: Credentials | None = None

    @property
    def anonymous(self) -> bool:
        return self.credentials is None

    @property
    def store_id(self) -> str:
        return f"{self.protocol}+{self.endpoint.rstrip('/')}"  # as client.store_id


@dataclass(frozen=True)
class _Stored:
    data: bytes
    meta: ObjectMeta


class MemoryStore(_CallLog, WritableStore):
    """A bucket in memory that answers as the HTTP client does, and records every request.

    ``put`` gives an object the MD5 of its bytes as ETag (as S3 and OSS do for a
    single-part upload), so overwriting it with other bytes changes the ETag and
    reads pinned to the old one fail. Listings page like ListObjectsV2: at most
    `max_page` entries a page whatever max_keys asks, continuing after the last
    name returned, so keys put or deleted meanwhile show up or not as they sort.
    `etags_in_listings=False` acts as a store whose listings carry no ETags.
    """

    def __init__(
        self,
        bucket: str = "bkt",
        *,
        protocol: str = "s3",
        endpoint: str = "http://memory.invalid",
        max_page: int = 1000,
        etags_in_listings: bool = True,
    ) -> None:
        self._start_log()
        self._config = MemoryConfig(bucket=bucket, protocol=protocol, endpoint=endpoint)
        self.max_page = max_page
        self.etags_in_listings = etags_in_listings
        self.closed = False
        self._lock = threading.Lock()
        self._objects: dict[str, _Stored] = {}

    @property
    def config(self) -> MemoryConfig:
        return self._config

    # -- the bucket's contents (not requests: not recorded) ------------------------

    def put(
        self,
        key: str,
        data: bytes,
        *,
        etag: str | None = None,
        mtime: float | None = None,
        crc64: bool | int = True,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectMeta:
        """Store `data` under `key`, replacing any object there.

        crc64: True sends the CRC-64 as OSS does, False none (as S3), an int that value.
        metadata: user metadata (names lower-cased, as the stores answer them).
        """
        data = bytes(data)
        crc = crc64_of(data) if crc64 is True else None if crc64 is False else int(crc64)
        meta = ObjectMeta(
            key=key,
            size=len(data),
            etag=etag or hashlib.md5(data, usedforsecurity=False).hexdigest(),
            last_modified=time.time() if mtime is None else mtime,
            crc64=crc,
            metadata={k.lower(): v for k, v in (metadata or {}).items()},
        )
        with self._lock:
            self._objects[key] = _Stored(data, meta)
        return meta

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is no error (as DeleteObject)."""
        with self._lock:
            self._objects.pop(key, None)

    def meta(self, key: str) -> ObjectMeta:
        """What HEAD would answer, without making a request."""
        return self._get(key, "HEAD").meta

    def data(self, key: str) -> bytes:
        return self._get(key, "GET").data

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._objects)

    # -- ObjectStore ------------------------------------------------------------

    def describe(self, key: str = "") -> str:
        return f"{self._config.protocol}://{self._config.bucket}/{key}"

    def head(self, key: str) -> ObjectMeta:
        self._record(Call("head", key))
        return self._get(key, "HEAD").meta

    def get_range(
        self,
        key: str,
        start: int,
        end: int,
        *,
        if_match: str | None = None,
        into: Buffer | None = None,
    ) -> Buffer:
        length = end - start + 1
        if length <= 0 or start < 0:
            raise ValueError(f"empty range {start}-{end}")
        buf = bytearray(length) if into is None else into
        view = memoryview(buf)
        if len(view) < length:
            raise ValueError("buffer smaller than the range")
        self._record(Call("get_range", key, start, end, if_match or None))
        stored = self._get(key, "GET")
        what = f"GET {self.describe(key)} bytes={start}-{end}"
        # The order a store checks in: the key, then If-Match, then the range.
        if if_match and stored.meta.etag != if_match:
            raise PreconditionFailedError(
                f"{what}: the object changed (ETag {stored.meta.etag} != {if_match})",
                status=412,
                code="PreconditionFailed",
                key=key,
            )
        size = stored.meta.size
        if start >= size:
            raise InvalidRangeError(f"{what}: 416 InvalidRange", status=416, key=key)
        if end >= size:
            # The store answers the bytes it has; the client refuses the short range.
            raise ProtocolError(f"{what}: wrong Content-Range 'bytes {start}-{size - 1}/{size}'")
        view[:length] = stored.data[start : end + 1]
        return buf

    def get_object(self, key: str, into: Buffer) -> tuple[ObjectMeta, int]:
        self._record(Call("get_object", key))
        stored = self._get(key, "GET")
        view = memoryview(into).cast("B")
        if stored.meta.size != len(view):
            return stored.meta, 0
        view[:] = stored.data
        return stored.meta, len(view)

    def put_object(
        self,
        key: str,
        data: Buffer | bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> bool:
        self._record(Call("put_object", key))
        with self._lock:
            if if_none_match and key in self._objects:
                return False
        self.put(key, bytes(data), crc64=self._config.protocol == "oss", metadata=metadata)
        return True

    def delete_object(self, key: str) -> None:
        self._record(Call("delete_object", key))
        self.delete(key)

    def list_page(
        self, prefix: str, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        self._record(Call("list_page", prefix, delimiter=delimiter, token=token))
        with self._lock:
            stored = [(key, s.meta) for key, s in self._objects.items() if key.startswith(prefix)]
        entries: dict[str, ObjectMeta | None] = {}  # name -> object, None for a common prefix
        for key, meta in stored:
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                entries[prefix + rest[: rest.index(delimiter) + len(delimiter)]] = None
            else:
                entries[key] = meta
        names = sorted(entries)  # code point order: UTF-8 byte order, as the stores sort
        if token:
            names = names[bisect.bisect_right(names, token) :]
        count = max(0, min(max_keys, self.max_page))
        page = names[:count]
        objects: list[ObjectMeta] = []
        prefixes: list[str] = []
        for name in page:
            found = entries[name]
            if found is None:
                prefixes.append(name)
            else:
                # Listings carry no CRC-64; ETags unless the store leaves them out.
                etag = found.etag if self.etags_in_listings else ""
                objects.append(ObjectMeta(name, found.size, etag, found.last_modified))
        more = bool(page) and len(names) > len(page)
        return ListPage(objects, prefixes, page[-1] if more else None)

    def list(self, prefix: str, delimiter: str = "/") -> Iterator[ListPage]:
        return _pages(self, prefix, delimiter)

    def check_access(self, prefix: str = "") -> None:
        self.list_page(prefix, "/", max_keys=1)

    def close(self) -> None:
        # Like the client's closed session, a closed store still answers.
        self.closed = True

    def _get(self, key: str, method: str) -> _Stored:
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            raise NotFoundError(
                f"{method} {self.describe(key)}: no such object",
                status=404,
                code=None if method == "HEAD" else "NoSuchKey",  # HEAD answers have no body
                key=key,
            )
        return stored


def _pages(store: ObjectStore, prefix: str, delimiter: str) -> Iterator[ListPage]:
    token: str | None = None
    while True:
        page = store.list_page(prefix, delimiter, token)
        yield page
        if not page.next_token:
            return
        token = page.next_token


# -- FaultyStore -------------------------------------------------------------------


class Rule:
    """A fault: the calls it matches, how many more it applies to, what it does."""

    def __init__(
        self,
        store: FaultyStore,  # type: ignore[type-arg]
        method: str,
        *,
        times: int | None,
        when: Callable[[Call], bool] | None,
        before: Callable[[Call], None] | None = None,
        after: Callable[[Call, Buffer], None] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"no such store method {method!r}: one of {sorted(METHODS)}")
        self.store = store
        self.method = method
        self.times = times  # None: until removed
        self.when = when
        self.before = before
        self.after = after

    def matches(self, call: Call) -> bool:
        return call.method == self.method and (self.when is None or self.when(call))

    def remove(self) -> None:
        self.store.remove(self)


class Gate(Rule):
    """Holds matching calls until released: ``gate.wait_held(n)`` orders a test's events."""

    def __init__(
        self,
        store: FaultyStore,  # type: ignore[type-arg]
        method: str,
        *,
        times: int | None,
        when: Callable[[Call], bool] | None,
        timeout: float | None,
    ) -> None:
        super().__init__(store, method, times=times, when=when, before=self._hold)
        self.timeout = timeout
        self.held = 0  # calls waiting at the gate now
        self.arrived = 0  # calls that reached it so far
        self._open = threading.Event()
        self._changed = threading.Condition()

    def release(self) -> None:
        """Let the held calls go, and every later one: the gate is gone."""
        self.remove()
        self._open.set()

    def wait_held(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until `count` calls are held at the gate; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.held >= count, timeout)

    def _hold(self, call: Call) -> None:
        with self._changed:
            self.held += 1
            self.arrived += 1
            self._changed.notify_all()
        try:
            # A bound, so a test that forgets to release fails instead of hanging at exit.
            if not self._open.wait(self.timeout):
                raise TimeoutError(f"FaultyStore: {call.method} {call.key} held and never released")
        finally:
            with self._changed:
                self.held -= 1
                self._changed.notify_all()


S = TypeVar("S", bound=ObjectStore)
T = TypeVar("T")


class FaultyStore(_CallLog, WritableStore, Generic[S]):
    """Wraps a store and injects faults by rule; records every call made through it.

    Rules apply to any method in METHODS, e.g. "get_range" or "list_page" (a listing fails page by
    page), optionally only to calls for which `when(call)` is true and only
    `times` times; matching rules run in the order they were added. ``calls``
    holds every call, faulted or not, as the engine made it; ``active`` and
    ``max_active`` count calls in flight (held ones included).
    """

    def __init__(self, inner: S) -> None:
        self._start_log()
        self.inner = inner
        self._lock = threading.RLock()  # a `when` predicate may look at the store
        self._rules: list[Rule] = []
        self._gates: list[Gate] = []  # every gate made, to open them all at close
        self._active: Counter[str] = Counter()
        self._max_active: Counter[str] = Counter()

    @property
    def config(self) -> StoreSettings:
        return self.inner.config

    # -- rules ---------------------------------------------------------------------

    def fail(
        self,
        method: str,
        error: BaseException,
        *,
        times: int | None = None,
        when: Callable[[Call], bool] | None = None,
    ) -> Rule:
        """Raise `error` (a fresh copy each time) instead of making matching calls."""

        def raise_error(call: Call) -> None:
            raise copy.copy(error)

        return self._add(Rule(self, method, times=times, when=when, before=raise_error))

    def before(
        self,
        method: str,
        action: Callable[[Call], None],
        *,
        times: int | None = None,
        when: Callable[[Call], bool] | None = None,
    ) -> Rule:
        """Run `action(call)` before matching calls: change the inner store, raise, ..."""
        return self._add(Rule(self, method, times=times, when=when, before=action))

    def hold(
        self,
        method: str,
        *,
        times: int | None = None,
        when: Callable[[Call], bool] | None = None,
        timeout: float | None = 60.0,
    ) -> Gate:
        """Hold matching calls (a hung store) until ``gate.release()``."""
        gate = Gate(self, method, times=times, when=when, timeout=timeout)
        with self._lock:
            self._gates.append(gate)
        self._add(gate)
        return gate

    def delay(
        self,
        method: str,
        seconds: float,
        *,
        times: int | None = None,
        when: Callable[[Call], bool] | None = None,
    ) -> Rule:
        """Slow matching calls down: widens races in stress tests (to order events, hold)."""
        return self.before(method, lambda call: time.sleep(seconds), times=times, when=when)

    def corrupt(self, offset: int, *, key: str | None = None, times: int | None = None) -> Rule:
        """Flip the byte at `offset` of the object in every get_range answer covering it."""

        def covers(call: Call) -> bool:
            assert call.start is not None and call.end is not None
            return call.start <= offset <= call.end and key in (None, call.key)

        def flip(call: Call, buf: Buffer) -> None:
            assert call.start is not None
            view = memoryview(buf).cast("B")
            view[offset - call.start] ^= 0xFF

        return self._add(Rule(self, "get_range", times=times, when=covers, after=flip))

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule and release every gate: the store behaves again."""
        with self._lock:
            gates, self._gates, self._rules = self._gates, [], []
        for gate in gates:
            gate.release()

    def active(self, method: str) -> int:
        with self._lock:
            return self._active[method]

    def max_active(self, method: str) -> int:
        with self._lock:
            return self._max_active[method]

    # -- ObjectStore -----------------------------------------------------------------

    def describe(self, key: str = "") -> str:
        return self.inner.describe(key)

    def head(self, key: str) -> ObjectMeta:
        return self._call(Call("head", key), lambda: self.inner.head(key))

    def get_range(
        self,
        key: str,
        start: int,
        end: int,
        *,
        if_match: str | None = None,
        into: Buffer | None = None,
    ) -> Buffer:
        if end < start:
            raise ValueError(f"empty range {start}-{end}")  # as the client: no request made
        call = Call("get_range", key, start, end, if_match or None)
        return self._call(
            call, lambda: self.inner.get_range(key, start, end, if_match=if_match, into=into)
        )

    def list_page(
        self, prefix: str, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        call = Call("list_page", prefix, delimiter=delimiter, token=token)
        return self._call(call, lambda: self.inner.list_page(prefix, delimiter, token, max_keys))

    def list(self, prefix: str, delimiter: str = "/") -> Iterator[ListPage]:
        return _pages(self, prefix, delimiter)

    # The write methods forward to a WritableStore inner store (a MemoryStore).
    def get_object(self, key: str, into: Buffer) -> tuple[ObjectMeta, int]:
        return self._call(Call("get_object", key), lambda: self.inner.get_object(key, into))  # type: ignore[attr-defined]

    def put_object(
        self,
        key: str,
        data: Buffer | bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> bool:
        return self._call(
            Call("put_object", key),
            lambda: self.inner.put_object(  # type: ignore[attr-defined]
                key, data, metadata=metadata, headers=headers, if_none_match=if_none_match
            ),
        )

    def delete_object(self, key: str) -> None:
        self._call(Call("delete_object", key), lambda: self.inner.delete_object(key))  # type: ignore[attr-defined]

    def check_access(self, prefix: str = "") -> None:
        self.list_page(prefix, "/", max_keys=1)

    def close(self) -> None:
        self.clear()  # nothing stays held past a shutdown
        self.inner.close()

    # -- internals -------------------------------------------------------------------

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _match(self, call: Call) -> builtins.list[Rule]:  # `list` here is the method
        with self._lock:
            matched = [rule for rule in self._rules if rule.matches(call)]
            for rule in matched:
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
        return matched

    def _call(self, call: Call, forward: Callable[[], T]) -> T:
        self._record(call)
        with self._lock:
            self._active[call.method] += 1
            self._max_active[call.method] = max(
                self._max_active[call.method], self._active[call.method]
            )
        try:
            matched = self._match(call)
            for rule in matched:
                if rule.before is not None:
                    rule.before(call)  # outside the lock: it may hold the call
            result = forward()
            for rule in matched:
                if rule.after is not None:
                    rule.after(call, result)  # type: ignore[arg-type]
            return result
        finally:
            with self._lock:
                self._active[call.method] -= 1
