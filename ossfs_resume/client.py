"""Object-store client: HTTP, signing, retries. Knows nothing about files.

Speaks two dialects over one code path: Alibaba Cloud OSS (signature V4 or V1,
or anonymous) and S3 (SigV4, or anonymous). Every ranged GET is checked
strictly (206, matching Content-Range, full body) because a store that ignores
a Range header would otherwise hand back the wrong bytes silently.

Once a request has found the store unreachable (connection failures or
timeouts through every retry), the client fails further requests at once for
``down_latch`` seconds instead of letting each wait through its own retries;
after that, one request per window probes the store with a single attempt
(the others still fail at once) until one is answered, so reads recover soon
after the store is back.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal
from typing import Protocol as TypingProtocol
from urllib.parse import unquote_plus, urlsplit

from .errors import (
    AccessDeniedError,
    InvalidRangeError,
    NoSuchBucketError,
    NotFoundError,
    PreconditionFailedError,
    ProtocolError,
    StoreError,
    StoreUnavailableError,
    TLSError,
    UsageError,
)
from .objectstore import Buffer, ListPage, ObjectMeta  # defined beside ObjectStore; re-exported
from .signing import (
    Credentials,
    canonical_query,
    encode_key_path,
    sign_oss_v1,
    sign_oss_v4,
    sign_s3_v4,
)
from .transport import (
    ConnectionPool,
    Response,
    TimedOut,
    TLSFailed,
    TransportError,
)

log = logging.getLogger(__name__)

Protocol = Literal["oss", "s3"]

#: Statuses worth another attempt: throttling and server-side trouble.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_OSS_REGION = re.compile(r"^oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")
_IP_HOST = re.compile(r"^(\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]+\]|localhost)$")


class CredentialsProvider(TypingProtocol):
    """Keys that may change (temporary credentials): asked for before every request.

    ``name`` says where the keys come from, for messages (never the keys); ``hint`` is
    added to an access-denied error. See ``credentials.py`` for the sources.
    """

    @property
    def name(self) -> str: ...
    @property
    def hint(self) -> str: ...
    @property
    def anonymous(self) -> bool: ...  # True: get() always returns None
    def get(self) -> Credentials | None: ...


@dataclass(frozen=True)
class StoreConfig:
    protocol: Protocol
    endpoint: str  # scheme://host[:port]
    bucket: str
    credentials: Credentials | None = None  # None: anonymous, unsigned requests
    # When set, used instead of `credentials`: its current keys sign each request.
    credentials_provider: CredentialsProvider | None = field(default=None, compare=False)
    region: str | None = None
    signature_version: Literal["v4", "v1"] = "v4"  # OSS only
    addressing: Literal["auto", "path", "virtual"] = "auto"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 4
    backoff_base: float = 0.1
    backoff_cap: float = 2.0
    pool_size: int = 16
    # After the store was found unreachable, fail requests at once for this long (0: never).
    down_latch: float = 2.0

    # CA certificates to verify an https endpoint with (None: certifi's, else the system's).
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint)

    @property
    def store_id(self) -> str:
        return store_id(self.protocol, self.endpoint)

    @property
    def anonymous(self) -> bool:
        provider = self.credentials_provider
        return self.credentials is None and (provider is None or provider.anonymous)

    def current_credentials(self) -> Credentials | None:
        """The keys to sign the next request with (None: unsigned)."""
        if self.credentials_provider is not None:
            return self.credentials_provider.get()
        return self.credentials

    @property
    def effective_region(self) -> str:
        if self.region:
            return self.region
        host = urlsplit(self.endpoint).hostname or ""
        match = _OSS_REGION.match(host)
        if match:
            return match.group(1)
        return "cn-hangzhou" if self.protocol == "oss" else "us-east-1"

    @property
    def path_style(self) -> bool:
        if self.addressing != "auto":
            return self.addressing == "path"
        host = urlsplit(self.endpoint).hostname or ""
        # IPs and localhost have no per-bucket DNS names; S3 on custom endpoints
        # (SeaweedFS, MinIO) also expects path style.
        return bool(_IP_HOST.match(host)) or (self.protocol == "s3" and "amazonaws" not in host)


def check_endpoint(endpoint: str) -> None:
    """Raise UsageError unless `endpoint` is http(s)://host[:port] with a valid port."""
    expected = "expected http(s)://host[:port]"
    try:
        parts = urlsplit(endpoint)
        port = parts.port  # parsed lazily: a bad port raises only here
    except ValueError as exc:
        raise UsageError(f"bad endpoint {endpoint!r}: {exc}; {expected}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad endpoint {endpoint!r}: {expected}")
    if "@" in parts.netloc:
        # Never echo it: user:password@ would put a secret in the message.
        raise UsageError(f"bad endpoint: no user name or password in it; {expected}")
    if port == 0:
        raise UsageError(f"bad endpoint {endpoint!r}: port must be 1..65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"bad endpoint {endpoint!r}: no path or query; {expected}")


#: Environment variables naming a CA bundle, in the order they are honoured.
CA_BUNDLE_ENV = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


def ca_bundle_from_env(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(path, variable name) of the first CA_BUNDLE_ENV variable set, else None."""
    env = os.environ if env is None else env
    for name in CA_BUNDLE_ENV:
        if env.get(name):
            return env[name], name
    return None


def store_id(protocol: str, endpoint: str) -> str:
    """Identifies a store in cache keys: protocol plus endpoint, no credentials."""
    return f"{protocol}+{endpoint.rstrip('/')}"


def credentials_from_env(
    protocol: Protocol, env: Mapping[str, str] | None = None
) -> Credentials | None:
    """Read credentials from the environment; None (anonymous) when unset."""
    env = os.environ if env is None else env
    prefix = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN")
    if protocol == "s3":
        prefix = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    key_id, secret = env.get(prefix[0]), env.get(prefix[1])
    if not key_id and not secret:
        return None
    if not key_id or not secret:
        raise UsageError(f"set both {prefix[0]} and {prefix[1]}, or neither for anonymous access")
    return Credentials(key_id, secret, env.get(prefix[2]) or None)


@dataclass
class RequestCounters:
    """Requests this client sent, by kind; tests and `cache stats` read them."""

    get: int = 0
    head: int = 0
    list: int = 0
    retries: int = 0
    bytes_received: int = 0
    #: Answers by (kind: head/get/list, HTTP status or "error" when none came): metrics.
    responses: dict[tuple[str, str], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def add_response(self, kind: str, status: str) -> None:
        with self._lock:
            self.responses[kind, status] = self.responses.get((kind, status), 0) + 1

    def by_status(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.responses)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "get": self.get,
                "head": self.head,
                "list": self.list,
                "retries": self.retries,
                "bytes_received": self.bytes_received,
            }


class _Retry(Exception):
    """Internal: a body was cut short; `filled` bytes of it arrived and are kept."""

    def __init__(self, reason: str, filled: int = 0) -> None:
        super().__init__(reason)
        self.filled = filled


class StoreClient:
    """Thread-safe client for one bucket. One pooled session sized to the worker count."""

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.counters = RequestCounters()
        self._clock = clock
        # "Store down" latch: see the module docstring. _down_since is None while the
        # store answers; _down_until is when requests may probe it again.
        self._down_lock = threading.Lock()
        self._down_since: float | None = None
        self._down_until = 0.0
        self._down_reason = ""
        self._answered = False  # has the store ever answered this client?
        # More threads than connections wait for one instead of churning sockets;
        # retries are ours (they must also cover bodies cut short).
        self._pool = ConnectionPool(
            config.endpoint,
            maxsize=config.pool_size,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            ca_bundle=config.ca_bundle,
        )
        split = urlsplit(config.endpoint)
        self._scheme = split.scheme
        self._netloc = split.netloc
        self._host = split.hostname or ""

    # -- public API -------------------------------------------------------

    def describe(self, key: str = "") -> str:
        """A URL-like name for messages: oss://bucket/key."""
        return f"{self.config.protocol}://{self.config.bucket}/{key}"

    def head(
        self,
        key: str,
        *,
        version_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ObjectMeta:
        """HEAD an object (one version of it, with `version_id`): size, ETag,
        Last-Modified, CRC-64 when present. `headers` are sent (and signed) as given."""
        self.counters.add("head")
        query = {"versionId": version_id} if version_id else None
        resp = self._request("HEAD", key, query=query, headers=headers)
        try:
            return self._meta_from_headers(key, resp.headers)
        finally:
            resp.close()

    def get_range(
        self,
        key: str,
        start: int,
        end: int,
        *,
        if_match: str | None = None,
        into: memoryview | bytearray | None = None,
        version_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> memoryview | bytearray:
        """Fetch bytes [start, end] (inclusive) of `key`, exactly, into `into` or a new buffer.

        A body cut short is resumed from the byte reached with a fresh Range
        request, up to the retry bound; with `if_match`, a changed object fails
        with PreconditionFailedError instead of mixing versions.
        """
        length = end - start + 1
        if length <= 0:
            raise ValueError(f"empty range {start}-{end}")
        buf = bytearray(length) if into is None else into
        view = memoryview(buf)
        if len(view) < length:
            raise ValueError("buffer smaller than the range")
        filled = 0
        attempt = 0
        while filled < length:
            self.counters.add("get")
            sent = {**(headers or {}), "Range": f"bytes={start + filled}-{end}"}
            if if_match:
                sent["If-Match"] = f'"{if_match}"'
            query = {"versionId": version_id} if version_id else None
            resp = self._request("GET", key, query=query, headers=sent, stream=True)
            try:
                self._check_range_response(resp, key, start + filled, end, if_match)
                filled += self._read_into(resp, view[filled:length], key)
            except _Retry as retry:
                resp.close()
                filled += retry.filled  # resume from the byte reached
                attempt += 1  # bounded: a link that keeps dropping gives up in seconds
                if attempt >= self.config.max_attempts:
                    raise StoreUnavailableError(
                        f"GET {self.describe(key)}: {retry} after {attempt} attempts", key=key
                    ) from None
                self.counters.add("retries")
                log.info(
                    "GET %s bytes=%d-%d: %s; resuming at byte %d",
                    self.describe(key),
                    start,
                    end,
                    retry,
                    start + filled,
                )
                self._sleep_backoff(attempt)
                continue
            except BaseException:
                resp.close()
                raise
            resp.release()
        return buf

    def list_page(
        self, prefix: str, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        """One ListObjectsV2 page."""
        query: dict[str, str | None] = {
            "list-type": "2",
            "prefix": prefix,
            "max-keys": str(max_keys),
            "encoding-type": "url",
        }
        if delimiter:  # none: every key under the prefix, however deep
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        self.counters.add("list")
        resp = self._request("GET", "", query=query)
        try:
            return self._parse_list(resp.content)
        finally:
            resp.close()

    def list(self, prefix: str, delimiter: str = "/") -> Iterator[ListPage]:
        """Every ListObjectsV2 page under `prefix`."""
        token: str | None = None
        while True:
            page = self.list_page(prefix, delimiter, token)
            yield page
            if not page.next_token:
                return
            token = page.next_token

    def get_object(self, key: str, into: Buffer) -> tuple[ObjectMeta, int]:
        """GET the whole object: (its metadata, user metadata included; bytes read).

        The body is read into `into` only if the object is exactly ``len(into)``
        bytes; otherwise nothing is read (0). One attempt at the body: a body cut
        short raises StoreUnavailableError (callers of this are the shared tier,
        which would rather go to the origin than wait).
        """
        self.counters.add("get")
        resp = self._request("GET", key, stream=True)
        try:
            meta = self._meta_from_headers(key, resp.headers)
            view = memoryview(into).cast("B")
            if meta.size != len(view):
                return meta, 0
            try:
                n = self._read_into(resp, view, key)
            except _Retry as exc:
                raise StoreUnavailableError(f"GET {self.describe(key)}: {exc}", key=key) from None
            resp.release()
            return meta, n
        finally:
            resp.close()

    def put_object(
        self,
        key: str,
        data: Buffer | bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> bool:
        """PUT `data` under `key`, with user `metadata` (sent as x-amz-meta-* or
        x-oss-meta-*, signed). With `if_none_match`, an object already there is kept
        and False returned (S3: If-None-Match: *, 412; OSS: x-oss-forbid-overwrite,
        409); a store that ignores the condition overwrites, which callers writing
        the same bytes under a content address tolerate. True: written."""
        meta_prefix = "x-oss-meta-" if self.config.protocol == "oss" else "x-amz-meta-"
        body = bytes(data)  # one part at most
        sent = {**(headers or {}), "Content-Length": str(len(body))}
        for name, value in (metadata or {}).items():
            sent[meta_prefix + name.lower()] = value
        if if_none_match:
            if self.config.protocol == "oss":
                sent["x-oss-forbid-overwrite"] = "true"
            else:
                sent["If-None-Match"] = "*"
        try:
            resp = self._request("PUT", key, headers=sent, data=body)
        except StoreError as exc:
            if if_none_match and exc.status in (409, 412):
                return False
            raise
        resp.close()
        return True

    def delete_object(self, key: str) -> None:
        """DELETE `key`; a missing key is no error (as the stores answer 204)."""
        try:
            resp = self._request("DELETE", key)
        except NotFoundError:
            return
        resp.close()

    def check_access(self, prefix: str = "") -> None:
        """Fail fast with a clear error if the endpoint, bucket or credentials are wrong."""
        self.list_page(prefix, "/", max_keys=1)

    def close(self) -> None:
        self._pool.close()

    # -- internals --------------------------------------------------------

    def _fail_if_down(self, key: str) -> bool:
        """Raise at once while the latch holds; True if this request is to probe the store."""
        if self._down_since is None:  # the common case, without the lock
            return False
        with self._down_lock:
            since, until, reason = self._down_since, self._down_until, self._down_reason
            if since is None:
                return False
            now = self._clock()
            if now >= until:
                # This request probes; the others keep failing at once meanwhile, so a
                # hung store costs one timeout per window, not one per waiting request.
                self._down_until = now + self.config.down_latch
                return True
        raise StoreUnavailableError(
            f"cannot reach {self.config.endpoint}: {reason} (down for {now - since:.1f} s; "
            f"next probe in {until - now:.1f} s)",
            key=key,
        )

    def _mark_down(self, reason: str) -> None:
        if self.config.down_latch <= 0:
            return
        now = self._clock()
        with self._down_lock:
            first = self._down_since is None
            if first:
                self._down_since = now
            self._down_until = now + self.config.down_latch
            self._down_reason = reason
        if first:
            # An outage after the store had answered is news for the log. Never reached
            # at all (a wrong --endpoint), the caller's error already says it, in one line.
            log.log(
                logging.WARNING if self._answered else logging.INFO,
                "%s is unreachable (%s); failing requests at once for %.1f s between probes",
                self.config.endpoint,
                reason,
                self.config.down_latch,
            )

    def _mark_up(self) -> None:
        with self._down_lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info(
                "%s answers again (unreachable for %.1f s)",
                self.config.endpoint,
                self._clock() - since,
            )

    def _url_and_path(self, key: str) -> tuple[str, str, str]:
        """(base URL without query, host header, encoded path) for bucket + key.

        Dot segments are escaped (see encode_key_path): the path names exactly `key`.
        """
        encoded_key = encode_key_path(key)
        bucket = self.config.bucket
        if self.config.path_style:
            path = f"/{bucket}/{encoded_key}"
            return f"{self._scheme}://{self._netloc}{path}", self._netloc, path
        netloc = f"{bucket}.{self._netloc}"
        path = f"/{encoded_key}"
        return f"{self._scheme}://{netloc}{path}", netloc, path

    def _sign(
        self,
        method: str,
        key: str,
        query: Mapping[str, str | None],
        headers: dict[str, str],
        host: str,
        path: str,
    ) -> None:
        cfg = self.config
        if cfg.protocol == "oss":
            # Without it OSS answers a bad range with 200 and the whole object.
            headers["x-oss-range-behavior"] = "standard"
        creds = cfg.current_credentials()
        if creds is None:
            return
        now = datetime.now(timezone.utc)
        if cfg.protocol == "oss":
            if cfg.signature_version == "v1":
                sign_oss_v1(method, cfg.bucket, key, query, headers, creds, now)
            else:
                sign_oss_v4(
                    method, cfg.bucket, key, query, headers, creds, cfg.effective_region, now
                )
        else:
            sign_s3_v4(method, host, path, query, headers, creds, cfg.effective_region, now)

    def _request(
        self,
        method: str,
        key: str,
        *,
        query: Mapping[str, str | None] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        data: bytes | None = None,
    ) -> Response:
        """Send with retries on connection errors, 429 and 5xx; raise mapped errors."""
        query = dict(query or {})
        kind = "head" if method == "HEAD" else "list" if "list-type" in query else "get"
        if method in ("PUT", "DELETE"):
            kind = method.lower()
        attempt = 0
        while True:
            attempt += 1
            # Checked before every attempt: a request backing off stops as soon as
            # another one has found the store unreachable.
            probing = self._fail_if_down(key)
            hdrs = {"Accept-Encoding": "identity", **(headers or {})}
            url, host, path = self._url_and_path(key)
            self._sign(method, key, query, hdrs, host, path)
            qs = canonical_query(query)
            if qs:
                url = f"{url}?{qs}"
            started = time.monotonic()
            try:
                resp = self._send(method, url, path, qs, hdrs, stream, data)
            except TLSFailed as exc:
                self.counters.add_response(kind, "error")
                reason, permanent = _tls_reason(exc)
                if permanent:
                    # Retrying cannot fix a certificate, and the store is not down.
                    raise TLSError(
                        f"cannot connect to {self.config.endpoint} securely: {reason}", key=key
                    ) from None
                # A handshake cut short is a connection failure like any other.
                self._unreachable(method, key, reason, attempt, probing)
                continue
            except TransportError as exc:  # refused, reset, timed out, cut short
                self.counters.add_response(kind, "error")
                self._unreachable(method, key, _connection_reason(exc), attempt, probing)
                continue
            log.debug(
                "%s %s %s -> %d in %.1f ms",
                method,
                self.describe(key),
                hdrs.get("Range", ""),
                resp.status_code,
                (time.monotonic() - started) * 1000,
            )
            self.counters.add_response(kind, str(resp.status_code))
            self._answered = True
            if self._down_since is not None:
                self._mark_up()  # any answer, even an error status, means it is reachable
            if resp.status_code < 300:
                return resp
            error = self._error_from_response(method, key, resp)
            resp.close()
            if resp.status_code in RETRY_STATUSES and attempt < self.config.max_attempts:
                self._retrying(method, key, str(error), attempt)
                continue
            raise error

    def _send(
        self,
        method: str,
        url: str,
        path: str,
        qs: str,
        headers: dict[str, str],
        stream: bool,
        data: bytes | None = None,
    ) -> Response:
        """One HTTP exchange, with the path and query exactly as encoded and signed.

        `url` names the host (virtual-hosted style puts the bucket there); the
        body is read by the caller (`stream`) or here, whole."""
        target = path + (f"?{qs}" if qs else "")
        if "Host" not in headers and "host" not in headers:
            headers["Host"] = urlsplit(url).netloc
        resp = self._pool.request(method, target, headers, data)
        if not stream:
            try:
                resp.content  # noqa: B018 - read whole: the connection goes back to the pool
            except BaseException:
                resp.close()
                raise
        return resp

    def _unreachable(self, method: str, key: str, reason: str, attempt: int, probing: bool) -> None:
        """The store could not be reached: back off for another attempt, or give up (and
        mark it down) after the last one. A probe of a store already down gets one
        attempt: it fails in one timeout."""
        if attempt >= self.config.max_attempts or probing:
            self._mark_down(reason)
            raise StoreUnavailableError(
                f"cannot reach {self.config.endpoint}: {reason} (after {attempt} attempts)",
                key=key,
            ) from None
        self._retrying(method, key, reason, attempt)

    def _retrying(self, method: str, key: str, reason: str, attempt: int) -> None:
        self.counters.add("retries")
        log.info("%s %s: %s; retry %d", method, self.describe(key), reason, attempt)
        self._sleep_backoff(attempt)

    def _sleep_backoff(self, attempt: int) -> None:
        # Exponential backoff with jitter (half to all of a step): readers do not retry in step.
        ceiling = min(self.config.backoff_cap, self.config.backoff_base * (2 ** (attempt - 1)))
        time.sleep(random.uniform(ceiling / 2, ceiling))

    def _error_from_response(self, method: str, key: str, resp: Response) -> StoreError:
        status = resp.status_code
        code = message = None
        if method != "HEAD":
            try:
                body = resp.content[:65536]
                root = ET.fromstring(body)
                code = _child_text(root, "Code")
                message = _child_text(root, "Message")
            except (ET.ParseError, TransportError):
                pass
        request_id = resp.headers.get("x-oss-request-id") or resp.headers.get("x-amz-request-id")
        what = f"{method} {self.describe(key)}"
        detail = f"{status} {code or resp.reason or ''}".strip()
        if message:
            detail = f"{detail}: {' '.join(message.split())[:200]}"
        text = f"{what}: {detail}"
        kwargs = {"status": status, "code": code, "key": key, "request_id": request_id}
        if status == 404:
            if code == "NoSuchBucket" or (key == "" and code is None):
                return NoSuchBucketError(
                    f"bucket {self.config.bucket!r} does not exist at {self.config.endpoint}",
                    **kwargs,
                )
            return NotFoundError(f"{what}: no such object", **kwargs)
        if status == 403:
            hint = ""
            provider = self.config.credentials_provider
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                hint = " (check the access key id and secret)"
            elif self.config.anonymous:
                hint = " (no credentials set: anonymous access was refused)"
            if provider is not None and provider.anonymous:
                if provider.hint:
                    hint = f"{hint[:-1]}; {provider.hint})"
            elif provider is not None:
                source = f"credentials from {provider.name}"
                if provider.hint:
                    source = f"{source}; {provider.hint}"
                hint = f"{hint[:-1]}; {source})" if hint else f" ({source})"
            return AccessDeniedError(f"{text}{hint}", **kwargs)
        if status == 412:
            return PreconditionFailedError(
                f"{what}: the object changed (ETag no longer matches)", **kwargs
            )
        if status == 416:
            return InvalidRangeError(f"{text}", **kwargs)
        if status in RETRY_STATUSES:
            return StoreUnavailableError(text, **kwargs)
        return StoreError(text, **kwargs)

    def _check_range_response(
        self,
        resp: Response,
        key: str,
        start: int,
        end: int,
        if_match: str | None,
    ) -> None:
        what = f"GET {self.describe(key)} bytes={start}-{end}"
        if resp.status_code != 206:
            resp.close()
            raise ProtocolError(f"{what}: answered {resp.status_code}, not 206 Partial Content")
        match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != start or int(match.group(2)) != end:
            resp.close()
            raise ProtocolError(
                f"{what}: wrong Content-Range {resp.headers.get('Content-Range')!r}"
            )
        etag = _strip_etag(resp.headers.get("ETag"))
        if if_match and etag and etag != if_match:
            resp.close()
            raise PreconditionFailedError(
                f"{what}: the object changed (ETag {etag} != {if_match})", status=412, key=key
            )

    def _read_into(self, resp: Response, view: memoryview, key: str) -> int:
        """Read the body into `view`; a short body raises _Retry with bytes kept in `view`."""
        encoding = resp.headers.get("Content-Encoding") or "identity"
        if encoding != "identity":  # asked for identity: anything else is not our bytes
            raise ProtocolError(f"GET {self.describe(key)}: answered with {encoding} encoding")
        readinto = resp.readinto
        filled = 0
        total = len(view)
        try:
            while filled < total:
                n = readinto(view[filled:])
                if not n:
                    break
                filled += n
        except TransportError as exc:
            self.counters.add("bytes_received", filled)
            raise _Retry(
                f"body cut short after {filled} of {total} bytes ({type(exc).__name__})", filled
            ) from None
        self.counters.add("bytes_received", filled)
        if filled < total:
            raise _Retry(f"body cut short after {filled} of {total} bytes", filled)
        return filled

    def _meta_from_headers(self, key: str, headers: Mapping[str, str]) -> ObjectMeta:
        crc = headers.get("x-oss-hash-crc64ecma")
        lm = headers.get("Last-Modified")
        return ObjectMeta(
            key=key,
            size=int(headers.get("Content-Length", "0")),
            etag=_strip_etag(headers.get("ETag")) or "",
            last_modified=email.utils.parsedate_to_datetime(lm).timestamp() if lm else 0.0,
            crc64=int(crc) if crc and crc.isdigit() else None,
            metadata={
                name.lower()[len(prefix) :]: value
                for name, value in headers.items()
                for prefix in ("x-amz-meta-", "x-oss-meta-")
                if name.lower().startswith(prefix)
            },
        )

    def _parse_list(self, body: bytes) -> ListPage:
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            raise ProtocolError(f"LIST {self.describe()}: unreadable XML ({exc})") from None
        encoded = (_child_text(root, "EncodingType") or "").lower() == "url"

        def decode(value: str) -> str:
            return unquote_plus(value) if encoded else value

        objects: list[ObjectMeta] = []
        prefixes: list[str] = []
        for child in root:
            tag = _local(child.tag)
            if tag == "Contents":
                objects.append(
                    ObjectMeta(
                        key=decode(_child_text(child, "Key") or ""),
                        size=int(_child_text(child, "Size") or "0"),
                        etag=_strip_etag(_child_text(child, "ETag")) or "",
                        last_modified=parse_iso8601(_child_text(child, "LastModified")),
                    )
                )
            elif tag == "CommonPrefixes":
                prefixes.append(decode(_child_text(child, "Prefix") or ""))
        truncated = (_child_text(root, "IsTruncated") or "").lower() == "true"
        token = _child_text(root, "NextContinuationToken") if truncated else None
        if truncated and not token:
            raise ProtocolError(
                f"LIST {self.describe()}: truncated page without a continuation token"
            )
        return ListPage(objects, prefixes, token)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(node: ET.Element, name: str) -> str | None:
    for child in node:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def _strip_etag(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def parse_iso8601(value: str | None) -> float:
    """Listing timestamps like 2024-01-02T03:04:05.000Z (Python 3.10's fromisoformat lacks 'Z')."""
    if not value:
        return 0.0
    text = value.strip().replace("Z", "+00:00")
    if "." in text:
        head, _, rest = text.partition(".")
        digits = re.match(r"\d*", rest).group(0)  # type: ignore[union-attr]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits) :]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ssl module's error under a transport error."""
    todo: list[object] = [exc]
    seen: set[int] = set()
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLError):
            return item
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return None


def _tls_reason(exc: BaseException) -> tuple[str, bool]:
    """(one-line reason, permanent?) for a failed TLS handshake.

    Permanent: a certificate that does not verify, or a server that does not
    speak TLS at all; retrying would fail the same way. A handshake cut short
    (EOF, reset) is not.
    """
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = (cause.verify_message or cause.reason or "").rstrip(".")
        return f"certificate verify failed: {detail}; see --ca-bundle", True
    if isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or cause is None:
        return f"TLS handshake cut short ({_connection_reason(exc)})", False
    reason = cause.reason or cause.strerror or type(cause).__name__
    if reason == "WRONG_VERSION_NUMBER":
        return "TLS handshake failed: the server does not speak TLS (is it http://?)", True
    return f"TLS handshake failed: {reason}", True


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    for marker, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "host not found"),
        ("nodename nor servname", "host not found"),
        ("Temporary failure in name resolution", "host not found"),
        ("timed out", "timed out"),
        ("Connection reset", "connection reset"),
    ):
        if marker in text:
            return reason
    if isinstance(exc, TimedOut):
        return "timed out"
    return type(exc).__name__


if TYPE_CHECKING:
    from .objectstore import ObjectStore

    # StoreClient is an ObjectStore: a type checker verifies it here.
    _: type[ObjectStore] = StoreClient
