"""StoreClient against a fake object store: a real HTTP server on 127.0.0.1 we control.

The fake serves a few objects with Range, ETag and If-Match support, answers
ListObjectsV2 with pagination and ``encoding-type=url``, and can be told to
misbehave on the next requests (5xx, a 200 to a ranged GET, a wrong
Content-Range, a body cut short). Every request it sees is recorded, so tests
check what the client actually sent.
"""

from __future__ import annotations

import email.utils
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest

from ossfs_resume.checksum import crc64
from ossfs_resume.client import (
    CA_BUNDLE_ENV,
    ObjectMeta,
    StoreClient,
    StoreConfig,
    ca_bundle_from_env,
    check_endpoint,
    credentials_from_env,
    parse_iso8601,
)
from ossfs_resume.errors import (
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
from ossfs_resume.signing import Credentials
from ossfs_resume.transport import ConnectFailed

from .conftest import serving

BUCKET = "bkt"
SECRET = "Sup3r-Secret/Value+="
MTIME = 1_704_164_645.0  # 2024-01-02T03:04:05Z


# Fails a test that hangs (a deadlock) instead of stalling the run: see conftest.py.
pytestmark = pytest.mark.usefixtures("watchdog")


def _payload(size: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed + (i >> 8)) % 251 for i in range(size))


@dataclass
class Seen:
    method: str
    bucket: str
    key: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    target: str = ""  # the request target exactly as received: encoded path and query


@dataclass
class FakeStore:
    bucket: str = BUCKET
    objects: dict[str, bytes] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)
    #: One entry consumed per request, in order; "" means behave.
    faults: list[str] = field(default_factory=list)
    page_size: int = 2
    #: How keys are url-encoded in listings: OSS style (%20) or S3 style ('+').
    key_encoder: str = "quote"
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, key: str, data: bytes, etag: str | None = None) -> None:
        self.objects[key] = data
        self.etags[key] = etag or f"etag-{len(data)}-{crc64(data):x}"

    def next_fault(self) -> str:
        with self.lock:
            return self.faults.pop(0) if self.faults else ""

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)

    def requests(self, method: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if method is None or s.method == method]


def _error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message><RequestId>REQ-1</RequestId></Error>"
    ).encode()


class FakeStoreHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeStoreServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    # -- responses --------------------------------------------------------

    def _send(self, status: int, headers: dict[str, str], body: bytes, method: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, method: str) -> None:
        body = _error_xml(code, message)
        headers = {"Content-Type": "application/xml", "x-oss-request-id": "REQ-1"}
        if method == "HEAD":
            headers["Content-Length"] = "0"
        self._send(status, headers, body, method)

    def _handle(self, method: str) -> None:
        store = self.server.store
        split = urlsplit(self.path)
        path = unquote(split.path)
        bucket, _, key = path.lstrip("/").partition("/")
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        store.record(Seen(method, bucket, key, query, headers, self.path))
        fault = store.next_fault()

        if fault in ("500", "503"):
            self._error(int(fault), "ServiceUnavailable", "please slow down", method)
            return
        if fault == "403-sig":
            self._error(403, "SignatureDoesNotMatch", "The request signature ...", method)
            return
        if fault == "403":
            self._error(403, "AccessDenied", "no permission", method)
            return
        if bucket != store.bucket:
            self._error(404, "NoSuchBucket", "The specified bucket does not exist.", method)
            return
        if "list-type" in query:
            self._list(query)
            return
        if key not in store.objects:
            self._error(404, "NoSuchKey", "The specified key does not exist.", method)
            return
        data = store.objects[key]
        etag = store.etags[key]
        if_match = headers.get("if-match")
        if if_match is not None and if_match.strip('"') != etag:
            self._error(412, "PreconditionFailed", "At least one precondition failed", method)
            return
        common = {
            "ETag": f'"{etag}"',
            "Last-Modified": email.utils.formatdate(MTIME, usegmt=True),
            "x-oss-hash-crc64ecma": str(crc64(data)),
            "Accept-Ranges": "bytes",
        }
        range_header = headers.get("range")
        if method == "HEAD" or range_header is None or fault == "ignore-range":
            self._send(200, common, data, method)
            return
        first, _, last = range_header.removeprefix("bytes=").partition("-")
        start = int(first)
        end = min(int(last), len(data) - 1) if last else len(data) - 1
        if start >= len(data):
            self._error(416, "InvalidRange", "The requested range is not satisfiable", method)
            return
        body = data[start : end + 1]
        content_range = f"bytes {start}-{end}/{len(data)}"
        if fault == "bad-content-range:start":
            content_range = f"bytes {start + 1}-{end}/{len(data)}"
        elif fault == "bad-content-range:end":
            content_range = f"bytes {start}-{end - 1}/{len(data)}"
        elif fault == "bad-content-range:garbage":
            content_range = f"{start}-{end}"
        if fault == "other-etag":
            common["ETag"] = '"some-other-version"'
        out = {**common, "Content-Range": content_range}
        if fault.startswith("cut:"):
            # Promise the whole range, send only part of it, then hang up.
            sent = int(fault.split(":")[1])
            self.send_response(206)
            for name, value in out.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:sent])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(206, out, body, method)

    def _list(self, query: dict[str, str]) -> None:
        store = self.server.store
        if len(store.requests("GET")) > 100:
            # A client that never sends the continuation token would loop forever.
            self._error(400, "TooManyPages", "test store: listing does not end", "GET")
            return
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        max_keys = int(query.get("max-keys", "1000"))
        encode = query.get("encoding-type") == "url"
        entries: dict[str, bool] = {}  # name -> is a common prefix
        for key in sorted(store.objects):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                entries[prefix + rest[: rest.index(delimiter) + len(delimiter)]] = True
            else:
                entries[key] = False
        ordered = sorted(entries)
        start = 0
        token = query.get("continuation-token")
        if token is not None:
            assert token.startswith("opaque+/= "), token  # must arrive exactly as sent
            start = int(token.split(" ")[1])
        count = min(max_keys, store.page_size)
        page = ordered[start : start + count]
        truncated = start + count < len(ordered)

        def enc(value: str) -> str:
            if not encode:
                return escape(value)
            if store.key_encoder == "quote_plus":
                return quote_plus(value, safe="/")
            return quote(value, safe="/")

        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{store.bucket}</Name><Prefix>{enc(prefix)}</Prefix>",
            f"<MaxKeys>{max_keys}</MaxKeys><Delimiter>{enc(delimiter)}</Delimiter>",
            f"<KeyCount>{len(page)}</KeyCount>",
        ]
        if encode:
            parts.append("<EncodingType>url</EncodingType>")
        parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if truncated:
            parts.append(
                f"<NextContinuationToken>{escape(f'opaque+/= {start + count}')}"
                "</NextContinuationToken>"
            )
        for name in page:
            if entries[name]:
                parts.append(f"<CommonPrefixes><Prefix>{enc(name)}</Prefix></CommonPrefixes>")
            else:
                data = store.objects[name]
                parts.append(
                    f"<Contents><Key>{enc(name)}</Key>"
                    "<LastModified>2024-01-02T03:04:05.000Z</LastModified>"
                    f"<ETag>&quot;{store.etags[name]}&quot;</ETag>"
                    f"<Size>{len(data)}</Size><StorageClass>Standard</StorageClass></Contents>"
                )
        parts.append("</ListBucketResult>")
        body = "".join(parts).encode("utf-8")
        self._send(200, {"Content-Type": "application/xml"}, body, "GET")


class FakeStoreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: FakeStore) -> None:
        super().__init__(("127.0.0.1", 0), FakeStoreHandler)
        self.store = store

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up on a body it does not want (e.g. a 200 to a
        # ranged GET) resets the connection; that is expected here.
        pass


@pytest.fixture
def store() -> FakeStore:
    fake = FakeStore()
    fake.put("data.bin", _payload(100_000), etag="etag-data")
    fake.put("small.txt", b"hello world", etag="etag-small")
    return fake


@pytest.fixture
def server(store: FakeStore) -> Iterator[FakeStoreServer]:
    with serving(FakeStoreServer(store)) as srv:
        yield srv


def _config(endpoint: str, **kwargs: Any) -> StoreConfig:
    defaults: dict[str, Any] = {
        "protocol": "s3",
        "endpoint": endpoint,
        "bucket": BUCKET,
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "max_attempts": 4,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
    }
    defaults.update(kwargs)
    return StoreConfig(**defaults)


@pytest.fixture
def make_client(server: FakeStoreServer) -> Iterator[Any]:
    clients: list[StoreClient] = []

    def make(**kwargs: Any) -> StoreClient:
        client = StoreClient(_config(server.endpoint, **kwargs))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Any) -> StoreClient:
    return make_client()


def _ranges(store: FakeStore) -> list[str]:
    return [s.headers.get("range", "") for s in store.requests("GET")]


# -- ranged GETs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end"), [(0, 0), (0, 99_999), (12_345, 54_321), (99_999, 99_999)]
)
def test_get_range_returns_exact_bytes(
    client: StoreClient, store: FakeStore, start: int, end: int
) -> None:
    data = store.objects["data.bin"]
    got = client.get_range("data.bin", start, end)
    assert bytes(got) == data[start : end + 1]
    assert _ranges(store) == [f"bytes={start}-{end}"]
    assert client.counters.get == 1
    assert client.counters.bytes_received == end - start + 1


def test_get_range_into_buffer(client: StoreClient, store: FakeStore) -> None:
    buf = bytearray(500)
    out = client.get_range("data.bin", 1000, 1499, into=buf)
    assert out is buf
    assert bytes(buf) == store.objects["data.bin"][1000:1500]


def test_get_range_rejects_empty_range(client: StoreClient) -> None:
    with pytest.raises(ValueError):
        client.get_range("data.bin", 10, 9)


def test_range_ignored_by_store_is_protocol_error(client: StoreClient, store: FakeStore) -> None:
    store.faults = ["ignore-range"]
    with pytest.raises(ProtocolError, match="200"):
        client.get_range("data.bin", 10, 20)
    assert len(store.requests("GET")) == 1  # not retried: retrying cannot fix it


@pytest.mark.parametrize("fault", ["start", "end", "garbage"])
def test_wrong_content_range_is_protocol_error(
    client: StoreClient, store: FakeStore, fault: str
) -> None:
    store.faults = [f"bad-content-range:{fault}"]
    with pytest.raises(ProtocolError, match="Content-Range"):
        client.get_range("data.bin", 10, 20)


def test_cut_short_body_is_retried_and_exact(client: StoreClient, store: FakeStore) -> None:
    data = store.objects["data.bin"]
    store.faults = ["cut:3000", "cut:5000"]
    got = client.get_range("data.bin", 1000, 50_999, if_match="etag-data")
    assert bytes(got) == data[1000:51_000]
    assert len(store.requests("GET")) == 3
    # Every attempt stays pinned to the version.
    assert [s.headers.get("if-match") for s in store.requests("GET")] == ['"etag-data"'] * 3
    assert client.counters.retries == 2
    assert client.counters.get == 3


def test_cut_short_body_is_resumed_from_byte_reached(client: StoreClient, store: FakeStore) -> None:
    data = store.objects["data.bin"]
    store.faults = ["cut:3000", "cut:5000"]
    got = client.get_range("data.bin", 1000, 50_999, if_match="etag-data")
    assert bytes(got) == data[1000:51_000]
    assert _ranges(store) == ["bytes=1000-50999", "bytes=4000-50999", "bytes=9000-50999"]
    assert client.counters.bytes_received == 50_000


def test_cut_short_progress_adds_up(make_client: Any, store: FakeStore) -> None:
    # Each response delivers 30% of the range: resuming finishes in 4 requests.
    client = make_client(max_attempts=4)
    store.faults = ["cut:3000"] * 10
    got = client.get_range("data.bin", 0, 9_999)
    assert bytes(got) == store.objects["data.bin"][:10_000]


def test_cut_short_every_time_gives_up(make_client: Any, store: FakeStore) -> None:
    client = make_client(max_attempts=3)
    store.faults = ["cut:100"] * 10
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cut short"):
        client.get_range("data.bin", 0, 9999)
    assert time.monotonic() - started < 3
    assert len(store.requests("GET")) == 3


def test_other_etag_in_response_is_precondition_failed(
    client: StoreClient, store: FakeStore
) -> None:
    # A store that ignores If-Match but reports the new ETag must not mix versions.
    store.faults = ["other-etag"]
    with pytest.raises(PreconditionFailedError):
        client.get_range("data.bin", 0, 99, if_match="etag-data")


def test_if_match_mismatch_is_precondition_failed(client: StoreClient, store: FakeStore) -> None:
    with pytest.raises(PreconditionFailedError) as info:
        client.get_range("data.bin", 0, 99, if_match="etag-old")
    assert info.value.status == 412
    assert store.requests("GET")[0].headers["if-match"] == '"etag-old"'


def test_range_past_end_is_invalid_range(client: StoreClient) -> None:
    with pytest.raises(InvalidRangeError):
        client.get_range("data.bin", 100_000, 100_010)


# -- retries ---------------------------------------------------------------


def test_503_twice_then_success(client: StoreClient, store: FakeStore) -> None:
    store.faults = ["503", "503"]
    got = client.get_range("small.txt", 0, 4)
    assert bytes(got) == b"hello"
    assert client.counters.retries == 2
    assert len(store.requests("GET")) == 3


def test_500_on_list_is_retried(client: StoreClient, store: FakeStore) -> None:
    store.faults = ["500"]
    pages = list(client.list("", "/"))
    assert sum(len(p.objects) for p in pages) == 2
    assert client.counters.retries == 1


def test_always_503_gives_up_in_bounded_time(make_client: Any, store: FakeStore) -> None:
    client = make_client(max_attempts=3)
    store.faults = ["503"] * 20
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        client.get_range("small.txt", 0, 4)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert len(store.requests("GET")) == 3
    assert info.value.status == 503
    assert client.counters.retries == 2


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_refused() -> None:
    client = StoreClient(_config(f"http://127.0.0.1:{_closed_port()}", max_attempts=2))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            client.get_range("small.txt", 0, 4)
        assert time.monotonic() - started < 3
        assert "connection refused" in str(info.value)
        assert "after 2 attempts" in str(info.value)
        assert client.counters.retries == 1
    finally:
        client.close()


class _Outage:
    """Stands in for the client's HTTP session: counts the requests that reach the
    network, and while `down` fails each as a refused connection."""

    def __init__(self, client: StoreClient) -> None:
        self.real = client._pool.request
        self.down = False
        self.sent = 0
        self.while_sending: Callable[[], None] | None = None  # runs inside the next request
        client._pool.request = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.sent += 1
        hook, self.while_sending = self.while_sending, None
        if hook is not None:
            hook()
        if self.down:
            raise ConnectFailed("[Errno 111] Connection refused")
        return self.real(*args, **kwargs)


class _Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def latched(server: FakeStoreServer) -> Iterator[tuple[StoreClient, _Outage, _Clock]]:
    clock = _Clock()
    client = StoreClient(_config(server.endpoint, max_attempts=3, down_latch=2.0), clock=clock)
    try:
        yield client, _Outage(client), clock
    finally:
        client.close()


def test_unreachable_store_latches_then_probes_once_then_recovers(
    latched: tuple[StoreClient, _Outage, _Clock], caplog: pytest.LogCaptureFixture
) -> None:
    client, outage, clock = latched
    caplog.set_level(logging.INFO, logger="ossfs_resume.client")
    outage.down = True
    with pytest.raises(StoreUnavailableError, match="connection refused"):
        client.head("small.txt")
    assert outage.sent == 3  # the first request goes through its retries
    # Within the window: every kind of request fails at once, without touching the network.
    for call in (
        lambda: client.head("small.txt"),
        lambda: client.get_range("small.txt", 0, 4),
        lambda: list(client.list("", "/")),
    ):
        with pytest.raises(StoreUnavailableError, match=r"down for 0\.0 s; next probe in 2\.0 s"):
            call()
    assert outage.sent == 3
    # Past the window, one probe, with a single attempt; failing, it re-arms the latch.
    clock.now += 2.5
    with pytest.raises(StoreUnavailableError):
        client.head("small.txt")
    assert outage.sent == 4
    clock.now += 1.0
    with pytest.raises(StoreUnavailableError):
        client.head("small.txt")
    assert outage.sent == 4
    # The store is back: the next probe succeeds and requests flow normally again.
    outage.down = False
    clock.now += 1.5
    assert client.head("small.txt").size == 11
    assert bytes(client.get_range("small.txt", 0, 4)) == b"hello"
    assert outage.sent == 6
    down = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    # Never answered before: the caller's error says it all, so the log line is only INFO
    # (a command's stderr shows one line, not a warning and then the same error).
    assert len(down) == 1 and down[0].levelno == logging.INFO
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_after_recovery_a_new_outage_gets_full_retries(
    latched: tuple[StoreClient, _Outage, _Clock], caplog: pytest.LogCaptureFixture
) -> None:
    client, outage, clock = latched
    caplog.set_level(logging.INFO, logger="ossfs_resume.client")
    outage.down = True
    with pytest.raises(StoreUnavailableError):
        client.head("small.txt")
    outage.down = False
    clock.now += 3
    client.head("small.txt")
    outage.down = True
    sent = outage.sent
    with pytest.raises(StoreUnavailableError):
        client.head("small.txt")
    assert outage.sent - sent == 3  # not a single-attempt probe: the store was up
    # An outage of a store that had answered is news: a warning in the mount's log.
    down = [r.levelno for r in caplog.records if "is unreachable" in r.getMessage()]
    assert down == [logging.INFO, logging.WARNING]


def test_one_probe_at_a_time(latched: tuple[StoreClient, _Outage, _Clock]) -> None:
    client, outage, clock = latched
    outage.down = True
    with pytest.raises(StoreUnavailableError):
        client.head("small.txt")
    clock.now += 2.5
    during_probe: list[Exception] = []

    def another_request() -> None:
        sent = outage.sent
        try:
            client.head("small.txt")
        except StoreUnavailableError as exc:
            during_probe.append(exc)
        assert outage.sent == sent  # it failed without going to the network

    # The store hangs on the probe: a request meanwhile fails at once instead of also waiting.
    outage.while_sending = another_request
    with pytest.raises(StoreUnavailableError):
        client.head("small.txt")
    assert len(during_probe) == 1 and "next probe in 2.0 s" in str(during_probe[0])
    assert outage.sent == 4


def test_store_answering_errors_is_not_down(
    latched: tuple[StoreClient, _Outage, _Clock], store: FakeStore
) -> None:
    client, outage, _clock = latched
    store.faults = ["503"] * 3
    with pytest.raises(StoreUnavailableError):
        client.get_range("small.txt", 0, 4)
    with pytest.raises(NotFoundError):
        client.head("missing")
    # It answered: no latch, the next request goes to the network.
    assert bytes(client.get_range("small.txt", 0, 4)) == b"hello"
    assert outage.sent == 5


def test_latch_zero_disables_it(server: FakeStoreServer) -> None:
    client = StoreClient(_config(server.endpoint, max_attempts=2, down_latch=0))
    try:
        outage = _Outage(client)
        outage.down = True
        for _ in range(2):
            with pytest.raises(StoreUnavailableError, match="after 2 attempts"):
                client.head("small.txt")
        assert outage.sent == 4
    finally:
        client.close()


# -- error mapping -----------------------------------------------------------


def test_no_such_key(client: StoreClient) -> None:
    with pytest.raises(NotFoundError) as info:
        client.get_range("missing.bin", 0, 9)
    assert info.value.code == "NoSuchKey"
    assert info.value.status == 404
    assert info.value.errno == 2  # ENOENT


def test_head_missing_object(client: StoreClient) -> None:
    with pytest.raises(NotFoundError):
        client.head("missing.bin")


def test_no_such_bucket(make_client: Any) -> None:
    client = make_client(bucket="nope")
    with pytest.raises(NoSuchBucketError, match="'nope'"):
        list(client.list(""))
    with pytest.raises(NoSuchBucketError):
        client.get_range("data.bin", 0, 9)
    with pytest.raises(NoSuchBucketError):
        client.check_access()


def test_signature_does_not_match(make_client: Any, store: FakeStore) -> None:
    client = make_client(credentials=Credentials("AKIDEXAMPLE", SECRET))
    store.faults = ["403-sig"]
    with pytest.raises(AccessDeniedError) as info:
        client.get_range("data.bin", 0, 9)
    assert info.value.code == "SignatureDoesNotMatch"
    assert "check the access key id and secret" in str(info.value)
    assert len(store.requests()) == 1  # 403 is not retried


def test_anonymous_access_denied_hint(client: StoreClient, store: FakeStore) -> None:
    store.faults = ["403"]
    with pytest.raises(AccessDeniedError, match="anonymous"):
        list(client.list(""))


def test_error_messages_never_contain_secret(
    make_client: Any, store: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(
        credentials=Credentials("AKIDEXAMPLE", SECRET, "token-xyz"), max_attempts=2
    )
    errors: list[StoreError] = []
    store.faults = ["403-sig"]
    for call in (
        lambda: client.get_range("data.bin", 0, 9),  # 403
        lambda: client.get_range("missing", 0, 9),  # 404
        lambda: client.get_range("data.bin", 0, 9, if_match="x"),  # 412
        lambda: client.head("missing"),
    ):
        with pytest.raises(StoreError) as info:
            call()
        errors.append(info.value)
    store.faults = ["503"] * 5
    with pytest.raises(StoreUnavailableError) as info503:
        client.get_range("data.bin", 0, 9)
    errors.append(info503.value)
    for exc in errors:
        assert SECRET not in str(exc)
        assert SECRET not in repr(exc.args)
    assert SECRET not in caplog.text
    assert SECRET not in repr(client.config)
    # The secret never goes over the wire either.
    for seen in store.requests():
        assert all(SECRET not in value for value in seen.headers.values())


# -- listing -----------------------------------------------------------------

ODD_KEYS = [
    "dir/a b.txt",
    "dir/c+d.txt",
    "dir/ünïcødé.txt",
    "dir/100%.txt",
    "dir/x&y<z>.txt",
    "dir/plain.txt",
    "dir/sub/one",
    "dir/sub/two",
    "dir/sp ace+/inner",
]


@pytest.mark.parametrize("encoder", ["quote", "quote_plus"])
def test_list_follows_tokens_and_decodes_keys(
    client: StoreClient, store: FakeStore, encoder: str
) -> None:
    store.key_encoder = encoder
    for i, key in enumerate(ODD_KEYS):
        store.put(key, b"x" * (i + 1))
    pages = list(client.list("dir/", "/"))
    objects = [o for p in pages for o in p.objects]
    prefixes = [p for page in pages for p in page.prefixes]
    expected_files = sorted(k for k in ODD_KEYS if "/" not in k[len("dir/") :])
    assert sorted(o.key for o in objects) == expected_files
    assert sorted(prefixes) == ["dir/sp ace+/", "dir/sub/"]
    sizes = {o.key: o.size for o in objects}
    assert sizes["dir/a b.txt"] == ODD_KEYS.index("dir/a b.txt") + 1
    for obj in objects:
        assert obj.etag == store.etags[obj.key]  # quotes stripped
        assert obj.last_modified == MTIME
    # 8 entries, 2 per page.
    lists = store.requests("GET")
    assert len(pages) == len(lists) == 4
    assert client.counters.list == 4
    assert all(s.query["list-type"] == "2" for s in lists)
    assert all(s.query["encoding-type"] == "url" for s in lists)
    assert all(s.query["prefix"] == "dir/" and s.query["delimiter"] == "/" for s in lists)
    assert "continuation-token" not in lists[0].query
    assert [s.query["continuation-token"] for s in lists[1:]] == [
        "opaque+/= 2",
        "opaque+/= 4",
        "opaque+/= 6",
    ]
    assert pages[-1].next_token is None
    assert all(p.next_token for p in pages[:-1])


def test_list_prefix_with_odd_characters(client: StoreClient, store: FakeStore) -> None:
    for key in ODD_KEYS:
        store.put(key, b"1")
    pages = list(client.list("dir/sp ace+/", "/"))
    assert [o.key for p in pages for o in p.objects] == ["dir/sp ace+/inner"]
    assert store.requests("GET")[0].query["prefix"] == "dir/sp ace+/"


def test_list_without_delimiter_is_flat(client: StoreClient, store: FakeStore) -> None:
    store.page_size = 1000
    for key in ODD_KEYS:
        store.put(key, b"1")
    pages = list(client.list("dir/", ""))
    assert sorted(o.key for p in pages for o in p.objects) == sorted(ODD_KEYS)
    assert pages[0].prefixes == []


# -- HEAD --------------------------------------------------------------------


def test_head_parses_metadata(client: StoreClient, store: FakeStore) -> None:
    store.put("quoted.bin", b"abc" * 1000, etag="ABCDEF0123")
    meta = client.head("quoted.bin")
    assert meta == ObjectMeta(
        key="quoted.bin",
        size=3000,
        etag="ABCDEF0123",
        last_modified=MTIME,
        crc64=crc64(b"abc" * 1000),
    )
    assert client.counters.head == 1
    assert store.requests("HEAD")[0].key == "quoted.bin"


def test_head_key_with_odd_characters(client: StoreClient, store: FakeStore) -> None:
    key = "dir/ünï cødé+?#%.bin"
    store.put(key, b"zz")
    meta = client.head(key)
    assert meta.size == 2
    assert store.requests("HEAD")[0].key == key  # the path was encoded, not mangled


# -- keys with dot segments --------------------------------------------------

# key -> the path the store must receive after /bucket/: dot segments escaped, so
# no HTTP layer resolves them and the request names exactly the key given.
DOT_KEYS = {
    "a/../../x": "a/%2E%2E/%2E%2E/x",
    "./k": "%2E/k",
    "a/./b": "a/%2E/b",
    "..": "%2E%2E",
    "a/.../b.c": "a/.../b.c",  # not dot segments: sent as they are
}
DIALECTS = {
    "s3": {"protocol": "s3"},
    "oss-v4": {"protocol": "oss", "signature_version": "v4"},
    "oss-v1": {"protocol": "oss", "signature_version": "v1"},
}


def _sdk_authorization(seen: Seen, dialect: str, endpoint: str) -> str:
    """The Authorization header an official SDK computes for `seen` as the store received it."""
    creds = ("AKIDEXAMPLE", SECRET)
    if dialect == "s3":
        botocore_auth = pytest.importorskip("botocore.auth")
        awsrequest = pytest.importorskip("botocore.awsrequest")
        boto_creds = pytest.importorskip("botocore.credentials")
        boto_config = pytest.importorskip("botocore.config")
        when = datetime.strptime(seen.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
        signed = {k: v for k, v in seen.headers.items() if k in ("range", "if-match")}
        # botocore signs the path of the URL it is given as is (S3 does not normalise).
        req = awsrequest.AWSRequest(method=seen.method, url=endpoint + seen.target, headers=signed)
        req.context["client_config"] = boto_config.Config(s3={"payload_signing_enabled": False})
        auth = botocore_auth.S3SigV4Auth(boto_creds.Credentials(*creds), "s3", "us-east-1")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(botocore_auth, "get_current_datetime", lambda *a, **k: when)
            auth.add_auth(req)
        return req.headers["Authorization"]
    signer_mod = pytest.importorskip("alibabacloud_oss_v2.signer")
    types = pytest.importorskip("alibabacloud_oss_v2.types")
    if dialect == "oss-v4":
        when = datetime.strptime(seen.headers["x-oss-date"], "%Y%m%dT%H%M%SZ")
    else:
        when = email.utils.parsedate_to_datetime(seen.headers["date"])
    request = types.HttpRequest(seen.method, endpoint + seen.target)
    request.headers.update({k: v for k, v in seen.headers.items() if k.startswith("x-oss-")})
    for name in ("x-oss-date", "date", "authorization", "x-oss-content-sha256"):
        request.headers.pop(name, None)
    ctx = types.SigningContext(
        product="oss",
        region="cn-hangzhou",
        bucket=seen.bucket,
        key=seen.key,  # the key the store decoded from the path it received
        request=request,
        credentials=types.Credentials(*creds),
        signing_time=when.replace(tzinfo=timezone.utc),
    )
    (signer_mod.SignerV4 if dialect == "oss-v4" else signer_mod.SignerV1)().sign(ctx)
    return {k.lower(): v for k, v in request.headers.items()}["authorization"]


@pytest.mark.parametrize("dialect", list(DIALECTS))
@pytest.mark.parametrize(("key", "path"), list(DOT_KEYS.items()))
def test_dot_segments_name_exactly_the_key(
    make_client: Any,
    server: FakeStoreServer,
    store: FakeStore,
    key: str,
    path: str,
    dialect: str,
) -> None:
    store.put(key, b"the object named by the key as typed")
    store.put("x", b"another object")  # what a normalised a/../../x would name
    client = make_client(credentials=Credentials("AKIDEXAMPLE", SECRET), **DIALECTS[dialect])
    assert client.head(key).size == 36
    assert bytes(client.get_range(key, 4, 9)) == b"object"
    seen = store.requests()
    assert [(s.method, s.target) for s in seen] == [
        ("HEAD", f"/{BUCKET}/{path}"),
        ("GET", f"/{BUCKET}/{path}"),
    ]
    for s in seen:
        assert (s.bucket, s.key) == (BUCKET, key)
        # Signed over the path as sent: the SDK, given the request as received, agrees.
        assert s.headers["authorization"] == _sdk_authorization(s, dialect, server.endpoint)


def test_dot_segment_key_missing_is_not_found_for_that_key(
    client: StoreClient, store: FakeStore
) -> None:
    store.put("x", b"another object")
    with pytest.raises(NotFoundError, match=r"s3://bkt/a/\.\./\.\./x: no such object"):
        client.head("a/../../x")
    assert [s.target for s in store.requests()] == [f"/{BUCKET}/a/%2E%2E/%2E%2E/x"]


@pytest.mark.parametrize("addressing", ["path", "virtual"])
def test_query_is_sent_as_signed(make_client: Any, store: FakeStore, addressing: str) -> None:
    # The URL is no longer re-quoted by requests: the query must still arrive intact.
    client = make_client(credentials=Credentials("AKIDEXAMPLE", SECRET))
    store.put("d/./e ~f", b"z")
    pages = list(client.list("d/./e ~"))
    assert [o.key for p in pages for o in p.objects] == ["d/./e ~f"]
    assert store.requests()[0].target == (
        f"/{BUCKET}/?delimiter=%2F&encoding-type=url&list-type=2&max-keys=1000&prefix=d%2F.%2Fe%20~"
    )


# -- dialects and signing ------------------------------------------------------


def test_oss_sends_standard_range_behavior(make_client: Any, store: FakeStore) -> None:
    client = make_client(protocol="oss")
    client.get_range("small.txt", 0, 1)
    assert store.requests("GET")[0].headers.get("x-oss-range-behavior") == "standard"


def test_s3_does_not_send_oss_headers(client: StoreClient, store: FakeStore) -> None:
    client.get_range("small.txt", 0, 1)
    assert "x-oss-range-behavior" not in store.requests("GET")[0].headers


@pytest.mark.parametrize(
    ("protocol", "signature_version", "scheme"),
    [
        ("s3", "v4", "AWS4-HMAC-SHA256 "),
        ("oss", "v4", "OSS4-HMAC-SHA256 "),
        ("oss", "v1", "OSS AKIDEXAMPLE:"),
    ],
)
def test_signed_requests_carry_authorization(
    make_client: Any, store: FakeStore, protocol: str, signature_version: str, scheme: str
) -> None:
    client = make_client(
        protocol=protocol,
        signature_version=signature_version,
        credentials=Credentials("AKIDEXAMPLE", SECRET),
    )
    client.get_range("small.txt", 0, 1)
    client.head("small.txt")
    list(client.list(""))
    for seen in store.requests():
        assert seen.headers["authorization"].startswith(scheme)
        assert "AKIDEXAMPLE" in seen.headers["authorization"]


@pytest.mark.parametrize("protocol", ["s3", "oss"])
def test_anonymous_sends_no_authorization(
    make_client: Any, store: FakeStore, protocol: str
) -> None:
    client = make_client(protocol=protocol)
    client.get_range("small.txt", 0, 1)
    client.head("small.txt")
    list(client.list(""))
    assert len(store.requests()) == 3
    for seen in store.requests():
        assert "authorization" not in seen.headers
        assert not any(name.startswith("x-amz-security-token") for name in seen.headers)


def test_s3_session_token_is_sent(make_client: Any, store: FakeStore) -> None:
    client = make_client(credentials=Credentials("AKIDEXAMPLE", SECRET, "tok-123"))
    client.head("small.txt")
    assert store.requests()[0].headers["x-amz-security-token"] == "tok-123"


@pytest.mark.parametrize(
    ("endpoint", "needle"),
    [
        ("127.0.0.1:9000", "expected http(s)://host[:port]"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://127.0.0.1:0", "port must be 1..65535"),
        ("http://127.0.0.1:x", "Port could not be cast"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("ftp://host", "expected http(s)"),
        ("http://host/some/path", "no path or query"),
        ("http://host?x=1", "no path or query"),
    ],
)
def test_store_config_rejects_bad_endpoint(endpoint: str, needle: str) -> None:
    with pytest.raises(UsageError, match="bad endpoint") as info:
        StoreConfig(protocol="s3", endpoint=endpoint, bucket=BUCKET)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_endpoint_with_a_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(UsageError) as info:
        check_endpoint("http://user:hunter2@127.0.0.1:9000")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "endpoint", ["http://h", "https://h:443", "http://[::1]:9000", "http://h/"]
)
def test_good_endpoints(endpoint: str) -> None:
    check_endpoint(endpoint)


def test_ca_bundle_from_env_order() -> None:
    assert CA_BUNDLE_ENV == ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
    env = {"SSL_CERT_FILE": "/s", "REQUESTS_CA_BUNDLE": "/r", "AWS_CA_BUNDLE": "/a"}
    assert ca_bundle_from_env(env) == ("/a", "AWS_CA_BUNDLE")
    del env["AWS_CA_BUNDLE"]
    assert ca_bundle_from_env(env) == ("/r", "REQUESTS_CA_BUNDLE")
    env["REQUESTS_CA_BUNDLE"] = ""  # set but empty: as if unset
    assert ca_bundle_from_env(env) == ("/s", "SSL_CERT_FILE")
    assert ca_bundle_from_env({}) is None


# -- TLS ---------------------------------------------------------------------------


class TLSFakeStoreServer(FakeStoreServer):
    """The fake store over TLS; counts connections, handshakes that fail included."""

    def __init__(self, store: FakeStore, cert: Path, key: Path) -> None:
        super().__init__(store)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.connections = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        self.connections += 1
        sock.settimeout(5)
        # The handshake happens here; a client refusing the certificate makes it raise,
        # and the server drops that connection.
        return self.context.wrap_socket(sock, server_side=True), addr

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def tls_server(store: FakeStore, tls_cert: tuple[Path, Path]) -> Iterator[TLSFakeStoreServer]:
    with serving(TLSFakeStoreServer(store, *tls_cert)) as srv:
        yield srv


def test_untrusted_certificate_fails_at_once_saying_why(tls_server: TLSFakeStoreServer) -> None:
    client = StoreClient(_config(tls_server.endpoint, down_latch=0))
    try:
        with pytest.raises(TLSError) as info:
            client.head("small.txt")
        message = str(info.value)
        assert message.startswith(f"cannot connect to {tls_server.endpoint} securely: ")
        assert "certificate verify failed: self" in message  # self-signed / self signed
        assert message.endswith("; see --ca-bundle")
        assert tls_server.connections == 1  # not retried: retrying cannot fix a certificate
        assert client.counters.retries == 0
    finally:
        client.close()


def test_ca_bundle_trusts_the_certificate(
    tls_server: TLSFakeStoreServer, tls_cert: tuple[Path, Path]
) -> None:
    client = StoreClient(_config(tls_server.endpoint, ca_bundle=str(tls_cert[0])))
    try:
        assert client.head("small.txt").size == 11
        assert bytes(client.get_range("small.txt", 0, 4)) == b"hello"
    finally:
        client.close()


def test_https_to_a_plain_http_server_says_so(server: FakeStoreServer) -> None:
    endpoint = server.endpoint.replace("http://", "https://")
    client = StoreClient(_config(endpoint))
    try:
        with pytest.raises(TLSError, match="does not speak TLS"):
            client.head("small.txt")
        assert client.counters.retries == 0
    finally:
        client.close()


# -- credentials_from_env ------------------------------------------------------


def test_credentials_from_env_oss() -> None:
    env = {
        "OSS_ACCESS_KEY_ID": "ak",
        "OSS_ACCESS_KEY_SECRET": "sk",
        "OSS_SESSION_TOKEN": "tok",
        "AWS_ACCESS_KEY_ID": "aws-ak",
        "AWS_SECRET_ACCESS_KEY": "aws-sk",
    }
    assert credentials_from_env("oss", env) == Credentials("ak", "sk", "tok")
    assert credentials_from_env("s3", env) == Credentials("aws-ak", "aws-sk", None)


def test_credentials_from_env_s3_token() -> None:
    env = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}
    assert credentials_from_env("s3", env) == Credentials("a", "s", "t")
    # OSS ignores AWS_* variables: anonymous.
    assert credentials_from_env("oss", env) is None


def test_credentials_from_env_unset_is_anonymous() -> None:
    assert credentials_from_env("oss", {}) is None
    assert credentials_from_env("s3", {"AWS_ACCESS_KEY_ID": ""}) is None


def test_credentials_from_env_uses_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-sk")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    assert credentials_from_env("s3") == Credentials("env-ak", "env-sk", None)


@pytest.mark.parametrize(
    ("protocol", "env"),
    [
        ("oss", {"OSS_ACCESS_KEY_ID": "ak"}),
        ("oss", {"OSS_ACCESS_KEY_SECRET": SECRET}),
        ("s3", {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": ""}),
        ("s3", {"AWS_SECRET_ACCESS_KEY": SECRET}),
    ],
)
def test_credentials_from_env_rejects_half_pair(protocol: str, env: dict[str, str]) -> None:
    with pytest.raises(UsageError) as info:
        credentials_from_env(protocol, env)  # type: ignore[arg-type]
    assert SECRET not in str(info.value)
    names = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET")
    if protocol == "s3":
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert all(name in str(info.value) for name in names)


def test_credentials_repr_hides_secret() -> None:
    creds = Credentials("AKIDEXAMPLE", SECRET, "session-token-secret")
    assert SECRET not in repr(creds)
    assert "session-token-secret" not in repr(creds)


# -- parse_iso8601 -------------------------------------------------------------


def _ts(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-02T03:04:05Z", _ts(2024, 1, 2, 3, 4, 5)),
        ("2024-01-02T03:04:05.000Z", _ts(2024, 1, 2, 3, 4, 5)),
        ("2024-01-02T03:04:05.5Z", _ts(2024, 1, 2, 3, 4, 5) + 0.5),
        ("2024-01-02T03:04:05.123Z", _ts(2024, 1, 2, 3, 4, 5, 123_000)),
        ("2024-01-02T03:04:05.123456789Z", _ts(2024, 1, 2, 3, 4, 5, 123_456)),
        ("2024-01-02T03:04:05", _ts(2024, 1, 2, 3, 4, 5)),  # naive: taken as UTC
        ("2024-01-02T11:04:05+08:00", _ts(2024, 1, 2, 3, 4, 5)),
        ("2024-01-02T11:04:05.250+08:00", _ts(2024, 1, 2, 3, 4, 5) + 0.25),
        (" 2024-01-02T03:04:05Z ", _ts(2024, 1, 2, 3, 4, 5)),
        ("", 0.0),
        (None, 0.0),
        ("not a date", 0.0),
    ],
)
def test_parse_iso8601(text: str | None, expected: float) -> None:
    assert parse_iso8601(text) == pytest.approx(expected, abs=1e-6)
