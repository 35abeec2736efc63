"""The HTTP transport against a scripted server on a real socket: bodies by length and
chunked, cut short, stale keep-alive connections, the pool bound, and proxies."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from ossfs_resume.transport import (
    ConnectFailed,
    ConnectionLost,
    ConnectionPool,
    TimedOut,
)

Handler = Callable[[socket.socket, bytes], bool]  # (conn, request head) -> keep the connection?


class ScriptedServer:
    """Answers each request on a connection with `handler`; records request heads."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                self.heads.append(head)
                if not self.handler(conn, head):
                    return

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(handler: Handler) -> ScriptedServer:
        servers.append(ScriptedServer(handler))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> Handler:
    def handler(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
        )
        return True

    return handler


def test_body_by_length_into_a_buffer_and_the_connection_is_reused(serve) -> None:
    server = serve(answer(b"hello world"))
    pool = ConnectionPool(server.endpoint, maxsize=2)
    for _ in range(3):
        resp = pool.request("GET", "/b/k%2Ex?versionId=1", {"Range": "bytes=0-10"})
        buf = bytearray(11)
        assert resp.readinto(buf) == 11 and bytes(buf) == b"hello world"
        assert resp.readinto(bytearray(4)) == 0
        resp.release()
    assert server.connections == 1
    first = server.heads[0].decode()
    # The target is sent exactly as given: nothing re-quoted, no dot segment resolved.
    assert first.startswith("GET /b/k%2Ex?versionId=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in first and "Range: bytes=0-10\r\n" in first
    pool.close()


def test_chunked_body(serve) -> None:
    def chunked(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        return True

    server = serve(chunked)
    pool = ConnectionPool(server.endpoint)
    assert pool.request("GET", "/", {}).content == b"hello world"
    assert pool.request("GET", "/", {}).content == b"hello world"
    assert server.connections == 1  # the chunked body was read to its end: reusable
    pool.close()


def test_a_body_cut_short_is_connection_lost(serve) -> None:
    def short(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        return False

    server = serve(short)
    pool = ConnectionPool(server.endpoint)
    resp = pool.request("GET", "/", {})
    buf = bytearray(100)
    got = resp.readinto(buf)
    assert buf[:got] == b"only this"[:got]
    with pytest.raises(ConnectionLost, match="cut short"):
        while True:
            got += resp.readinto(memoryview(buf)[got:])
    resp.close()
    pool.close()


def test_a_stale_keep_alive_connection_is_replaced_without_an_error(serve) -> None:
    served = 0

    def once_per_connection(conn: socket.socket, head: bytes) -> bool:
        nonlocal served
        served += 1
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return False  # closes after answering, without saying Connection: close

    server = serve(once_per_connection)
    pool = ConnectionPool(server.endpoint)
    for _ in range(3):
        assert pool.request("GET", "/", {}).content == b"ok"
    assert served == 3 and server.connections == 3
    pool.close()


def test_the_pool_bounds_connections_and_callers_wait(serve) -> None:
    server = serve(answer(b"x"))
    pool = ConnectionPool(server.endpoint, maxsize=1)
    held = pool.request("GET", "/", {})
    got: list[bytes] = []
    waiter = threading.Thread(target=lambda: got.append(pool.request("GET", "/", {}).content))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # no second connection while the first is out
    assert held.content == b"x"  # read to the end: back to the pool, the waiter goes on
    waiter.join(5)
    assert got == [b"x"] and server.connections == 1
    pool.close()


def test_refused_and_silent_servers(serve) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ConnectFailed, match="refused"):
        ConnectionPool(f"http://127.0.0.1:{port}").request("GET", "/", {})
    server = serve(lambda conn, head: True)  # reads the request, never answers
    pool = ConnectionPool(server.endpoint, read_timeout=0.2)
    with pytest.raises(TimedOut):
        pool.request("GET", "/", {})
    # The slot of the failed request is free again.
    with pytest.raises(TimedOut):
        pool.request("GET", "/", {})
    pool.close()


def test_a_header_with_a_line_break_is_refused(serve) -> None:
    server = serve(answer(b""))
    pool = ConnectionPool(server.endpoint, maxsize=1)
    with pytest.raises(ValueError, match="line break"):
        pool.request("GET", "/", {"X-Meta": "a\r\nInjected: 1"})
    assert pool.request("GET", "/", {}).content == b""  # the slot was not lost
    assert all(b"Injected" not in head for head in server.heads)
    pool.close()


def test_an_http_proxy_from_the_environment_gets_absolute_requests(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = serve(answer(b"via proxy"))
    monkeypatch.setenv("http_proxy", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("no_proxy", "")
    pool = ConnectionPool("http://store.example:9000")
    assert pool.proxied
    assert pool.request("GET", "/b/k", {}).content == b"via proxy"
    head = proxy.heads[0].decode()
    assert head.startswith("GET http://store.example:9000/b/k HTTP/1.1\r\n")
    assert "Proxy-Authorization: Basic dXNlcjpwQHNz\r\n" in head  # user:p@ss
    pool.close()
    monkeypatch.setenv("no_proxy", "store.example")
    assert not ConnectionPool("http://store.example:9000").proxied
