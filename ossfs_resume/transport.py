"""A lean HTTP/1.1 transport for one store endpoint: persistent connections in a
bounded pool, the request target sent exactly as given (signed paths are never
re-quoted), bodies read straight into the caller's buffer.

Why not requests: every request through requests and urllib3 cost about 850 us
of CPU here (request preparation, proxy lookups in the environment on every
call, header parsing through the email package), this costs about 130 us, and
a FUSE daemon holds the GIL for all of it: reading many small files was bound
by it.

Errors are this module's own: `ConnectFailed` (nothing was sent),
`ConnectionLost` (the connection broke or the body was cut short),
`TimedOut`, `TLSFailed` (with the ssl module's error as its cause).

A proxy from the environment (``http_proxy``, ``https_proxy``, ``no_proxy``,
as requests reads them) is honoured: absolute-form requests to an http one,
a CONNECT tunnel through it for an https endpoint.
"""

from __future__ import annotations

import base64
import contextlib
import queue
import select
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies, proxy_bypass

USER_AGENT = "ossfs-resume"
_MAX_LINE = 65536
_MAX_HEADERS = 200


class TransportError(Exception):
    """The exchange failed below HTTP: no answer (or no whole answer) came."""


class ConnectFailed(TransportError):
    """No connection could be made (refused, host not found, connect timed out)."""


class ConnectionLost(TransportError):
    """The connection broke: reset, closed early, or a body cut short."""


class TimedOut(TransportError):
    """The store stopped answering for longer than the read timeout."""


class TLSFailed(TransportError):
    """The TLS handshake failed; the ssl module's error is the cause."""


class Headers(Mapping[str, str]):
    """Response headers, looked up without regard to case; items keep the names sent."""

    __slots__ = ("_items", "_lower")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._lower = {name.lower(): value for name, value in items}

    def __getitem__(self, name: str) -> str:
        return self._lower[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._lower.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lower

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self):  # type: ignore[override]
        return list(self._items)


class _Connection:
    __slots__ = ("reader", "reused", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb", buffering=256 << 10)
        self.reused = False

    def close(self) -> None:
        for closing in (self.reader.close, self.sock.close):
            with contextlib.suppress(OSError):
                closing()

    def idle_and_open(self) -> bool:
        """A pooled connection is reusable if the server has neither closed it nor sent
        anything unasked (either makes the socket readable)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable


class Response:
    """One answer. Read the body with `readinto` or `content`, then `release` the
    connection to the pool (only a body read to its end can be reused) or `close` it."""

    def __init__(
        self,
        pool: ConnectionPool,
        conn: _Connection,
        status: int,
        reason: str,
        headers: Headers,
        *,
        head: bool,
    ) -> None:
        self.status_code = status
        self.reason = reason
        self.headers = headers
        self._pool = pool
        self._conn: _Connection | None = conn
        self._content: bytes | None = None
        self._keep = (headers.get("Connection") or "").lower() != "close"
        self._chunked = False
        self._chunk_left = 0
        self._remaining: int | None  # None: until the server closes
        if head or status in (204, 304) or 100 <= status < 200:
            self._remaining = 0
        elif "chunked" in (headers.get("Transfer-Encoding") or "").lower():
            self._chunked = True
            self._remaining = None
        else:
            length = headers.get("Content-Length")
            try:
                self._remaining = int(length) if length is not None else None
            except ValueError:
                raise ConnectionLost(f"bad Content-Length {length!r}") from None
            if self._remaining is None:
                self._keep = False

    @property
    def done(self) -> bool:
        return self._remaining == 0 and not self._chunked

    def readinto(self, view: memoryview | bytearray) -> int:
        """Read up to len(view) body bytes; 0 at the end of the body."""
        conn = self._conn
        if conn is None or not len(view):
            return 0
        if self._chunked:
            return self._read_chunked(conn, view)
        want = len(view) if self._remaining is None else min(len(view), self._remaining)
        if want == 0:
            return 0
        try:
            n = conn.reader.readinto(memoryview(view)[:want])
        except TimeoutError:
            raise TimedOut("timed out reading the body") from None
        except OSError as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        if self._remaining is not None:
            if not n:
                raise ConnectionLost(f"body cut short with {self._remaining} bytes to come")
            self._remaining -= n
        return n or 0

    def _read_chunked(self, conn: _Connection, view: memoryview | bytearray) -> int:
        try:
            if self._chunk_left == 0:
                line = conn.reader.readline(_MAX_LINE)
                if not line:
                    raise ConnectionLost("chunked body cut short")
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                if size == 0:
                    while conn.reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._chunked = False
                    self._remaining = 0
                    return 0
                self._chunk_left = size
            n = conn.reader.readinto(memoryview(view)[: min(len(view), self._chunk_left)])
            if not n:
                raise ConnectionLost("chunked body cut short")
            self._chunk_left -= n
            if self._chunk_left == 0:
                conn.reader.readline(_MAX_LINE)  # the CRLF after the chunk
            return n
        except TimeoutError:
            raise TimedOut("timed out reading the body") from None
        except ValueError:
            raise ConnectionLost("bad chunk size") from None
        except OSError as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from None

    @property
    def content(self) -> bytes:
        """The whole (rest of the) body; the connection is released after it."""
        if self._content is None:
            pieces = []
            buf = bytearray(64 << 10)
            while True:
                n = self.readinto(buf)
                if not n:
                    break
                pieces.append(bytes(buf[:n]))
            self._content = b"".join(pieces)
            self.release()
        return self._content

    def release(self) -> None:
        """Back to the pool if the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.done and self._keep:
            conn.reused = True
            self._pool._put(conn)
        else:
            self._pool._discard(conn)

    def close(self) -> None:
        """Done with it: a body not read to its end closes the connection."""
        self.release()


class ConnectionPool:
    """Up to `maxsize` connections to one endpoint; more callers wait for one."""

    def __init__(
        self,
        endpoint: str,
        *,
        maxsize: int = 16,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        ca_bundle: str | None = None,
    ) -> None:
        split = urlsplit(endpoint)
        self.scheme = split.scheme
        self.host = split.hostname or ""
        self.port = split.port or (443 if self.scheme == "https" else 80)
        self.netloc = split.netloc
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=ca_bundle or _default_ca_file())
        self._proxy = _proxy_for(endpoint, self.scheme)
        self._idle: queue.LifoQueue[_Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(1, maxsize))
        self._lock = threading.Lock()
        self._closed = False

    @property
    def proxied(self) -> bool:
        return self._proxy is not None

    def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
    ) -> Response:
        """Send one request (`target`: path and query, already encoded) and read the
        status and headers. A reused connection the server had closed meanwhile is
        replaced once, without counting as a failure."""
        lines = [f"{method} {self._target(target)} HTTP/1.1\r\n"]
        lower = {name.lower() for name in headers}
        if "host" not in lower:
            lines.append(f"Host: {self.netloc}\r\n")
        if "user-agent" not in lower:
            lines.append(f"User-Agent: {USER_AGENT}\r\n")
        if body is not None and "content-length" not in lower:
            lines.append(f"Content-Length: {len(body)}\r\n")
        if self._proxy is not None and self._proxy[2] and self.scheme == "http":
            lines.append(f"Proxy-Authorization: {self._proxy[2]}\r\n")
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} has a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        self._slots.acquire()
        try:
            while True:
                conn = self._get()
                try:
                    return self._exchange(conn, method, head, body)
                except ConnectionLost:
                    self._discard(conn, release_slot=False)
                    if conn.reused:  # a stale keep-alive: try once more on a fresh one
                        continue
                    raise
                except BaseException:
                    self._discard(conn, release_slot=False)
                    raise
        except BaseException:
            self._slots.release()
            raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    # -- internals --------------------------------------------------------

    def _target(self, target: str) -> str:
        if self._proxy is not None and self.scheme == "http":
            return f"http://{self.netloc}{target}"  # absolute form, for the proxy
        return target

    def _exchange(
        self, conn: _Connection, method: str, head: bytes, body: bytes | None
    ) -> Response:
        try:
            if body:
                conn.sock.sendall(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.sock.sendall(body)
            else:
                conn.sock.sendall(head)
            status_line = conn.reader.readline(_MAX_LINE)
            if not status_line:
                raise ConnectionLost("the server closed the connection")
            status, reason = _parse_status(status_line)
            while 100 <= status < 200:  # interim answers: skip them
                _read_headers(conn)
                status_line = conn.reader.readline(_MAX_LINE)
                if not status_line:
                    raise ConnectionLost("the server closed the connection")
                status, reason = _parse_status(status_line)
            headers = _read_headers(conn)
        except TimeoutError:
            raise TimedOut("timed out waiting for the answer") from None
        except ssl.SSLError as exc:
            raise ConnectionLost(f"TLS error: {exc.reason or exc}") from exc
        except OSError as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        conn.reused = False
        return Response(self, conn, status, reason, headers, head=method == "HEAD")

    def _get(self) -> _Connection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return self._connect()
            if conn.idle_and_open():
                conn.reused = True
                return conn
            conn.close()

    def _put(self, conn: _Connection) -> None:
        with self._lock:
            closed = self._closed
        if closed:
            conn.close()
        else:
            self._idle.put(conn)
        self._slots.release()

    def _discard(self, conn: _Connection, *, release_slot: bool = True) -> None:
        conn.close()
        if release_slot:
            self._slots.release()

    def _connect(self) -> _Connection:
        host, port = (self._proxy[0], self._proxy[1]) if self._proxy else (self.host, self.port)
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except TimeoutError:
            raise ConnectFailed(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.connect_timeout)
            if self._proxy is not None and self.scheme == "https":
                self._tunnel(sock)
            if self._ssl is not None:
                try:
                    sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
                except ssl.SSLError as exc:
                    raise TLSFailed(f"TLS handshake failed: {exc.reason or exc}") from exc
                except TimeoutError:
                    raise TimedOut("timed out in the TLS handshake") from None
                except OSError as exc:
                    raise ConnectionLost(f"TLS handshake cut short ({exc})") from exc
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)

    def _tunnel(self, sock: socket.socket) -> None:
        assert self._proxy is not None
        auth = f"Proxy-Authorization: {self._proxy[2]}\r\n" if self._proxy[2] else ""
        where = f"{self.host}:{self.port}"
        sock.sendall(f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n{auth}\r\n".encode("latin-1"))
        reader = sock.makefile("rb", buffering=0)
        try:
            status, reason = _parse_status(reader.readline(_MAX_LINE))
            while reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass
        finally:
            reader.close()
        if status != 200:
            raise ConnectFailed(f"the proxy refused the tunnel: {status} {reason}")


def _parse_status(line: bytes) -> tuple[int, str]:
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectionLost(f"not an HTTP answer: {line[:60]!r}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


def _read_headers(conn: _Connection) -> Headers:
    items: list[tuple[str, str]] = []
    while True:
        line = conn.reader.readline(_MAX_LINE)
        if line in (b"\r\n", b"\n"):
            return Headers(items)
        if not line:
            raise ConnectionLost("the server closed the connection in the headers")
        if len(items) >= _MAX_HEADERS:
            raise ConnectionLost("too many headers in the answer")
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            items.append((name.strip(), value.strip()))


def _default_ca_file() -> str | None:
    """certifi's bundle when installed (what requests used), else the system's."""
    try:
        import certifi
    except ImportError:
        return None
    return str(certifi.where())


def _proxy_for(endpoint: str, scheme: str) -> tuple[str, int, str] | None:
    """(host, port, Proxy-Authorization value or "") of the environment's proxy for
    `endpoint`, or None."""
    host = urlsplit(endpoint).hostname or ""
    proxies = getproxies()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or proxy_bypass(host):
        return None
    if "://" not in url:
        url = f"http://{url}"
    split = urlsplit(url)
    if not split.hostname:
        return None
    auth = ""
    if split.username:
        token = f"{unquote(split.username)}:{unquote(split.password or '')}"
        auth = "Basic " + base64.b64encode(token.encode()).decode("ascii")
    return split.hostname, split.port or 80, auth
