#!/usr/bin/env python3
"""A small asyncio TCP proxy for HTTP/1.1 traffic to a local object store.

It sits between a client and a local S3/OSS-compatible server (both on 127.0.0.1) and can

* count the HTTP requests a client makes (method, target and Range header, in order);
* inject faults: answer every Nth request with a well-formed S3 ``503 SlowDown`` itself, or
  forward every Nth request, relay part of its response and then reset the client connection;
* speak TLS to its clients (``tls=(cert, key)``), e.g. with a self-signed certificate, while
  relaying plain HTTP to the store; connections are counted before the handshake, so a
  client that retries a refused handshake shows up in :meth:`NetProxy.connections`;
* emulate a remote store: delay data by half the configured round-trip latency in each
  direction and cap each connection's bandwidth (token bucket, each direction separately),
  since there is no netem here.

Request framing is parsed on the client -> server stream (keep-alive, ``Content-Length`` and
``Transfer-Encoding: chunked`` bodies, ``Expect: 100-continue`` is simply relayed), and
response framing on the server -> client stream (so that a connection reset can be placed
inside the body of a chosen response). A stream that cannot be parsed as HTTP/1.1 falls back
to a plain byte relay.

Library use::

    with NetProxy(ProxyConfig(upstream_port=8333, latency_ms=20)) as proxy:
        client = make_client(endpoint=proxy.endpoint)
        ...
        assert proxy.counts()["GET"] == 0

Command line::

    python scripts/netproxy.py --upstream 127.0.0.1:8333 --listen 0 --latency-ms 20 --rate-mbps 64

prints the listen endpoint (``http://127.0.0.1:PORT``) and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import re
import signal
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

__all__ = ["NetProxy", "ProxyConfig", "main"]

LISTEN_HOST = "127.0.0.1"
CHUNK = 256 * 1024  # read size, and the asyncio StreamReader limit (bigger: less CPU per byte)
HEAD_LIMIT = 64 * 1024  # larger request/response heads (or chunk lines) -> plain relay
CRLF = b"\r\n"
CRLFCRLF = b"\r\n\r\n"


@dataclass
class ProxyConfig:
    """Settings of a :class:`NetProxy`. Only loopback upstreams are accepted."""

    upstream_host: str = "127.0.0.1"
    upstream_port: int = 8333
    listen_port: int = 0  # 0 = pick a free port
    latency_ms: float = 0.0  # added round trip: each direction's data is delayed by half of it
    rate_bytes_per_s: float | None = None  # per-connection cap, each direction (token bucket)
    fail_503_every: int = 0  # every Nth request is answered by the proxy with an S3 503
    reset_every: int = 0  # every Nth request's response is cut short by a TCP reset
    max_buffer: int = 2 << 20  # bytes held per direction per connection, at most (about)
    tls: tuple[str, str] | None = None  # (certificate, key) PEM files: clients speak TLS

    def __post_init__(self) -> None:
        if not _is_loopback(self.upstream_host):
            raise ValueError(
                f"upstream_host must be a loopback address, not {self.upstream_host!r}"
            )
        if not 0 <= self.upstream_port < 65536 or not 0 <= self.listen_port < 65536:
            raise ValueError("ports must be in 0..65535")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.rate_bytes_per_s is not None and self.rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be > 0 (or None for no cap)")
        if self.fail_503_every < 0 or self.reset_every < 0:
            raise ValueError("fault intervals must be >= 0")
        if self.max_buffer < 5 * CHUNK:
            raise ValueError(f"max_buffer must be >= {5 * CHUNK}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- stream helpers


class _BadMessage(Exception):
    """The byte stream is not (or no longer) parseable as HTTP/1.1."""


class _Reader:
    """A StreamReader with a small look-ahead buffer of its own (cancel-safe waits)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._r = reader
        self.buf = bytearray()
        self.eof = False

    async def _more(self) -> bool:
        if self.eof:
            return False
        data = await self._r.read(CHUNK)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def wait_data(self) -> bool:
        """Wait until data is available: False at EOF. Safe to cancel."""
        return bool(self.buf) or await self._more()

    async def readuntil(self, sep: bytes, limit: int = HEAD_LIMIT) -> bytes | None:
        """Bytes up to and including ``sep``; None at EOF (what was read stays in ``buf``)."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                end = i + len(sep)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise _BadMessage("head or chunk line too long")
            start = max(0, len(self.buf) - len(sep) + 1)
            if not await self._more():
                return None

    async def read_some(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes (at least one); b"" at EOF."""
        if not self.buf and not self.eof:
            # Straight from the stream: no copy through ``buf`` (the proxy's hot path).
            data = await self._r.read(n)
            if not data:
                self.eof = True
            return data
        if not self.buf:
            return b""
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def take_all(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


_EOF = "eof"  # half-close (write_eof) after the queued data
_CLOSE = "close"  # close after the queued data
_ABORT = "abort"  # flush the queued data, then reset (RST)


class _Pipe:
    """One direction of a connection: a bounded queue of data, written out by :meth:`run`
    after ``delay`` seconds (per chunk, measured from when it was read) at no more than
    ``rate`` bytes/s."""

    def __init__(
        self, writer: asyncio.StreamWriter, delay: float, rate: float | None, capacity: int
    ) -> None:
        self._w = writer
        self._delay = delay
        self._rate = rate
        self._cap = capacity
        self._loop = asyncio.get_running_loop()
        self._q: collections.deque[tuple[float, bytes | str]] = collections.deque()
        self._queued = 0
        self._finished = False
        self._broken = False
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        if rate:
            self._piece = min(CHUNK, max(4096, int(rate * 0.005)))
            self._burst = max(float(self._piece), rate * 0.01)
            self._tokens = self._burst
            self._t = self._loop.time()

    async def send(self, data: bytes) -> None:
        if not data:
            return
        while True:
            if self._finished or self._broken:
                raise ConnectionError("connection closed")
            if not self._queued or self._queued + len(data) <= self._cap:
                break
            self._space.clear()
            await self._space.wait()
        self._q.append((self._loop.time() + self._delay, data))
        self._queued += len(data)
        self._wake.set()

    def _finish(self, kind: str) -> None:
        if self._finished:
            return
        self._finished = True
        self._q.append((self._loop.time() + self._delay, kind))
        self._wake.set()

    def eof(self) -> None:
        self._finish(_EOF)

    def close(self) -> None:
        self._finish(_CLOSE)

    def abort(self) -> None:
        self._finish(_ABORT)

    async def run(self) -> None:
        transport = self._w.transport
        try:
            while True:
                while not self._q:
                    self._wake.clear()
                    await self._wake.wait()
                due, item = self._q.popleft()
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if isinstance(item, bytes):
                    await self._write(item)
                    self._queued -= len(item)
                    self._space.set()
                elif item == _EOF:
                    if transport.can_write_eof() and not transport.is_closing():
                        self._w.write_eof()
                    return
                elif item == _CLOSE:
                    transport.close()  # flushes what is buffered, then closes
                    return
                else:
                    await self._flush()
                    _reset(transport)
                    return
        except (OSError, RuntimeError):
            self._broken = True
            self._space.set()
            transport.abort()

    async def _write(self, data: bytes) -> None:
        if not self._rate:
            self._w.write(data)
            await self._w.drain()
            return
        for off in range(0, len(data), self._piece):
            piece = data[off : off + self._piece]
            now = self._loop.time()
            self._tokens = min(self._burst, self._tokens + (now - self._t) * self._rate)
            self._t = now
            self._tokens -= len(piece)
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self._rate)
            self._w.write(piece)
            await self._w.drain()

    async def _flush(self, timeout: float = 10.0) -> None:
        transport = self._w.transport
        deadline = self._loop.time() + timeout
        while (
            not transport.is_closing()
            and transport.get_write_buffer_size()
            and self._loop.time() < deadline
        ):
            await asyncio.sleep(0.001)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


_KEY_ID = re.compile(r"Credential=([^/,\s]+)|^OSS ([^:\s]+):")


def _parse_head(head: bytes) -> tuple[list[str], dict[str, str]]:
    """Start line fields and headers (lower-cased names; repeated names: last wins, except
    Transfer-Encoding, which is joined)."""
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2 or not start[0]:
        raise _BadMessage(f"bad start line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadMessage(f"bad header line {line!r}")
        key = name.strip().lower()
        value = value.strip()
        if key == "transfer-encoding" and key in headers:
            value = headers[key] + ", " + value
        headers[key] = value
    return start, headers


def _body_framing(headers: dict[str, str]) -> int | str | None:
    """The body framing: "chunked", a Content-Length, or None (no framing header)."""
    te = headers.get("transfer-encoding")
    if te is not None:
        if te.lower().rsplit(",", 1)[-1].strip() == "chunked":
            return "chunked"
        raise _BadMessage(f"unsupported Transfer-Encoding {te!r}")
    cl = headers.get("content-length")
    if cl is None:
        return None
    try:
        n = int(cl.split(",")[0])
    except ValueError:
        raise _BadMessage(f"bad Content-Length {cl!r}") from None
    if n < 0:
        raise _BadMessage(f"bad Content-Length {cl!r}")
    return n


async def _relay_exact(src: _Reader, pipe: _Pipe | None, n: int) -> bool:
    """Relay (or with ``pipe`` None, discard) ``n`` bytes; False on a premature EOF."""
    while n > 0:
        data = await src.read_some(min(n, CHUNK))
        if not data:
            return False
        if pipe is not None:
            await pipe.send(data)
        n -= len(data)
    return True


async def _relay_chunked(src: _Reader, pipe: _Pipe | None) -> bool:
    """Relay (or discard) a chunked body including its trailers; False on premature EOF."""
    while True:
        line = await src.readuntil(CRLF)
        if line is None:
            return False
        if pipe is not None:
            await pipe.send(line)
        size = _chunk_size(line)
        if size == 0:
            while True:
                trailer = await src.readuntil(CRLF)
                if trailer is None:
                    return False
                if pipe is not None:
                    await pipe.send(trailer)
                if trailer == CRLF:
                    return True
        if not await _relay_exact(src, pipe, size + 2):
            return False


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise _BadMessage(f"bad chunk size line {line[:80]!r}") from None


async def _relay_raw(src: _Reader, pipe: _Pipe) -> None:
    await pipe.send(src.take_all())
    while data := await src.read_some():
        await pipe.send(data)


@dataclass
class _Pending:
    method: str
    target: str
    action: str | None  # None, "503" or "reset"


def _error_503(pending: _Pending, n: int) -> bytes:
    resource = pending.target.split("?", 1)[0]
    resource = resource.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    request_id = f"NETPROXY{n:08d}"
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error><Code>SlowDown</Code>"
        "<Message>Please reduce your request rate. (injected by netproxy)</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Server: netproxy\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        f"x-oss-request-id: {request_id}\r\n"
        "Retry-After: 0\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode()
    return head if pending.method == "HEAD" else head + body


# --------------------------------------------------------------------------- the proxy


class NetProxy:
    """The proxy: an asyncio loop in a background thread. Thread-safe accessors."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._requests: list[tuple[str, str, str | None]] = []
        self._key_ids: collections.Counter[str] = collections.Counter()
        self._connections = 0
        self._fail_503_every = config.fail_503_every
        self._reset_every = config.reset_every
        self._seq = 0  # requests since start or the last set_faults(): decides the faults
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False
        # What the delay/rate queue may hold: the rest of max_buffer is left to the stream
        # reader's buffer (paused above 2 * CHUNK), _Reader.buf and the transport's write buffer.
        self._pipe_capacity = config.max_buffer - 4 * CHUNK
        self._ssl: ssl.SSLContext | None = None
        if config.tls is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(*config.tls)

    # ---- public API (any thread)

    def start(self) -> int:
        """Start listening (on 127.0.0.1) in a background thread; returns the port."""
        if self._stopped:
            raise RuntimeError("NetProxy cannot be restarted")
        if self._port is not None:
            return self._port
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,), name="netproxy")
        thread.daemon = True
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._port = asyncio.run_coroutine_threadsafe(self._serve(), loop).result(10)
        except BaseException:
            self.stop()
            raise
        return self._port

    def stop(self) -> None:
        """Close the listener and all connections, join the thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("NetProxy is not started")
        return self._port

    @property
    def endpoint(self) -> str:
        return f"{'https' if self._ssl else 'http'}://{LISTEN_HOST}:{self.port}"

    def counts(self) -> dict[str, int]:
        """Requests seen, by method. A Counter: a method never seen counts 0."""
        with self._lock:
            return collections.Counter(self._counts)

    def requests(self) -> list[tuple[str, str, str | None]]:
        """(method, path+query, Range header or None) of each request, in order."""
        with self._lock:
            return list(self._requests)

    def key_ids(self) -> dict[str, int]:
        """Requests by the access key id that signed them (SigV4 ``Credential=`` or OSS
        ``OSS AK:``; "" when unsigned). Key ids only: a signature or secret is never kept."""
        with self._lock:
            return collections.Counter(self._key_ids)

    def connections(self) -> int:
        """Client connections accepted since start or the last reset_counts()."""
        with self._lock:
            return self._connections

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._requests.clear()
            self._key_ids.clear()
            self._connections = 0

    def set_faults(self, *, fail_503_every: int = 0, reset_every: int = 0) -> None:
        """Change the fault injection; the count towards "every Nth" restarts at 0."""
        if fail_503_every < 0 or reset_every < 0:
            raise ValueError("fault intervals must be >= 0")
        with self._lock:
            self._fail_503_every = fail_503_every
            self._reset_every = reset_every
            self._seq = 0

    def __enter__(self) -> NetProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- loop thread

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    async def _serve(self) -> int:
        self._server = await asyncio.start_server(
            self._on_connect, LISTEN_HOST, self.config.listen_port, limit=CHUNK
        )
        return self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _record_key_id(self, authorization: str) -> None:
        match = _KEY_ID.search(authorization)
        with self._lock:
            self._key_ids[(match.group(1) or match.group(2)) if match else ""] += 1

    def _record(self, method: str, target: str, rng: str | None) -> str | None:
        with self._lock:
            self._counts[method] += 1
            self._requests.append((method, target, rng))
            self._seq += 1
            n = self._seq
            if self._fail_503_every and n % self._fail_503_every == 0:
                return "503"
            if self._reset_every and n % self._reset_every == 0:
                return "reset"
            return None

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_connect(
        self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with self._lock:
            self._connections += 1
        # Cancelled at stop(): end quietly (asyncio logs a cancelled client_connected_cb).
        with contextlib.suppress(asyncio.CancelledError):
            if self._ssl is not None:
                try:
                    # After counting: a refused handshake is a connection the client made.
                    await cwriter.start_tls(self._ssl, ssl_handshake_timeout=10)
                except (OSError, asyncio.TimeoutError):  # ssl.SSLError is an OSError
                    cwriter.transport.abort()
                    return
            await self._handle(creader, cwriter)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        uwriter: asyncio.StreamWriter | None = None
        subtasks: list[asyncio.Task[Any]] = []
        try:
            try:
                ureader, uwriter = await asyncio.open_connection(
                    self.config.upstream_host, self.config.upstream_port, limit=CHUNK
                )
            except OSError:
                _reset(cwriter.transport)
                return
            for w in (cwriter, uwriter):
                with contextlib.suppress(OSError):
                    w.transport.get_extra_info("socket").setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                    )
            delay = self.config.latency_ms / 2000.0
            rate = self.config.rate_bytes_per_s
            to_up = _Pipe(uwriter, delay, rate, self._pipe_capacity)
            to_cl = _Pipe(cwriter, delay, rate, self._pipe_capacity)
            pending: asyncio.Queue[_Pending] = asyncio.Queue()
            up_pump = self._spawn(to_up.run())
            cl_pump = self._spawn(to_cl.run())
            c2s = self._spawn(self._client_to_server(_Reader(creader), to_up, pending, uwriter))
            s2c = self._spawn(self._server_to_client(_Reader(ureader), to_cl, pending))
            subtasks = [up_pump, cl_pump, c2s, s2c]
            await asyncio.wait([s2c])
            if s2c.cancelled() or s2c.exception() is not None:
                to_cl.abort()
            else:
                to_cl.close()
            await asyncio.wait([cl_pump])
        finally:
            for t in subtasks:
                t.cancel()
            if subtasks:
                await asyncio.gather(*subtasks, return_exceptions=True)
            for w in (cwriter, uwriter):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()

    async def _client_to_server(
        self,
        src: _Reader,
        to_up: _Pipe,
        pending: asyncio.Queue[_Pending],
        uwriter: asyncio.StreamWriter,
    ) -> None:
        try:
            while True:
                try:
                    head = await src.readuntil(CRLFCRLF)
                except _BadMessage:
                    await _relay_raw(src, to_up)
                    break
                if head is None:  # EOF (a partial head is forwarded as it is)
                    await to_up.send(src.take_all())
                    break
                try:
                    (method, target, *_), headers = _parse_head(head)
                    framing = _body_framing(headers)
                except _BadMessage:
                    await to_up.send(head)
                    await _relay_raw(src, to_up)
                    break
                action = self._record(method, target, headers.get("range"))
                self._record_key_id(headers.get("authorization", ""))
                item = _Pending(method, target, action)
                if action == "503":
                    # Consume the body (so closing does not turn into a reset) unless the
                    # client waits for "100 Continue": then it never sends it.
                    expect = headers.get("expect", "").lower() == "100-continue"
                    if framing == "chunked" and not expect:
                        await _relay_chunked(src, None)
                    elif isinstance(framing, int) and not expect:
                        await _relay_exact(src, None, framing)
                    await pending.put(item)
                    return  # no more requests on this connection: the 503 closes it
                await pending.put(item)  # before the request goes out
                await to_up.send(head)
                if framing == "chunked":
                    complete = await _relay_chunked(src, to_up)
                elif isinstance(framing, int):
                    complete = await _relay_exact(src, to_up, framing)
                else:
                    complete = True
                if not complete:
                    break
            to_up.eof()
        except asyncio.CancelledError:
            raise
        except Exception:
            uwriter.transport.abort()  # the server side notices and ends the connection
            raise

    async def _server_to_client(
        self,
        src: _Reader,
        to_cl: _Pipe,
        pending: asyncio.Queue[_Pending],
    ) -> None:
        try:
            while True:
                item = await self._next_pending(src, pending)
                if item is None:  # upstream EOF, or data nobody asked for
                    await _relay_raw(src, to_cl)
                    return
                if item.action == "503":
                    with self._lock:
                        n = self._seq
                    await to_cl.send(_error_503(item, n))
                    return
                if not await self._relay_response(src, to_cl, item):
                    return
        except _BadMessage:
            await _relay_raw(src, to_cl)

    async def _next_pending(
        self, src: _Reader, pending: asyncio.Queue[_Pending]
    ) -> _Pending | None:
        """The request the next response answers; None if upstream closes (or talks) first."""
        if not pending.empty():
            return pending.get_nowait()
        get = asyncio.ensure_future(pending.get())
        data = asyncio.ensure_future(src.wait_data())
        try:
            await asyncio.wait([get, data], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
            if not data.done():
                data.cancel()
            await asyncio.gather(get, data, return_exceptions=True)
        if get.done() and not get.cancelled():
            return get.result()
        if not pending.empty():
            return pending.get_nowait()
        return None

    async def _relay_response(self, src: _Reader, to_cl: _Pipe, item: _Pending) -> bool:
        """Relay the response(s) to one request; False when the connection is done."""
        while True:
            head = await src.readuntil(CRLFCRLF)
            if head is None:
                await to_cl.send(src.take_all())
                return False
            (_, status_s, *_), headers = _parse_head(head)
            try:
                status = int(status_s)
            except ValueError:
                raise _BadMessage(f"bad status {status_s!r}") from None
            if 100 <= status < 200:
                await to_cl.send(head)
                if status == 101:  # protocol switch: plain relay from now on
                    raise _BadMessage("101 Switching Protocols")
                continue
            break
        if item.method == "HEAD" or status in (204, 304):
            framing: int | str | None = 0
        else:
            framing = _body_framing(headers)
            if framing is None:
                framing = "eof"
        if item.action == "reset":
            await self._relay_cut(src, to_cl, head, framing)
            return False
        await to_cl.send(head)
        if framing == "chunked":
            return await _relay_chunked(src, to_cl)
        if framing == "eof":
            await _relay_raw(src, to_cl)
            return False
        assert isinstance(framing, int)
        return await _relay_exact(src, to_cl, framing)

    @staticmethod
    async def _relay_cut(src: _Reader, to_cl: _Pipe, head: bytes, framing: int | str) -> None:
        """Relay part of a response, then reset the client connection."""
        if framing == 0:
            await to_cl.send(head[: len(head) // 2])
        elif framing == "chunked":
            await to_cl.send(head)
            line = await src.readuntil(CRLF)
            if line is not None:
                await to_cl.send(line)
                await _relay_exact(src, to_cl, _chunk_size(line) // 2)
        elif framing == "eof":
            await to_cl.send(head)
            await to_cl.send(await src.read_some(CHUNK // 4))
        else:
            assert isinstance(framing, int)
            await to_cl.send(head)
            await _relay_exact(src, to_cl, framing // 2)
        to_cl.abort()


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HTTP/1.1 TCP proxy to a local object store: counts requests, injects "
        "faults, adds latency and a bandwidth cap."
    )
    parser.add_argument(
        "--upstream", required=True, help="HOST:PORT (loopback), e.g. 127.0.0.1:8333"
    )
    parser.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (0 = any free)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added round-trip time")
    parser.add_argument(
        "--rate-mbps",
        type=float,
        default=None,
        help="per-connection cap in each direction, in MB/s (10^6 bytes/s)",
    )
    parser.add_argument("--fail-503-every", type=int, default=0, metavar="N")
    parser.add_argument("--reset-every", type=int, default=0, metavar="N")
    parser.add_argument("--max-buffer", type=int, default=2 << 20, metavar="BYTES")
    parser.add_argument("--tls-cert", metavar="PEM", help="speak TLS to clients with this cert")
    parser.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")

    host, sep, port = args.upstream.rpartition(":")
    if not sep or not port.isdigit():
        parser.error("--upstream must be HOST:PORT")
    try:
        config = ProxyConfig(
            upstream_host=host.strip("[]") or "127.0.0.1",
            upstream_port=int(port),
            listen_port=args.listen,
            latency_ms=args.latency_ms,
            rate_bytes_per_s=args.rate_mbps * 1e6 if args.rate_mbps else None,
            fail_503_every=args.fail_503_every,
            reset_every=args.reset_every,
            max_buffer=args.max_buffer,
            tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with NetProxy(config) as proxy:
        print(proxy.endpoint, flush=True)
        while not stop.wait(0.5):
            pass
        print(f"netproxy: requests seen {dict(proxy.counts())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
